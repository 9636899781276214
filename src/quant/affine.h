#pragma once
// Building blocks shared by the methods: asymmetric min/max round-to-nearest over groups, rounding of
// stored parameters to their storage dtype, and the spec's bit-packing layout.
#include <torch/types.h>

#include <cstdint>
#include <string>

#include "quant/params.h"

namespace kvdrift::quant {

// The `scale_dtype` parameter of a method: float16 (default), float8_e4m3 or float32.
StoredDtype read_scale_dtype(ParamReader& params);
// The `zero_dtype` parameter of a method with floating-point zero points (minima), from the same
// choices. Its default is the scale dtype, except that fp8 scales keep float16 zero points: the layout
// the KVarN paper measures (FP8 scales, FP16 zero points), since a zero point carries the group's
// offset, whose fp8 rounding error is not scaled down by the codes.
StoredDtype read_zero_dtype(ParamReader& params, StoredDtype scale_dtype);
int64_t storage_bits(StoredDtype dtype);
// The `scale_rounding` parameter: after_codes (default; the KVarN authors' kernels compute the codes
// against float32 parameters and round the stored ones afterwards: docs/quantizers.md) or
// before_codes (the parameters are rounded to their storage dtype first and the codes computed against
// the rounded values that dequantization uses). True for before_codes.
bool read_round_before_codes(ParamReader& params);
const char* scale_rounding_name(bool round_before_codes);
// The value `dtype` stores for each element of float32 `x` (round-half-to-even; float8_e4m3 saturates
// at +-448 and has subnormals down to 2^-9), as float32. UInt8 holds integer zero points: as they are.
torch::Tensor round_to_storage(const torch::Tensor& x, StoredDtype dtype);
// x rounded to `dtype` as a stored parameter, with the count of elements the dtype could not hold.
StoredParam stored_param(const torch::Tensor& x, StoredDtype dtype);

// The scale guard of min/max quantization (RTN, KIVI, QuaRot's float-minimum values): a constant
// group gets this scale instead of 0. KVarN's RTN uses the spec's own 1e-10.
inline constexpr double kMinMaxScaleEps = 1e-8;

// Asymmetric min/max round-to-nearest over the last dimension of `groups` (float32), with the range
// optionally clipped to [min * clip, max * clip]:
//   s = max((max - min) * clip / (2^bits - 1), eps),  q = clamp(round((x - min * clip) / s), 0, 2^bits - 1)
// scale and minimum (= min * clip) keep the reduced dimension (size 1).
// With `rounding.before_codes` (scale_rounding: before_codes) s and min are rounded to their storage
// dtypes before the codes are computed.
struct MinMaxCodes {
  torch::Tensor codes;  // uint8, shape of groups
  torch::Tensor scale;
  torch::Tensor minimum;
};
struct ParamRounding {
  StoredDtype scale = StoredDtype::Float32, zero = StoredDtype::Float32;
  bool before_codes = false;
};
MinMaxCodes quantize_minmax(const torch::Tensor& groups, int64_t bits, double eps, double clip = 1.0,
                            const ParamRounding& rounding = {});
// The min/max codes clamp(round((x - minimum) / scale), 0, 2^bits - 1) as uint8, for scales and minima
// that broadcast against x. A scale of 0 (a stored parameter rounded to 0) dequantizes every code to the
// minimum: any code will do there, but not NaN.
torch::Tensor minmax_codes(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& minimum,
                           int64_t bits);

// Row-wise packing: element c of a row goes to byte c / (8 / bits) at bit shift (c % (8 / bits)) * bits.
torch::Tensor pack_codes(const torch::Tensor& codes, int64_t bits);  // uint8 [..., C] -> [..., ceil(C / per_byte)]
torch::Tensor unpack_codes(const torch::Tensor& packed, int64_t bits, int64_t row_length);

}  // namespace kvdrift::quant
