// `kvarn`: KVarN (SPEC §2). Each tile of G tokens x D channels is Hadamard-rotated, variance-normalized
// by alternating column and row log scales (VarN), and then quantized with asymmetric min/max RTN:
// keys per channel across the tile's tokens, values per token. The VarN scales are stored with the RTN
// parameters and folded back at dequantization. Every step is batched over the N tiles on their device.
#include <cmath>
#include <utility>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

constexpr double kScaleEps = 1e-10;  // RTN scale guard (spec)
// VarN clips (spec): each std update is clipped to [1e-3, 1e3] before its log, and the accumulated log
// scales to [-0.3, 10], so a constant or all-zero tile moves the scales by a bounded amount (never to
// log 0) and stays finite.
constexpr double kStdMin = 1e-3, kStdMax = 1e3;
constexpr double kLogScaleMin = -0.3, kLogScaleMax = 10.0;
constexpr double kImbalanceFloor = 1e-8;

// Unbiased (N - 1) std along `dim`, two-pass: several times faster than aten::std on the CPU LibTorch,
// where VarN spends most of its time in these reductions.
torch::Tensor unbiased_std(const torch::Tensor& t, int64_t dim) {
  const auto centered = t - t.mean(dim, /*keepdim=*/true);
  return ((centered * centered).sum(dim) / static_cast<double>(t.size(dim) - 1)).sqrt();
}
// Of each column ([N, C]) and of each row ([N, R]) of t [N, R, C].
torch::Tensor column_std(const torch::Tensor& t) { return unbiased_std(t, 1); }
torch::Tensor row_std(const torch::Tensor& t) { return unbiased_std(t, 2); }

// max/min std ratio over columns plus over rows, per tile [N]; 2 means perfectly balanced.
torch::Tensor imbalance(const torch::Tensor& columns_std, const torch::Tensor& rows_std) {
  return std::get<0>(columns_std.max(-1)) / std::get<0>(columns_std.min(-1)).clamp_min(kImbalanceFloor) +
         std::get<0>(rows_std.max(-1)) / std::get<0>(rows_std.min(-1)).clamp_min(kImbalanceFloor);
}

// (T / Sc) / Sr with a column scale Sc [N, C] and a row scale Sr [N, R], in the spec's order.
torch::Tensor normalize(const torch::Tensor& t, const torch::Tensor& column_scale, const torch::Tensor& row_scale) {
  return t / column_scale.unsqueeze(1) / row_scale.unsqueeze(2);
}

// One log-scale update: a + log(clip(std)), clipped.
torch::Tensor update_log_scale(const torch::Tensor& log_scale, const torch::Tensor& stds) {
  return (log_scale + stds.clamp(kStdMin, kStdMax).log()).clamp(kLogScaleMin, kLogScaleMax);
}

struct VarN {
  torch::Tensor normalized;    // B = (T / Sc) / Sr, [N, R, C]
  torch::Tensor column_scale;  // Sc [N, C]
  torch::Tensor row_scale;     // Sr [N, R]
};

// VarN of SPEC §2 on float32 t [N, R, C]. The best iterate (lowest imbalance, ties to the later one) is
// chosen per tile with torch::where, so nothing leaves the device. The matrix normalized by the current
// (a, b) and its column stds are carried from one iteration's imbalance to the next one's column
// update, which the pseudo-code computes twice on the same values.
VarN variance_normalize(const torch::Tensor& t, int64_t iters) {
  const int64_t n = t.size(0), rows = t.size(1), columns = t.size(2);
  auto log_column = torch::zeros({n, columns}, t.options());
  auto log_row = torch::zeros({n, rows}, t.options());
  auto columns_std = column_std(t);
  auto best = imbalance(columns_std, row_std(t));
  auto column_scale = torch::ones({n, columns}, t.options());
  auto row_scale = torch::ones({n, rows}, t.options());
  for (int64_t iter = 0; iter < iters; ++iter) {
    log_column = update_log_scale(log_column, columns_std);
    log_row = update_log_scale(log_row, row_std(normalize(t, log_column.exp(), log_row.exp())));
    const auto candidate_column = log_column.exp(), candidate_row = log_row.exp();
    const auto normalized = normalize(t, candidate_column, candidate_row);
    columns_std = column_std(normalized);
    const auto current = imbalance(columns_std, row_std(normalized));
    const auto better = current <= best;
    best = torch::where(better, current, best);
    column_scale = torch::where(better.unsqueeze(-1), candidate_column, column_scale);
    row_scale = torch::where(better.unsqueeze(-1), candidate_row, row_scale);
  }
  return {normalize(t, column_scale, row_scale), column_scale, row_scale};
}

