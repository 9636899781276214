#include "quant/affine.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace kvdrift::quant {

namespace {

// A floating-point storage dtype parameter, `fallback` when not given.
StoredDtype read_float_dtype(ParamReader& params, const std::string& key, StoredDtype fallback) {
  const std::vector<std::string> choices = {"float16", "float8_e4m3", "float32"};
  return *parse_enum(kStoredDtypeNames, params.choice(key, stored_dtype_name(fallback), choices));
}

}  // namespace

StoredDtype read_scale_dtype(ParamReader& params) {
  return read_float_dtype(params, "scale_dtype", StoredDtype::Float16);
}

bool read_round_before_codes(ParamReader& params) {
  return params.choice("scale_rounding", scale_rounding_name(false), {"after_codes", "before_codes"}) ==
         scale_rounding_name(true);
}

const char* scale_rounding_name(bool round_before_codes) {
  return round_before_codes ? "before_codes" : "after_codes";
}

StoredDtype read_zero_dtype(ParamReader& params, StoredDtype scale_dtype) {
  return read_float_dtype(params, "zero_dtype", scale_dtype == StoredDtype::Float8E4M3 ? StoredDtype::Float16 : scale_dtype);
}

int64_t storage_bits(StoredDtype dtype) {
  switch (dtype) {
    case StoredDtype::Float32: return 32;
    case StoredDtype::Float16: return 16;
    case StoredDtype::Float8E4M3:
    case StoredDtype::UInt8: return 8;
  }
  internal_error("every stored dtype has a width", __FILE__, __LINE__);
}

namespace {

// float8 e4m3 (OCP "fn" variant): 3 mantissa bits, exponents -6..8, max 448, no infinities. Done with
// float32 arithmetic that is exact (scaling by powers of two), so it is the same on every LibTorch.
torch::Tensor round_to_e4m3(const torch::Tensor& x) {
  auto magnitude = x.abs().clamp_max(448.0);
  auto exponent = std::get<1>(torch::frexp(magnitude)) - 1;          // floor(log2 |x|) for |x| > 0
  exponent = exponent.clamp_min(-6);                                // below 2^-6 the spacing is fixed (subnormals)
  auto step = torch::pow(2.0, (exponent - 3).to(torch::kFloat32));  // spacing of representable values
  auto rounded = torch::round(magnitude / step) * step;
  return (torch::sign(x) * rounded.clamp_max(448.0)).to(torch::kFloat32);
}

}  // namespace

torch::Tensor round_to_storage(const torch::Tensor& x, StoredDtype dtype) {
  switch (dtype) {
    case StoredDtype::Float32:
    case StoredDtype::UInt8: return x.to(torch::kFloat32);
    case StoredDtype::Float16: return x.to(torch::kFloat16).to(torch::kFloat32);
    case StoredDtype::Float8E4M3: return round_to_e4m3(x.to(torch::kFloat32));
  }
  internal_error("every stored dtype has a rounding", __FILE__, __LINE__);
}

StoredParam stored_param(const torch::Tensor& x, StoredDtype dtype) {
  StoredParam param{round_to_storage(x, dtype), dtype};
  double largest = 0;  // the largest finite value of a floating-point storage dtype
  if (dtype == StoredDtype::Float16) largest = 65504.0;
  if (dtype == StoredDtype::Float8E4M3) largest = 448.0;
  if (largest > 0) {
    // Counted on the host in one pass: a flush stores a handful of parameters per tile, and the eight
    // tensor operations this took were about a third of a per-token flush (docs/performance.md).
    const auto wanted = x.to(torch::kCPU, torch::kFloat32).contiguous();
    const auto stored = param.values.to(torch::kCPU).contiguous();
    const float* given = wanted.data_ptr<float>();
    const float* kept = stored.data_ptr<float>();
    for (int64_t i = 0; i < wanted.numel(); ++i) {
      param.saturated += std::abs(given[i]) > largest;
      param.flushed_to_zero += given[i] != 0.0f && kept[i] == 0.0f;
    }
  }
  return param;
}

torch::Tensor minmax_codes(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& minimum,
                           int64_t bits) {
  const double levels = std::pow(2.0, static_cast<double>(bits)) - 1.0;
  return torch::round((x - minimum) / scale.clamp_min(std::numeric_limits<float>::min()))
      .clamp(0.0, levels)
      .to(torch::kUInt8);
}

MinMaxCodes quantize_minmax(const torch::Tensor& groups, int64_t bits, double eps, double clip,
                            const ParamRounding& rounding) {
  const double levels = std::pow(2.0, static_cast<double>(bits)) - 1.0;
  auto minimum = std::get<0>(groups.min(-1, /*keepdim=*/true));
  auto maximum = std::get<0>(groups.max(-1, /*keepdim=*/true));
  if (clip != 1.0) {
    minimum = minimum * clip;
    maximum = maximum * clip;
  }
  auto scale = ((maximum - minimum) / levels).clamp_min(eps);
  if (rounding.before_codes) {
    scale = round_to_storage(scale, rounding.scale);
    minimum = round_to_storage(minimum, rounding.zero);
  }
  return {minmax_codes(groups, scale, minimum, bits), scale, minimum};
}

torch::Tensor pack_codes(const torch::Tensor& codes, int64_t bits) {
  const int64_t per_byte = 8 / bits;
  const int64_t length = codes.size(-1);
  const int64_t bytes = (length + per_byte - 1) / per_byte;
  auto padded = torch::constant_pad_nd(codes.to(torch::kInt32), {0, bytes * per_byte - length});
  auto slots = padded.unflatten(-1, {bytes, per_byte});
  auto shifts = torch::arange(per_byte, torch::TensorOptions().dtype(torch::kInt32).device(codes.device())) * bits;
  return torch::bitwise_left_shift(slots, shifts).sum(-1).to(torch::kUInt8);
}

torch::Tensor unpack_codes(const torch::Tensor& packed, int64_t bits, int64_t row_length) {
  const int64_t per_byte = 8 / bits;
  auto shifts = torch::arange(per_byte, torch::TensorOptions().dtype(torch::kInt32).device(packed.device())) * bits;
  auto slots = torch::bitwise_right_shift(packed.to(torch::kInt32).unsqueeze(-1), shifts).bitwise_and((1 << bits) - 1);
  return slots.flatten(-2).narrow(-1, 0, row_length).to(torch::kUInt8);
}

}  // namespace kvdrift::quant
