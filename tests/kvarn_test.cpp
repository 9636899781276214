// KVarN against independent scalar loops: with iters = 0 and no rotation it is plain min/max RTN (per
// channel for keys, per token for values); with VarN on, its scales follow SPEC §2's pseudo-code
// computed here in double. Plus the edge cases (constant tiles), parameter checks and storage cost.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "metrics/token_scale.h"
#include "quant/quantizer.h"
#include "support.h"

namespace kvdrift {
namespace {

using Matrix = std::vector<std::vector<double>>;  // [rows][columns]

// Tile n of x [N, T, D] as a matrix with rows = channels (keys) or rows = tokens (values).
Matrix tile_matrix(const torch::Tensor& x, int64_t n, Role role) {
  auto a = x.accessor<float, 3>();
  const int64_t tokens = x.size(1), dim = x.size(2);
  const bool keys = role == Role::Key;
  Matrix m(keys ? dim : tokens, std::vector<double>(keys ? tokens : dim));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t d = 0; d < dim; ++d) (keys ? m[d][t] : m[t][d]) = a[n][t][d];
  return m;
}

double stddev(const std::vector<double>& v) {
  double mean = 0, sq = 0;
  for (double e : v) mean += e;
  mean /= static_cast<double>(v.size());
  for (double e : v) sq += (e - mean) * (e - mean);
  return std::sqrt(sq / static_cast<double>(v.size() - 1));
}

std::vector<double> column_stds(const Matrix& m) {
  std::vector<double> out;
  for (size_t c = 0; c < m[0].size(); ++c) {
    std::vector<double> column;
    for (const auto& row : m) column.push_back(row[c]);
    out.push_back(stddev(column));
  }
  return out;
}

std::vector<double> row_stds(const Matrix& m) {
  std::vector<double> out;
  for (const auto& row : m) out.push_back(stddev(row));
  return out;
}

double ratio(const std::vector<double>& v) {
  return *std::max_element(v.begin(), v.end()) / std::max(*std::min_element(v.begin(), v.end()), 1e-8);
}

Matrix normalized(const Matrix& t, const std::vector<double>& a, const std::vector<double>& b) {
  Matrix m = t;
  for (size_t r = 0; r < m.size(); ++r)
    for (size_t c = 0; c < m[r].size(); ++c) m[r][c] = t[r][c] / std::exp(a[c]) / std::exp(b[r]);
  return m;
}

struct LoopVarN {
  std::vector<double> column_scale, row_scale;
};

// SPEC §2's VarN pseudo-code, literally.
LoopVarN loop_varn(const Matrix& t, int iters) {
  std::vector<double> a(t[0].size(), 0.0), b(t.size(), 0.0);
  double best = ratio(column_stds(t)) + ratio(row_stds(t));
  LoopVarN result{std::vector<double>(a.size(), 1.0), std::vector<double>(b.size(), 1.0)};
  for (int i = 0; i < iters; ++i) {
    const auto cs = column_stds(normalized(t, a, b));
    for (size_t c = 0; c < a.size(); ++c) a[c] = std::clamp(a[c] + std::log(std::clamp(cs[c], 1e-3, 1e3)), -0.3, 10.0);
    const auto rs = row_stds(normalized(t, a, b));
    for (size_t r = 0; r < b.size(); ++r) b[r] = std::clamp(b[r] + std::log(std::clamp(rs[r], 1e-3, 1e3)), -0.3, 10.0);
    const Matrix m = normalized(t, a, b);
    const double imb = ratio(column_stds(m)) + ratio(row_stds(m));
    if (imb <= best) {
      best = imb;
      for (size_t c = 0; c < a.size(); ++c) result.column_scale[c] = std::exp(a[c]);
      for (size_t r = 0; r < b.size(); ++r) result.row_scale[r] = std::exp(b[r]);
    }
  }
  return result;
}

std::unique_ptr<Quantizer> kvarn(const ParamMap& params, int64_t head_dim) {
  return make_quantizer("kvarn", params, head_dim);
}

// Tokens of very different magnitudes (token_spread: std of their log scale) and a few outlier channels
// (outlier_gain times the others): what VarN is for.
torch::Tensor skewed_tiles(int64_t n, int64_t tokens, int64_t dim, double token_spread = 1.0,
                           double outlier_gain = 20.0) {
  torch::manual_seed(7);
  auto x = torch::randn({n, tokens, dim}) * torch::exp(token_spread * torch::randn({n, tokens, 1}));
  x.narrow(2, 0, 3).mul_(outlier_gain);
  return x;
}

double relative_mse(const torch::Tensor& x, const torch::Tensor& y) {
  return ((x - y).pow(2).sum() / x.pow(2).sum()).item<double>();
}

TEST(KVarN, WithoutRotationOrVarNIsPlainMinMaxRtn) {
  const int64_t tokens = 16, dim = 8;
  auto q = kvarn({{"k_bits", "3"},
                  {"v_bits", "5"},
                  {"iters", "0"},
                  {"rotate", "false"},
                  {"tile_size", "16"},
                  {"scale_dtype", "float32"}},
                 dim);
  const auto x = skewed_tiles(3, tokens, dim);
  for (Role role : {Role::Key, Role::Value}) {
    const auto tiles = q->quantize(x, role, 0);
    const int64_t bits = role == Role::Key ? 3 : 5;
    ASSERT_EQ(tiles.bits, bits);
    ASSERT_EQ(tiles.codes.sizes(), x.sizes());
    const auto xhat = q->dequantize(tiles, role, 0);
    auto codes = tiles.codes.accessor<uint8_t, 3>();
    auto out = xhat.accessor<float, 3>();
    for (int64_t n = 0; n < x.size(0); ++n) {
      // RTN along each row of the matrix (channels for keys, tokens for values), in float32.
      const Matrix m = tile_matrix(x, n, role);
      for (size_t r = 0; r < m.size(); ++r) {
        float lo = static_cast<float>(m[r][0]), hi = lo;
        for (double e : m[r]) lo = std::min(lo, static_cast<float>(e)), hi = std::max(hi, static_cast<float>(e));
        const float s = std::max((hi - lo) / static_cast<float>((1 << bits) - 1), 1e-10f);
        for (size_t c = 0; c < m[r].size(); ++c) {
          const int64_t t = role == Role::Key ? c : r, d = role == Role::Key ? r : c;
          const float code = std::min(std::max(std::nearbyint((static_cast<float>(m[r][c]) - lo) / s), 0.0f),
                                      static_cast<float>((1 << bits) - 1));
          ASSERT_EQ(codes[n][t][d], code) << role_name(role) << " tile " << n << " t " << t << " d " << d;
          ASSERT_EQ(out[n][t][d], code * s + lo) << role_name(role) << " tile " << n << " t " << t << " d " << d;
        }
      }
    }
  }
}

TEST(KVarN, VarNScalesFollowTheSpecPseudoCode) {
  const int64_t tokens = 16, dim = 8, iters = 8;
  auto q = kvarn(
      {{"iters", std::to_string(iters)}, {"rotate", "false"}, {"tile_size", "16"}, {"scale_dtype", "float32"}}, dim);
  const auto x = skewed_tiles(2, tokens, dim);
  for (Role role : {Role::Key, Role::Value}) {
    const auto tiles = q->quantize(x, role, 0);
    // Keys: columns are tokens (kT), rows channels (kS = Sr s). Values: columns channels (vC), rows tokens.
    const auto& column_param = tiles.params.at(role == Role::Key ? "kT" : "vC").values;
    const auto& row_scale_param = tiles.params.at(role == Role::Key ? "kS" : "vS").values;
    const auto& row_min_param = tiles.params.at(role == Role::Key ? "kZ" : "vZ").values;
    const int64_t bits = role == Role::Key ? 4 : 2;
    for (int64_t n = 0; n < x.size(0); ++n) {
      const Matrix t = tile_matrix(x, n, role);
      const auto varn = loop_varn(t, iters);
      for (size_t c = 0; c < t[0].size(); ++c)
        EXPECT_NEAR(column_param[n][c].item<double>(), varn.column_scale[c], 1e-4 * varn.column_scale[c]);
      for (size_t r = 0; r < t.size(); ++r) {
        double lo = INFINITY, hi = -INFINITY;
        for (size_t c = 0; c < t[r].size(); ++c) {
          const double b = t[r][c] / varn.column_scale[c] / varn.row_scale[r];
          lo = std::min(lo, b), hi = std::max(hi, b);
        }
        const double expected_scale = varn.row_scale[r] * (hi - lo) / ((1 << bits) - 1);
        EXPECT_NEAR(row_scale_param[n][r].item<double>(), expected_scale, 1e-4 * std::abs(expected_scale));
        EXPECT_NEAR(row_min_param[n][r].item<double>(), varn.row_scale[r] * lo,
                    1e-4 * std::abs(varn.row_scale[r] * lo));
      }
    }
  }
}

// Token magnitudes skew the per-channel key RTN (rotation does not help: it mixes channels, not tokens);
// outlier channels skew the per-token value RTN when nothing rotates them away. VarN's scales undo both.
TEST(KVarN, VarNLowersTheErrorOfSkewedTiles) {
  const int64_t tokens = 128, dim = 64;
  for (Role role : {Role::Key, Role::Value}) {
    const bool keys = role == Role::Key;
    const auto x = keys ? skewed_tiles(8, tokens, dim, 1.0, 1.0) : skewed_tiles(8, tokens, dim, 0.0, 20.0);
    const std::string rotate = keys ? "true" : "false";
    double error[2];
    for (int with_varn : {0, 1}) {
      auto q = kvarn({{"preset", "k2v2"}, {"iters", with_varn ? "8" : "0"}, {"rotate", rotate}}, dim);
      error[with_varn] = relative_mse(x, q->dequantize(q->quantize(x, role, 0), role, 0));
    }
    std::printf("[ info     ] k2v2 %s rotate=%s relative MSE: iters=0 %.4f, iters=8 %.4f\n", role_name(role),
                rotate.c_str(), error[0], error[1]);
    EXPECT_LT(error[1], 0.5 * error[0]) << role_name(role);
  }
}

TEST(KVarN, ConstantTilesStayFinite) {
  const int64_t tokens = 16, dim = 16;
  for (const char* rotate : {"true", "false"}) {
    for (const char* dtype : {"float16", "float8_e4m3"}) {
      auto q = kvarn({{"preset", "k2v2"}, {"tile_size", "16"}, {"rotate", rotate}, {"scale_dtype", dtype}}, dim);
      for (double value : {0.0, 3.5}) {
        const auto x = torch::full({2, tokens, dim}, value);
        for (Role role : {Role::Key, Role::Value}) {
          const auto xhat = q->dequantize(q->quantize(x, role, 0), role, 0);
          ASSERT_TRUE(xhat.isfinite().all().item<bool>()) << "rotate " << rotate << " " << dtype << " value " << value;
          EXPECT_LT((xhat - x).abs().max().item<double>(), 0.1 * value + 1e-6)
              << "rotate " << rotate << " " << dtype << " value " << value << " " << role_name(role);
        }
      }
    }
  }
}

TEST(KVarN, LayoutCodeRangeAndStorageCost) {
  const int64_t tokens = 128, dim = 128, n = 3;
  auto q = kvarn({}, dim);  // k4v2, G = 128, fp16
  const auto x = skewed_tiles(n, tokens, dim);
  const auto keys = q->quantize(x, Role::Key, 0), values = q->quantize(x, Role::Value, 0);
  EXPECT_EQ(keys.codes.scalar_type(), torch::kUInt8);
  EXPECT_EQ(keys.codes.sizes(), x.sizes());
  EXPECT_EQ(values.codes.sizes(), x.sizes());
  EXPECT_LE(keys.codes.max().item<int64_t>(), 15);
  EXPECT_LE(values.codes.max().item<int64_t>(), 3);
  EXPECT_EQ(keys.params.at("kS").values.sizes(), torch::IntArrayRef({n, dim}));
  EXPECT_EQ(keys.params.at("kZ").values.sizes(), torch::IntArrayRef({n, dim}));
  EXPECT_EQ(keys.params.at("kT").values.sizes(), torch::IntArrayRef({n, tokens}));
  EXPECT_EQ(values.params.at("vC").values.sizes(), torch::IntArrayRef({n, dim}));
  EXPECT_EQ(values.params.at("vS").values.sizes(), torch::IntArrayRef({n, tokens}));
  EXPECT_EQ(values.params.at("vZ").values.sizes(), torch::IntArrayRef({n, tokens}));
  // The spec's figure: 3.375 bits per element for a k4v2 tile with D = G = 128 and fp16 scales.
  const int64_t elements = n * tokens * dim;
  EXPECT_DOUBLE_EQ((stored_bits_per_element(keys, elements) + stored_bits_per_element(values, elements)) / 2, 3.375);
}

TEST(KVarN, Float8ScalesKeepFloat16ZeroPointsThePapersLayout) {
  // k2v2, D = G = 128. Keys: codes 2 + kS, kZ per channel and kT per token over 128 x 128 elements;
  // values alike. fp8 scales with fp16 zero points (the default): (8 + 16 + 8) * 128 / 128^2 = 0.25,
  // so 2.25 bits per element; all in fp8 (zero_dtype: float8_e4m3): 24 * 128 / 128^2 -> 2.1875.
  const auto x = torch::randn({1, 128, 128});
  auto bits = [&](const ParamMap& params) {
    auto q = kvarn(params, 128);
    const int64_t elements = x.numel();
    return (stored_bits_per_element(q->quantize(x, Role::Key, 0), elements) +
            stored_bits_per_element(q->quantize(x, Role::Value, 0), elements)) /
           2;
  };
  EXPECT_DOUBLE_EQ(bits({{"preset", "k2v2"}}), 2.375);
  EXPECT_DOUBLE_EQ(bits({{"preset", "k2v2"}, {"scale_dtype", "float8_e4m3"}}), 2.25);
  EXPECT_DOUBLE_EQ(bits({{"preset", "k2v2"}, {"scale_dtype", "float8_e4m3"}, {"zero_dtype", "float8_e4m3"}}), 2.1875);
  auto fp8 = kvarn({{"preset", "k2v2"}, {"scale_dtype", "float8_e4m3"}}, 128);
  EXPECT_EQ(fp8->resolved_params().at("zero_dtype"), "float16");
  const auto keys = fp8->quantize(x, Role::Key, 0);
  EXPECT_EQ(keys.params.at("kS").dtype, StoredDtype::Float8E4M3);
  EXPECT_EQ(keys.params.at("kZ").dtype, StoredDtype::Float16);
  const std::string bad = test::error_message([&] { kvarn({{"zero_dtype", "uint8"}}, 128); });
  EXPECT_NE(bad.find("zero_dtype"), std::string::npos) << bad;
}

// scale_rounding (docs/quantizers.md). The default is the authors' order, after_codes: codes against
// the float32 VarN and RTN scales, the stored ones rounded afterwards. With float8 token scales that
// leaves each key token's norm off by up to the e4m3 rounding of its kT (6.25%); before_codes
// normalizes the tile by the stored kT and codes it against the stored kS, kZ, which absorbs most of
// it. (Values carry their token scale in vS, which both orders round alike.)
TEST(KVarN, RoundingScalesBeforeTheCodesAbsorbsTheirRounding) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
  auto x = torch::randn({4, 64, 64}, generator, torch::kFloat32);
  x.mul_(torch::linspace(1.0, 40.0, 64).reshape({1, 64, 1}));  // token norms over a wide range
  const ParamMap fp8 = {{"preset", "k4v2"}, {"tile_size", "64"}, {"scale_dtype", "float8_e4m3"}};
  ParamMap before = fp8;
  before["scale_rounding"] = "before_codes";
  const auto after_codes = kvarn(fp8, 64), before_codes = kvarn(before, 64);
  EXPECT_EQ(after_codes->resolved_params().at("scale_rounding"), "after_codes");
  EXPECT_EQ(kvarn({}, 64)->resolved_params().at("scale_rounding"), "after_codes");
  EXPECT_EQ(before_codes->resolved_params().at("scale_rounding"), "before_codes");
  for (Role role : {Role::Key, Role::Value}) {
    SCOPED_TRACE(role_name(role));
    const auto stored_after = after_codes->quantize(x, role, 0), stored_before = before_codes->quantize(x, role, 0);
    const std::string column = role == Role::Key ? "kT" : "vC";  // the same stored VarN column scale
    EXPECT_TRUE(torch::equal(stored_after.params.at(column).values, stored_before.params.at(column).values));
    EXPECT_FALSE(torch::equal(stored_after.codes, stored_before.codes));
  }
  const auto magnitude = [&](const Quantizer& q) {
    return metrics::token_scale_error(x, q.dequantize(q.quantize(x, Role::Key, 0), Role::Key, 0))
        .magnitude.sum()
        .item<double>();
  };
  EXPECT_LT(magnitude(*before_codes), 0.5 * magnitude(*after_codes));
}