// Code widths (k_bits, v_bits) of a preset.
std::pair<int64_t, int64_t> preset_bits(const std::string& preset) {
  if (preset == "k2v2") return {2, 2};
  if (preset == "k4v4") return {4, 4};
  return {4, 2};  // k4v2, the authors' shipped configuration
}

class KVarNQuantizer final : public Quantizer {
 public:
  KVarNQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    const std::string preset = params.choice("preset", "k4v2", {"k4v2", "k2v2", "k4v4"});
    const auto [preset_k, preset_v] = preset_bits(preset);
    k_bits_ = params.integer("k_bits", preset_k, 2, 8);
    v_bits_ = params.integer("v_bits", preset_v, 2, 8);
    tile_size_ = params.integer("tile_size", 128, 2, 1024);
    iters_ = params.integer("iters", 8, 0, 64);
    rotate_ = params.boolean("rotate", true);
    sink_ = params.boolean("sink", true);
    scale_dtype_ = quant::read_scale_dtype(params);
    zero_dtype_ = quant::read_zero_dtype(params, scale_dtype_);
    round_before_codes_ = quant::read_round_before_codes(params);
    if (params.has("preset") && (params.has("k_bits") || params.has("v_bits")))
      params.reject("give either preset or k_bits/v_bits, not both");
    if ((tile_size_ & (tile_size_ - 1)) != 0)
      params.reject(fmt::format("tile_size {} is not a power of two", tile_size_));
    // The unbiased std across the channels of a token needs at least two of them.
    if (head_dim_ < 2) params.reject(fmt::format("head_dim {} is too small (at least 2)", head_dim_));
    if (rotate_ && !quant::has_hadamard(head_dim_))
      params.reject(fmt::format("rotate needs a Hadamard construction for head_dim {} ({}); use rotate=false",
                                head_dim_, quant::hadamard_dims()));
  }

  std::string method() const override { return "kvarn"; }

  ParamMap resolved_params() const override {
    // preset names the resolved widths, so explicit k_bits/v_bits show up as e.g. "k3v2".
    return {{"preset", fmt::format("k{}v{}", k_bits_, v_bits_)},
            {"k_bits", std::to_string(k_bits_)},
            {"v_bits", std::to_string(v_bits_)},
            {"tile_size", std::to_string(tile_size_)},
            {"iters", std::to_string(iters_)},
            {"rotate", rotate_ ? "true" : "false"},
            {"sink", sink_ ? "true" : "false"},
            {"scale_dtype", stored_dtype_name(scale_dtype_)},
            {"zero_dtype", stored_dtype_name(zero_dtype_)},
            {"scale_rounding", quant::scale_rounding_name(round_before_codes_)}};
  }

  RolePolicy policy(Role) const override { return {sink_ ? tile_size_ : 0, tile_size_, 0}; }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t) const override {
    if (x.dim() != 3 || x.size(2) != head_dim_)
      fail("quantizer 'kvarn': expected tiles [N, tokens, {}], got [{}]", head_dim_, fmt::join(x.sizes(), ", "));
    if (x.size(1) != tile_size_)
      fail("quantizer 'kvarn': a tile must hold exactly tile_size = {} tokens, got {}", tile_size_, x.size(1));
    auto x32 = x.to(torch::kFloat32);
    auto rotated = rotate_ ? quant::hadamard_rotate(x32) : x32;
    // Keys: T = K_rot^T (rows = channels, columns = tokens): Sc is a token scale, stored as kT, Sr a
    // channel scale, RTN per channel; kS = Sr s, kZ = Sr lo. Values: T = V_rot (rows = tokens): Sc is
    // a channel scale, stored as vC, Sr a token scale, RTN per token; vS = Sr s, vZ = Sr lo.
    const bool key = role == Role::Key;
    const int64_t bits = key ? k_bits_ : v_bits_;
    const auto t = key ? rotated.transpose(1, 2) : rotated;
    const auto varn = variance_normalize(t, iters_);
    // before_codes: the column scale as stored normalizes the tile, so the RTN range and the codes
    // follow what dequantization multiplies back.
    const auto column_scale =
        round_before_codes_ ? quant::round_to_storage(varn.column_scale, scale_dtype_) : varn.column_scale;
    const auto normalized = round_before_codes_ ? normalize(t, column_scale, varn.row_scale) : varn.normalized;
    const auto rtn = quant::quantize_minmax(normalized, bits, kScaleEps);
    const std::string column_name = key ? "kT" : "vC", scale_name = key ? "kS" : "vS", zero_name = key ? "kZ" : "vZ";
    QuantizedTiles tiles;
    tiles.bits = bits;
    store(tiles, column_name, column_scale);                                       // [N, C]
    store(tiles, scale_name, varn.row_scale * rtn.scale.squeeze(-1));              // [N, R]
    store(tiles, zero_name, varn.row_scale * rtn.minimum.squeeze(-1), zero_dtype_);  // [N, R]
    auto codes = rtn.codes;  // [N, R, C]
    if (round_before_codes_) {
      // T[r, c] / column[c] = q[r, c] scale[r] + zero[r], with the parameters as stored.
      const auto& p = tiles.params;
      codes = quant::minmax_codes(t / p.at(column_name).values.unsqueeze(1), p.at(scale_name).values.unsqueeze(2),
                                  p.at(zero_name).values.unsqueeze(2), bits);
    }
    tiles.codes = key ? codes.transpose(1, 2).contiguous() : codes;  // token-major [N, T, D]
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t) const override {
    auto codes = tiles.codes.to(torch::kFloat32);  // [N, T, D]
    const auto& p = tiles.params;
    torch::Tensor rotated;
    if (role == Role::Key) {
      // K_rot[t, d] = (q[d, t] kS[d] + kZ[d]) kT[t]
      rotated =
          (codes * p.at("kS").values.unsqueeze(1) + p.at("kZ").values.unsqueeze(1)) * p.at("kT").values.unsqueeze(2);
    } else {
      // V_rot[t, d] = (q[t, d] vS[t] + vZ[t]) vC[d]
      rotated =
          (codes * p.at("vS").values.unsqueeze(2) + p.at("vZ").values.unsqueeze(2)) * p.at("vC").values.unsqueeze(1);
    }
    return rotate_ ? quant::hadamard_unrotate(rotated) : rotated;
  }

 private:
  // after_codes: parameters are computed (and codes derived) in float32, then rounded to their storage
  // dtype, as the authors' kernels do (docs/quantizers.md).
  void store(QuantizedTiles& tiles, const std::string& name, const torch::Tensor& values) const {
    store(tiles, name, values, scale_dtype_);
  }
  static void store(QuantizedTiles& tiles, const std::string& name, const torch::Tensor& values,
                    StoredDtype dtype) {
    tiles.params[name] = quant::stored_param(values, dtype);
  }

  int64_t head_dim_, k_bits_, v_bits_, tile_size_, iters_;
  bool rotate_, sink_, round_before_codes_ = false;
  StoredDtype scale_dtype_, zero_dtype_;
};

}  // namespace

std::unique_ptr<Quantizer> make_kvarn(ParamReader& params, int64_t head_dim) {
  return std::make_unique<KVarNQuantizer>(params, head_dim);
}

}  // namespace kvdrift
