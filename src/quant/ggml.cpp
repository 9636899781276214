// `ggml`: the KV cache types llama.cpp ships (`-ctk/-ctv`), each token vector quantized in blocks along
// head_dim as soon as it is written. The parameter `type` picks the format, written from ggml's
// reference quantizers (ggml-quants.c, quantize_row_*_ref) as the `gguf` package's numpy port states
// them (gguf 0.19.0, gguf/quants.py), and checked bit for bit against that port where it can quantize
// (tests/oracle/test_ggml_formats.py):
//   q8_0   d = amax / 127,              q = roundf(x / d)                  x_hat = q d            8.5 bits
//   q4_0   d = max / -8 (signed max),   q = min(15, trunc(x / d + 8.5))    x_hat = (q - 8) d      4.5 bits
//   q5_0   d = max / -16,               q = min(31, trunc(x / d + 16.5))   x_hat = (q - 16) d     5.5 bits
//   q4_1   d = (max - min) / 15,        q = min(15, trunc((x - min) / d + 0.5))  x_hat = q d + m  5 bits
//   q5_1   d = (max - min) / 31,        q = min(31, trunc((x - min) / d + 0.5))  x_hat = q d + m  6 bits
//   iq4_nl q = the index of the non-linear grid value v (-127 .. 113) nearest x / d0, d0 = max / -127
//          (ties to the larger); d = sum(x^2 v x) / sum(x^2 v^2), weighted least squares, the codes
//          kept; x_hat = d v                                                                     4.5 bits
//   mxfp4  e = floor(log2 amax) - 2 + 127 (e8m0), d = 2^(e - 128); q = the e2m1 value (doubled) nearest
//          x / d, first on ties; x_hat = d * value                                               4.25 bits
//   nvfp4  per 16 channels (stored in blocks of 64): s = ue4m3(amax / 6), d = s / 2, codes as mxfp4's
//                                                                                                4.5 bits
// d and m are stored as float16; the codes are computed against the float32 d (ggml's order, as
// `scale_rounding: after_codes`) through its reciprocal (x * (1/d), not x / d), exactly as ggml does.
// iq4_nl follows quantize_row_iq4_nl_ref (no search over candidate scales: ntry = -1); its sums run in
// the C source's order, one rounding per operation (this file is built with -ffp-contract=off). gguf
// 0.19.0 cannot quantize iq4_nl or nvfp4: their oracle is gguf's dequantizer on our packed blocks and
// a numpy port of the C reference in the test.
// `prefill: quantized` (the default) has the prefill's attention read its own keys and values quantized,
// as llama.cpp's does (it writes every token to the cache quantized before attention reads it);
// `full_precision` gives the prefill of every other method.
// `rotate: true` applies the orthonormal Hadamard rotation of the head dimension first (llama.cpp
// rotates quantized K/V); the rotation is quant/hadamard.h's, not llama.cpp's own kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <fmt/ranges.h>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

enum class GgmlType { Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4, NVFP4 };
struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  int64_t block;         // channels per stored block: head_dim must be a multiple
  int64_t group;         // channels sharing one scale
  int64_t code_bits;     // the code's range is [0, 2^code_bits)
  int64_t stored_bits;   // bits the format spends per code (q5's fifth bit sits in a 32-bit word per block)
  bool has_minimum;      // the _1 types store a minimum m beside d
};
constexpr GgmlTypeInfo kTypes[] = {
    {GgmlType::Q8_0, "q8_0", 32, 32, 8, 8, false},     {GgmlType::Q4_0, "q4_0", 32, 32, 4, 4, false},
    {GgmlType::Q4_1, "q4_1", 32, 32, 4, 4, true},      {GgmlType::Q5_0, "q5_0", 32, 32, 5, 5, false},
    {GgmlType::Q5_1, "q5_1", 32, 32, 5, 5, true},      {GgmlType::IQ4_NL, "iq4_nl", 32, 32, 4, 4, false},
    {GgmlType::MXFP4, "mxfp4", 32, 32, 4, 4, false},   {GgmlType::NVFP4, "nvfp4", 64, 16, 4, 4, false},
};