TEST(KVarN, ParametersPolicyAndChecks) {
  auto q = kvarn({{"preset", "k2v2"}, {"tile_size", "64"}, {"sink", "false"}}, 128);
  const ParamMap expected = {{"preset", "k2v2"}, {"k_bits", "2"},    {"v_bits", "2"},   {"tile_size", "64"},
                             {"iters", "8"},     {"rotate", "true"}, {"sink", "false"}, {"scale_dtype", "float16"},
                             {"zero_dtype", "float16"}, {"scale_rounding", "after_codes"}};
  EXPECT_EQ(q->resolved_params(), expected);
  for (Role role : {Role::Key, Role::Value}) {
    EXPECT_EQ(q->policy(role).sink, 0);
    EXPECT_EQ(q->policy(role).block, 64);
    EXPECT_EQ(q->policy(role).lag, 0);
  }
  EXPECT_EQ(kvarn({}, 128)->policy(Role::Key).sink, 128);
  EXPECT_EQ(kvarn({{"k_bits", "3"}}, 128)->resolved_params().at("v_bits"), "2");

  EXPECT_THROW(kvarn({{"preset", "k4v2"}, {"k_bits", "3"}}, 128), Error);
  EXPECT_THROW(kvarn({{"tile_size", "96"}}, 128), Error);
  EXPECT_THROW(kvarn({{"k_bits", "1"}}, 128), Error);
  EXPECT_THROW(kvarn({}, 100), Error);  // no Hadamard matrix of order 100
  EXPECT_NO_THROW(kvarn({{"rotate", "false"}}, 100));
  EXPECT_NO_THROW(kvarn({}, 96));  // 12 * 8
  const std::string message = test::error_message([&] { q->quantize(torch::zeros({1, 32, 128}), Role::Key, 0); });
  EXPECT_NE(message.find("got 32"), std::string::npos) << message;
}

}  // namespace
}  // namespace kvdrift
