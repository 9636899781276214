#pragma once
// The one place where LibTorch version differences are handled (Debian's CPU 1.13 vs CUDA 2.x).
#include <torch/types.h>

namespace kvdrift::compat {

// LibTorch 1.13 has no float16 matmul on CPU ("addmm_impl_cpu_" not implemented for 'Half');
// 2.x has one. CUDA always has it.
inline bool has_half_matmul(const torch::Device& device) {
#if TORCH_VERSION_MAJOR >= 2
  (void)device;
  return true;
#else
  return device.is_cuda();
#endif
}

}  // namespace kvdrift::compat