std::vector<std::string> type_names() {
  std::vector<std::string> names;
  for (const auto& info : kTypes) names.emplace_back(info.name);
  return names;
}

// iq4_nl's non-linear grid (ggml's kvalues_iq4nl), indexed by the 4-bit code.
constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// ggml's best_index_int8: the grid index nearest x, the larger of two at equal distance.
int iq4nl_index(float x) {
  if (x <= kIq4nlValues[0]) return 0;
  if (x >= kIq4nlValues[15]) return 15;
  int low = 0, high = 15;
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    (x < kIq4nlValues[middle] ? high : low) = middle;
  }
  return x - kIq4nlValues[high - 1] < kIq4nlValues[high] - x ? high - 1 : high;
}

// e2m1's values doubled, indexed by the 4-bit code (ggml's kvalues_mxfp4; code 8 is -0), as a tensor
// with `options`.
torch::Tensor e2m1_doubled(const torch::TensorOptions& options) {
  static const float values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  return torch::from_blob(const_cast<float*>(values), {16}, torch::kFloat32).to(options);
}

// The code of the e2m1 value nearest each element of `groups` under its group's halved scale
// `half_scale` (keepdim), the first code on ties (ggml's best_index_mxfp4).
torch::Tensor nearest_e2m1(const torch::Tensor& groups, const torch::Tensor& half_scale) {
  auto distance = (half_scale.unsqueeze(-1) * e2m1_doubled(groups.options()) - groups.unsqueeze(-1)).abs();
  return distance.argmin(-1).to(torch::kUInt8);
}

// A float32 table of 256 entries indexed by a uint8 code tensor, on the codes' device.
torch::Tensor lookup(const std::vector<float>& table, const torch::Tensor& codes) {
  auto on_device = torch::from_blob(const_cast<float*>(table.data()), {256}, torch::kFloat32).to(codes.device());
  return on_device.index({codes.to(torch::kLong)});
}

// ggml_fp32_to_ue4m3: unsigned e4m3 (bias 7) of x, clamped to 448, rounding half up on the fourth
// mantissa bit; a normal exponent of 15 or more saturates to 0x7E, x <= 0 gives 0.
uint8_t ue4m3_code(float x) {
  if (!(x > 0.0f)) return 0;
  x = std::min(x, 448.0f);
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int exponent = static_cast<int>((bits >> 23) & 0xFF) - 127 + 7;
  if (exponent <= 0) {  // subnormal: mantissa * 2^-9, rounded half up
    const int mantissa = std::min(7, static_cast<int>(x * 512.0f + 0.5f));
    return mantissa < 1 ? 0 : static_cast<uint8_t>(mantissa);
  }
  int mantissa = static_cast<int>((bits >> 20) & 0x7) + static_cast<int>((bits >> 19) & 1);
  if (mantissa > 7) {
    mantissa = 0;
    ++exponent;
  }
  return exponent >= 15 ? 0x7E : static_cast<uint8_t>((exponent << 3) | mantissa);
}

// ggml_ue4m3_to_fp32 (half the scale, as e2m1's values are stored doubled) for every code; 0x7F is 0.
const std::vector<float>& ue4m3_half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> half(256, 0.0f);
    for (int code = 1; code < 0x7F; ++code) {
      const int exponent = (code >> 3) & 0xF, mantissa = code & 0x7;
      const float raw = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                      : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
      half[code] = raw * 0.5f;
    }
    return half;
  }();
  return table;
}

// C's roundf (half away from zero) without the float error of floor(|x| + 0.5).
torch::Tensor round_half_away(const torch::Tensor& x) {
  auto magnitude = x.abs();
  auto floored = magnitude.floor();
  return x.sign() * (floored + (2 * (magnitude - floored)).floor());
}

