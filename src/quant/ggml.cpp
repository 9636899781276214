// `ggml`: the KV cache types llama.cpp ships (`-ctk/-ctv`), each token vector quantized in blocks of 32
// channels as soon as it is written. The parameter `type` picks the format, written from ggml's
// reference quantizers (ggml-quants.c, quantize_row_*_ref) as the `gguf` package's numpy port states
// them (gguf 0.19.0, gguf/quants.py), and checked bit for bit against that port
// (tests/oracle/test_ggml_formats.py):
//   q8_0  d = amax / 127,              q = roundf(x / d)                  x_hat = q d            8.5 bits
//   q4_0  d = max / -8 (signed max),   q = min(15, trunc(x / d + 8.5))    x_hat = (q - 8) d      4.5 bits
//   q5_0  d = max / -16,               q = min(31, trunc(x / d + 16.5))   x_hat = (q - 16) d     5.5 bits
//   q4_1  d = (max - min) / 15,        q = min(15, trunc((x - min) / d + 0.5))  x_hat = q d + m  5 bits
//   q5_1  d = (max - min) / 31,        q = min(31, trunc((x - min) / d + 0.5))  x_hat = q d + m  6 bits
//   mxfp4 e = floor(log2 amax) - 2 + 127 (e8m0), d = 2^(e - 128); q = the e2m1 value (doubled) nearest
//         x / d, first on ties; x_hat = d * value                                                 4.25 bits
// d and m are stored as float16; the codes are computed against the float32 d (ggml's order, as
// `scale_rounding: after_codes`) through its reciprocal (x * (1/d), not x / d), exactly as ggml does.
// `rotate: true` applies the orthonormal Hadamard rotation of the head dimension first (llama.cpp
// rotates quantized K/V); the rotation is quant/hadamard.h's, not llama.cpp's own kernel.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

constexpr int64_t kBlock = 32;

enum class GgmlType { Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4 };
struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  int64_t code_bits;     // the code's range is [0, 2^code_bits)
  int64_t stored_bits;   // bits the format spends per code (q5's fifth bit sits in a 32-bit word per block)
  bool has_minimum;      // the _1 types store a minimum m beside d
};
constexpr GgmlTypeInfo kTypes[] = {
    {GgmlType::Q8_0, "q8_0", 8, 8, false},  {GgmlType::Q4_0, "q4_0", 4, 4, false},
    {GgmlType::Q4_1, "q4_1", 4, 4, true},   {GgmlType::Q5_0, "q5_0", 5, 5, false},
    {GgmlType::Q5_1, "q5_1", 5, 5, true},   {GgmlType::MXFP4, "mxfp4", 4, 4, false},
};

// e2m1's values doubled, indexed by the 4-bit code (ggml's kvalues_mxfp4; code 8 is -0), as a tensor
// with `options`.
torch::Tensor e2m1_doubled(const torch::TensorOptions& options) {
  static const float values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  return torch::from_blob(const_cast<float*>(values), {16}, torch::kFloat32).to(options);
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
torch::Tensor mxfp4_half_scale(const torch::Tensor& exponent) {
  static const std::vector<float> table = [] {
    std::vector<float> powers(256);
    for (int e = 0; e < 256; ++e) powers[e] = std::ldexp(1.0f, e - 128);
    return powers;
  }();
  auto on_device = torch::from_blob(const_cast<float*>(table.data()), {256}, torch::kFloat32).to(exponent.device());
  return on_device.index({exponent.to(torch::kLong)});
}

class GgmlQuantizer final : public Quantizer {
 public:
  GgmlQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    if (!params.has("type"))
      params.reject("needs a type (q8_0, q4_0, q4_1, q5_0, q5_1 or mxfp4), e.g. params: {type: q4_0}");
    const std::string name = params.choice("type", "q8_0", {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4"});
    for (const auto& info : kTypes)
      if (name == info.name) info_ = info;
    rotate_ = params.boolean("rotate", false);
    if (head_dim % kBlock != 0)
      params.reject(fmt::format("head_dim {} is not a multiple of ggml's block of {} channels", head_dim, kBlock));
    if (rotate_ && !quant::has_hadamard(head_dim))
      params.reject(fmt::format("rotate: head_dim {} has no Hadamard construction (supported: {})", head_dim,
                                quant::hadamard_dims()));
  }

  std::string method() const override { return "ggml"; }
  ParamMap resolved_params() const override { return {{"type", info_.name}, {"rotate", rotate_ ? "true" : "false"}}; }
  // Every token is quantized when written, so the step's own token is read quantized too.
  RolePolicy policy(Role) const override { return {0, 1, 1}; }

  QuantizedTiles quantize(const torch::Tensor& x, Role, int64_t) const override {
    const int64_t n = x.size(0), tokens = x.size(1);
    auto frame = rotate_ ? quant::hadamard_rotate(x) : x.to(torch::kFloat32);
    auto blocks = frame.reshape({n, tokens, head_dim_ / kBlock, kBlock});
    QuantizedTiles tiles = info_.type == GgmlType::MXFP4 ? quantize_mxfp4(blocks) : quantize_integer(blocks);
    tiles.codes = tiles.codes.reshape({n, tokens, head_dim_});
    tiles.bits = info_.code_bits;
    tiles.stored_code_bits = info_.stored_bits;
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1);
    const std::vector<int64_t> block_shape = {n, tokens, head_dim_ / kBlock, kBlock};
    torch::Tensor blocks;
    if (info_.type == GgmlType::MXFP4) {
      auto values = e2m1_doubled(tiles.params.at("exponent").values.options());
      auto d = mxfp4_half_scale(tiles.params.at("exponent").values).unsqueeze(-1);
      blocks = d * values.index({tiles.codes.to(torch::kLong).reshape(block_shape)});
    } else {
      auto codes = tiles.codes.to(torch::kFloat32).reshape(block_shape);
      auto d = tiles.params.at("scale").values.unsqueeze(-1);
      // Products and sums in ggml's order, each rounded once (no fused multiply-add).
      blocks = info_.has_minimum ? codes * d + tiles.params.at("minimum").values.unsqueeze(-1)
                                 : (codes - static_cast<double>(offset())) * d;
    }
    auto restored = blocks.reshape({n, tokens, head_dim_});
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

  QuantizedTiles quantize_mxfp4(const torch::Tensor& blocks) const {
    auto exponent = mxfp4_exponent(std::get<0>(blocks.abs().max(-1, /*keepdim=*/true)));
    auto d = mxfp4_half_scale(exponent);
    auto distance = (d.unsqueeze(-1) * e2m1_doubled(blocks.options()) - blocks.unsqueeze(-1)).abs();  // [..., 32, 16]
    QuantizedTiles tiles;
    tiles.codes = distance.argmin(-1).to(torch::kUInt8);
    tiles.params["exponent"] = quant::stored_param(exponent.squeeze(-1), StoredDtype::UInt8);
    return tiles;
  }

  int64_t head_dim_;
  GgmlTypeInfo info_ = kTypes[0];
  bool rotate_ = false;
};

}  // namespace

std::unique_ptr<Quantizer> make_ggml(ParamReader& params, int64_t head_dim) {
  return std::make_unique<GgmlQuantizer>(params, head_dim);
}

}  // namespace kvdrift
