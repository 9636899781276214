#include "core/device.h"

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include "core/error.h"
#include "core/torch_compat.h"

namespace kvdrift {

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (name.size() > 5) {
      const std::string digits = name.substr(5);
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
        fail("unknown device '{}' (expected cpu, cuda or cuda:N)", name);
      index = std::stoi(digits);
    }
    if (!torch::cuda::is_available())
      fail("device '{}' requested but CUDA is not available (this LibTorch build or machine has no GPU)", name);
    if (index >= static_cast<int>(torch::cuda::device_count()))
      fail("device '{}' requested but only {} CUDA device(s) exist", name, torch::cuda::device_count());
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  fail("unknown device '{}' (expected cpu, cuda or cuda:N)", name);
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  fail("unknown dtype '{}' (expected float32, float16 or bfloat16)", name);
}

std::string dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return "float32";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    default: return c10::toString(dtype);
  }
}

void require_supported(const torch::Device& device, torch::ScalarType dtype) {
  if (dtype == torch::kFloat16 && !compat::has_half_matmul(device))
    fail("dtype float16 is not supported on {} by this LibTorch {} build (no half-precision matmul); use "
         "bfloat16 or float32, or run on CUDA",
         device.str(), TORCH_VERSION);
}

std::string describe_device(const torch::Device& device) {
  if (device.is_cuda()) {
    return fmt::format("cuda:{} ({} CUDA device(s) visible)", device.has_index() ? device.index() : 0,
                       torch::cuda::device_count());
  }
  return fmt::format("cpu ({} intra-op threads)", at::get_num_threads());
}

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
}

}  // namespace kvdrift