// 1 / d, and 0 where d is 0 (an all-zero block then codes every element as zero).
torch::Tensor inverse_or_zero(const torch::Tensor& d) {
  return torch::where(d == 0, torch::zeros_like(d), d.reciprocal());
}

// An exact float32 division by an integer (a tensor divisor: ATen may turn a division by a scalar into
// a multiplication by its rounded reciprocal).
torch::Tensor divide_by(const torch::Tensor& x, double divisor) { return x / torch::full_like(x, divisor); }

// The e8m0 exponent of each block's absolute maximum, with C's log2f (torch's vectorised log2 may round
// differently, and one unit decides the exponent next to a power of two). An exponent below 0, reachable
// only for blocks whose maximum is under 2^-125, is held at 0 (ggml's uint8 cast would wrap).
torch::Tensor mxfp4_exponent(const torch::Tensor& amax) {
  auto host = amax.to(torch::kCPU, torch::kFloat32).contiguous();
  auto exponent = torch::empty_like(host);
  const float* in = host.data_ptr<float>();
  float* out = exponent.data_ptr<float>();
  for (int64_t i = 0; i < host.numel(); ++i)
    out[i] = in[i] > 0 ? std::max(0.0f, std::floor(std::log2f(in[i])) - 2.0f + 127.0f) : 0.0f;
  return exponent.to(amax.device());
}

// 2^(e - 128) for e8m0 exponents e (ggml_e8m0_to_fp32_half), exactly, subnormals included: a table
// made once with ldexp (a vectorised exp2 need not be exact).
const std::vector<float>& e8m0_half_table() {
  static const std::vector<float> table = [] {
    std::vector<float> powers(256);
    for (int e = 0; e < 256; ++e) powers[e] = std::ldexp(1.0f, e - 128);
    return powers;
  }();
  return table;
}

