#include "model/linear.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>

#include "core/error.h"

namespace kvdrift {

namespace {

std::atomic<GemmPath> default_path{GemmPath::Packed};

// LibTorch registers MKL's packed GEMM as operators of the `mkl` namespace without C++ functions for
// them; they are reached through the dispatcher. Empty handles where this build has none.
struct PackedGemmOps {
  std::optional<c10::OperatorHandle> reorder, linear;
};

const PackedGemmOps& packed_gemm_ops() {
  static const PackedGemmOps ops = [] {
    PackedGemmOps found;
    if (!at::hasMKL()) return found;
    auto& dispatcher = c10::Dispatcher::singleton();
    found.reorder = dispatcher.findSchema({"mkl::_mkl_reorder_linear_weight", ""});
    found.linear = dispatcher.findSchema({"mkl::_mkl_linear", ""});
    return found;
  }();
  return ops;
}

}  // namespace

GemmPath default_gemm_path() { return default_path.load(); }
void set_default_gemm_path(GemmPath path) { default_path.store(path); }

bool packed_gemm_available(const torch::Tensor& weight) {
  const auto& ops = packed_gemm_ops();
  return ops.reorder && ops.linear && weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32;
}

Linear::Linear(torch::Tensor weight, torch::Tensor bias) : weight_(std::move(weight)), bias_(std::move(bias)) {}

torch::Tensor Linear::operator()(const torch::Tensor& x) const {
  if (packed_rows_ == 0 || x.numel() != packed_rows_ * weight_.size(1)) return torch::linear(x, weight_, bias_);
  static const auto linear = packed_gemm_ops().linear->typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t)>();
  const std::optional<at::Tensor> bias = bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt;
  return linear.call(x.contiguous(), packed_, weight_, bias, packed_rows_);
}

void Linear::pack(int64_t rows) const {
  packed_ = torch::Tensor();  // the old copy goes before the new one is made
  packed_rows_ = 0;
  if (rows == 0) return;
  KVDRIFT_CHECK(rows > 0 && packed_gemm_available(weight_));
  static const auto reorder =
      packed_gemm_ops().reorder->typed<at::Tensor(const at::Tensor&, int64_t)>();
  packed_ = reorder.call(weight_.contiguous(), rows);
  packed_rows_ = rows;
}

}  // namespace kvdrift
