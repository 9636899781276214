#pragma once
// Orthonormal Hadamard rotations of head vectors. For d a power of two, H_d / sqrt(d) in Sylvester
// order (H_2n = [[H, H], [H, -H]], symmetric, its own inverse), applied with the fast Walsh-Hadamard
// transform: log2(d) butterfly passes, O(d log d) per vector, batched over every leading dimension.
// Otherwise d = K * 2^m with a known Hadamard matrix H_K (K in 12, 20, 28, 36, 40, 52, 60) and
// H = (H_K / sqrt(K)) kron (H_{2^m} / sqrt(2^m)).
#include <torch/types.h>

#include <cstdint>

namespace kvdrift::quant {

// True when hadamard_rotate supports vectors of length d.
bool has_hadamard(int64_t d);
// The head dims has_hadamard accepts, in words, for error messages.
const char* hadamard_dims();
// x [..., d] -> x H (float32). Throws Error naming d when there is no construction.
torch::Tensor hadamard_rotate(const torch::Tensor& x);
// y [..., d] -> y H^T, the inverse of hadamard_rotate.
torch::Tensor hadamard_unrotate(const torch::Tensor& y);

// The unnormalised Walsh-Hadamard transform over the last dimension (a power of two), x H_d in
// Sylvester order: log2(d) butterfly passes pairing index i with i + h. The reference is torch
// operations (any device, some 24 of them for d = 64, each a dispatch on the decode path of every
// per-token quantizer); the CPU kernel beside it makes the same passes in one loop over memory and
// equals it bit for bit (each butterfly is one float add or subtract either way). walsh_hadamard
// takes the kernel for float32 CPU tensors, the reference otherwise.
torch::Tensor walsh_hadamard(const torch::Tensor& x);
torch::Tensor walsh_hadamard_reference(const torch::Tensor& x);
torch::Tensor walsh_hadamard_cpu(const torch::Tensor& x);  // float32 CPU only

// The dense, unnormalised +-1 Hadamard matrix of order K for the non-power-of-two factors
// (K in 12, 20, 28, 36, 40, 52, 60), float32 [K, K]. Throws Error for other K.
torch::Tensor known_hadamard_matrix(int64_t k);

}  // namespace kvdrift::quant
