#pragma once
// A weight matrix applied as torch::linear, or through MKL's pre-packed GEMM on CPU.
//
// torch::linear on CPU float32 calls MKL's sgemm, which packs the weight matrix into its blocked
// layout on every call: a cost per step that does not shrink with the batch. MKL's packed GEMM
// (LibTorch's mkl::_mkl_reorder_linear_weight / mkl::_mkl_linear, what its CPU freezing passes use)
// packs once for one row count M and computes with the packed copy while the input has M rows; any
// other row count takes torch::linear. The plain path is the reference (and the only one on CUDA and in
// other dtypes); docs/performance.md has the measured difference between the two.
#include <torch/types.h>

#include <cstdint>

namespace kvdrift {

enum class GemmPath {
  Plain,   // torch::linear on every call
  Packed,  // pre-packed weights for the decode step's row count where MKL offers them (CPU, float32)
};
// The path new models start with: Packed unless a command chose otherwise (`kvdrift --gemm`).
GemmPath default_gemm_path();
void set_default_gemm_path(GemmPath path);
// Whether this LibTorch has MKL's packed GEMM for `weight`'s device and dtype.
bool packed_gemm_available(const torch::Tensor& weight);

class Linear {
 public:
  Linear() = default;
  // weight [out, in], bias [out] or undefined.
  explicit Linear(torch::Tensor weight, torch::Tensor bias = {});

  // x [..., in] -> [..., out]; through the packed copy when x has packed_rows() rows.
  torch::Tensor operator()(const torch::Tensor& x) const;
  // Packs the weight for inputs of `rows` rows (packed_gemm_available must hold); 0 drops the copy.
  // Const: the packed copy is a cache of the weight in another layout, not a different weight.
  void pack(int64_t rows) const;
  int64_t packed_rows() const { return packed_rows_; }

  const torch::Tensor& weight() const { return weight_; }
  const torch::Tensor& bias() const { return bias_; }

 private:
  torch::Tensor weight_, bias_;
  mutable torch::Tensor packed_;  // MKL's layout for packed_rows_ input rows; undefined when not packed
  mutable int64_t packed_rows_ = 0;
};

}  // namespace kvdrift
