#include "quant/affine.h"

#include <cmath>

#include "core/error.h"

namespace kvdrift::quant {

const std::vector<std::string>& scale_dtypes() {
  static const std::vector<std::string> dtypes = {"float16", "float8_e4m3", "float32"};
  return dtypes;
}

std::string read_zero_dtype(ParamReader& params, const std::string& scale_dtype) {
  return params.choice("zero_dtype", scale_dtype == "float8_e4m3" ? "float16" : scale_dtype, scale_dtypes());
}

int64_t storage_bits(const std::string& dtype) {
  if (dtype == "float32") return 32;
  if (dtype == "float16") return 16;
  if (dtype == "float8_e4m3" || dtype == "uint8") return 8;
  fail("unknown storage dtype '{}'", dtype);
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

torch::Tensor round_to_storage(const torch::Tensor& x, const std::string& dtype) {
  if (dtype == "float32") return x.to(torch::kFloat32);
  if (dtype == "float16") return x.to(torch::kFloat16).to(torch::kFloat32);
  if (dtype == "float8_e4m3") return round_to_e4m3(x.to(torch::kFloat32));
  fail("unknown scale dtype '{}' (expected float16, float8_e4m3 or float32)", dtype);
}

MinMaxCodes quantize_minmax(const torch::Tensor& groups, int64_t bits, double eps, double clip) {
  const double levels = std::pow(2.0, static_cast<double>(bits)) - 1.0;
  auto minimum = std::get<0>(groups.min(-1, /*keepdim=*/true));
  auto maximum = std::get<0>(groups.max(-1, /*keepdim=*/true));
  if (clip != 1.0) {
    minimum = minimum * clip;
    maximum = maximum * clip;
  }
  auto scale = ((maximum - minimum) / levels).clamp_min(eps);
  auto codes = torch::round((groups - minimum) / scale).clamp(0.0, levels).to(torch::kUInt8);
  return {codes, scale, minimum};
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