class GgmlQuantizer final : public Quantizer {
 public:
  GgmlQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    const auto names = type_names();
    if (!params.has("type"))
      params.reject(fmt::format("needs a type ({}), e.g. params: {{type: q4_0}}", fmt::join(names, ", ")));
    const std::string name = params.choice("type", "q8_0", names);
    for (const auto& info : kTypes)
      if (name == info.name) info_ = info;
    rotate_ = params.boolean("rotate", false);
    prefill_quantized_ = params.choice("prefill", "quantized", {"quantized", "full_precision"}) == "quantized";
    if (head_dim % info_.block != 0)
      params.reject(fmt::format("head_dim {} is not a multiple of {}'s block of {} channels", head_dim, info_.name,
                                info_.block));
    if (rotate_ && !quant::has_hadamard(head_dim))
      params.reject(fmt::format("rotate: head_dim {} has no Hadamard construction (supported: {})", head_dim,
                                quant::hadamard_dims()));
  }

  std::string method() const override { return "ggml"; }
  ParamMap resolved_params() const override {
    return {{"type", info_.name},
            {"rotate", rotate_ ? "true" : "false"},
            {"prefill", prefill_quantized_ ? "quantized" : "full_precision"}};
  }
  // Every token is quantized when written, so the step's own token is read quantized too, and by
  // default (as in llama.cpp) the prefill reads its own positions quantized.
  RolePolicy policy(Role) const override { return {0, 1, 1, prefill_quantized_}; }

  QuantizedTiles quantize(const torch::Tensor& x, Role, int64_t) const override {
    const int64_t n = x.size(0), tokens = x.size(1);
    auto frame = rotate_ ? quant::hadamard_rotate(x) : x.to(torch::kFloat32);
    auto groups = frame.reshape({n, tokens, head_dim_ / info_.group, info_.group});
    QuantizedTiles tiles;
    switch (info_.type) {
      case GgmlType::MXFP4: tiles = quantize_mxfp4(groups); break;
      case GgmlType::NVFP4: tiles = quantize_nvfp4(groups); break;
      case GgmlType::IQ4_NL: tiles = quantize_iq4_nl(groups); break;
      default: tiles = quantize_integer(groups);
    }
    tiles.codes = tiles.codes.reshape({n, tokens, head_dim_});
    tiles.bits = info_.code_bits;
    tiles.stored_code_bits = info_.stored_bits;
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1);
    const auto codes = tiles.codes.reshape({n, tokens, head_dim_ / info_.group, info_.group});
    torch::Tensor groups;
    switch (info_.type) {
      case GgmlType::MXFP4:
      case GgmlType::NVFP4: {
        const bool mx = info_.type == GgmlType::MXFP4;
        const auto& scale_codes = tiles.params.at(mx ? "exponent" : "ue4m3_scale").values;
        auto d = lookup(mx ? e8m0_half_table() : ue4m3_half_table(), scale_codes).unsqueeze(-1);
        groups = d * e2m1_doubled(scale_codes.options()).index({codes.to(torch::kLong)});
        break;
      }
      case GgmlType::IQ4_NL: {
        const auto& d = tiles.params.at("scale").values;
        auto grid = torch::tensor(std::vector<float>(std::begin(kIq4nlValues), std::end(kIq4nlValues)), d.options());
        groups = d.unsqueeze(-1) * grid.index({codes.to(torch::kLong)});
        break;
      }
      default: {
        auto code_values = codes.to(torch::kFloat32);
        auto d = tiles.params.at("scale").values.unsqueeze(-1);
        // Products and sums in ggml's order, each rounded once (no fused multiply-add).
        groups = info_.has_minimum ? code_values * d + tiles.params.at("minimum").values.unsqueeze(-1)
                                   : (code_values - static_cast<double>(offset())) * d;
      }
    }
    auto restored = groups.reshape({n, tokens, head_dim_});
    return rotate_ ? quant::hadamard_unrotate(restored) : restored;
  }

 private:
  // The code of the value 0 for the symmetric types (q8_0 stores roundf's -127..127 shifted by 128).
  int64_t offset() const {
    return info_.type == GgmlType::Q8_0 ? 128 : int64_t{1} << (info_.code_bits - 1);
  }

  QuantizedTiles quantize_integer(const torch::Tensor& blocks) const {
    const double levels = static_cast<double>((int64_t{1} << info_.code_bits) - 1);
    QuantizedTiles tiles;
    torch::Tensor d, codes;
    if (info_.has_minimum) {
      auto low = std::get<0>(blocks.min(-1, /*keepdim=*/true));
      auto high = std::get<0>(blocks.max(-1, /*keepdim=*/true));
      d = divide_by(high - low, levels);
      codes = torch::trunc((blocks - low) * inverse_or_zero(d) + 0.5);
      tiles.params["minimum"] = quant::stored_param(low.squeeze(-1), StoredDtype::Float16);
    } else if (info_.type == GgmlType::Q8_0) {
      d = divide_by(std::get<0>(blocks.abs().max(-1, /*keepdim=*/true)), 127.0);
      codes = round_half_away(blocks * inverse_or_zero(d)) + static_cast<double>(offset());
    } else {
      // The signed value of largest magnitude (the first of equal magnitudes) maps to code 0.
      auto signed_max = blocks.gather(-1, blocks.abs().argmax(-1, /*keepdim=*/true));
      const double half_range = static_cast<double>(offset());
      d = divide_by(signed_max, -half_range);
      codes = torch::trunc(blocks * inverse_or_zero(d) + (half_range + 0.5));
    }
    tiles.codes = codes.clamp(0.0, levels).to(torch::kUInt8);
    tiles.params["scale"] = quant::stored_param(d.squeeze(-1), StoredDtype::Float16);
    return tiles;
  }

  // quantize_row_iq4_nl_ref, one block at a time on the host: the codes against d0 = max / -127 (the
  // signed maximum, first of equal magnitudes), then d = sum(w v x) / sum(w v^2) with w = x^2, summed
  // in element order. A block under ggml's GROUP_MAX_EPS (1e-15) gets d = 0 and code 8 (the value +1;
  // ggml leaves its codes unset there), so it dequantizes to +0.
  QuantizedTiles quantize_iq4_nl(const torch::Tensor& blocks) const {
    auto host = blocks.to(torch::kCPU, torch::kFloat32).contiguous();
    const int64_t width = blocks.size(-1), count = host.numel() / width;
    auto codes = torch::empty({count, width}, torch::kUInt8);
    auto scales = torch::zeros({count}, torch::kFloat32);
    const float* x = host.data_ptr<float>();
    uint8_t* code = codes.data_ptr<uint8_t>();
    float* scale = scales.data_ptr<float>();
    for (int64_t b = 0; b < count; ++b, x += width, code += width) {
      float amax = 0.0f, max = 0.0f;
      for (int64_t j = 0; j < width; ++j) {
        if (std::fabs(x[j]) > amax) {
          amax = std::fabs(x[j]);
          max = x[j];
        }
      }
      if (amax < 1e-15f) {
        std::fill(code, code + width, uint8_t{8});
        continue;
      }
      const float inverse = 1.0f / (max / static_cast<float>(kIq4nlValues[0]));
      float sum_qx = 0.0f, sum_q2 = 0.0f;
      for (int64_t j = 0; j < width; ++j) {
        code[j] = static_cast<uint8_t>(iq4nl_index(inverse * x[j]));
        const float q = kIq4nlValues[code[j]], w = x[j] * x[j];
        sum_qx += w * q * x[j];
        sum_q2 += w * q * q;
      }
      scale[b] = sum_qx / sum_q2;
    }
    QuantizedTiles tiles;
    tiles.codes = codes.reshape(blocks.sizes()).to(blocks.device());
    auto scale_shape = blocks.sizes().vec();
    scale_shape.pop_back();
    tiles.params["scale"] = quant::stored_param(scales.reshape(scale_shape).to(blocks.device()), StoredDtype::Float16);
    return tiles;
  }

  QuantizedTiles quantize_mxfp4(const torch::Tensor& blocks) const {
    auto exponent = mxfp4_exponent(std::get<0>(blocks.abs().max(-1, /*keepdim=*/true)));
    QuantizedTiles tiles;
    tiles.codes = nearest_e2m1(blocks, lookup(e8m0_half_table(), exponent));
    tiles.params["exponent"] = quant::stored_param(exponent.squeeze(-1), StoredDtype::UInt8);
    return tiles;
  }

  // quantize_row_nvfp4_ref per 16-channel group: the ue4m3 code of amax / 6 (float32 division), then
  // mxfp4's nearest e2m1 value under half that scale. ggml stores no float32 tensor scale beside it.
  QuantizedTiles quantize_nvfp4(const torch::Tensor& groups) const {
    auto amax = std::get<0>(groups.abs().max(-1)).to(torch::kCPU, torch::kFloat32).contiguous();
    auto scale_codes = torch::empty(amax.sizes(), torch::kUInt8);
    const float* in = amax.data_ptr<float>();
    uint8_t* out = scale_codes.data_ptr<uint8_t>();
    for (int64_t i = 0; i < amax.numel(); ++i) out[i] = ue4m3_code(in[i] / 6.0f);
    scale_codes = scale_codes.to(groups.device());
    QuantizedTiles tiles;
    tiles.codes = nearest_e2m1(groups, lookup(ue4m3_half_table(), scale_codes).unsqueeze(-1));
    tiles.params["ue4m3_scale"] = quant::stored_param(scale_codes.to(torch::kFloat32), StoredDtype::UInt8);
    return tiles;
  }

  int64_t head_dim_;
  GgmlTypeInfo info_ = kTypes[0];
  bool rotate_ = false;
  bool prefill_quantized_ = true;
};

}  // namespace

std::unique_ptr<Quantizer> make_ggml(ParamReader& params, int64_t head_dim) {
  return std::make_unique<GgmlQuantizer>(params, head_dim);
}

}  // namespace kvdrift
