// The causal wrappers on synthetic tiles: true_scale / true_direction each remove exactly one part of
// the token-scale error and keep the other, the equal-error ones move the whole error into one part,
// the identity E_T = E_M + E_D still holds, and their storage states the side information they keep.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "metrics/token_scale.h"
#include "quant/quantizer.h"
#include "quant/wrappers.h"
#include "support.h"

namespace kvdrift {
namespace {

torch::Tensor outlier_tiles(uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto x = torch::randn({3, 32, 64}, generator, torch::kFloat32);
  x.select(2, 5).mul_(20.0);  // an outlier channel
  x.select(1, 7).mul_(8.0);   // an outlier token
  return x;
}

double total(const torch::Tensor& t) { return t.sum().item<double>(); }

TEST(Wrappers, TrueScaleLeavesOnlyDirectionErrorTrueDirectionOnlyMagnitude) {
  const std::vector<std::pair<std::string, ParamMap>> methods = {
      {"kivi", {{"group_size", "16"}, {"residual_length", "32"}}},
      {"quarot", {{"k_bits", "2"}, {"v_bits", "2"}}},
      {"kvarn", {{"preset", "k2v2"}, {"tile_size", "32"}}},
  };
  const auto x = outlier_tiles(7);
  for (const auto& [method, params] : methods) {
    for (Role role : {Role::Key, Role::Value}) {
      SCOPED_TRACE(method + " " + role_name(role));
      auto plain = make_quantizer(method, params, 64);
      ParamMap scale_params = params, direction_params = params;
      scale_params["wrap"] = "true_scale";
      direction_params["wrap"] = "true_direction";
      auto true_scale = make_quantizer(method, scale_params, 64);
      auto true_direction = make_quantizer(method, direction_params, 64);
      EXPECT_EQ(true_scale->method(), method);
      EXPECT_EQ(true_scale->resolved_params().at("wrap"), "true_scale");
      const auto x_hat = plain->dequantize(plain->quantize(x, role, 0), role, 0);
      const auto plain_error = metrics::token_scale_error(x, x_hat);
      ASSERT_GT(total(plain_error.magnitude), 0.0);
      ASSERT_GT(total(plain_error.direction), 0.0);

      // true_scale: |x_hat'| = |x| (float32 rounding only), the method's direction kept.
      const auto scaled = true_scale->dequantize(true_scale->quantize(x, role, 0), role, 0);
      const auto scale_error = metrics::token_scale_error(x, scaled);
      EXPECT_LE(total(scale_error.magnitude), 1e-9 * total(scale_error.total));
      // E_D = 2 |x| |x_hat| (1 - cos) with the method's cosine, now at |x_hat| = |x|.
      const auto expected_direction = plain_error.direction * x.norm(2, -1).to(torch::kFloat64) /
                                      x_hat.norm(2, -1).to(torch::kFloat64);
      EXPECT_TRUE(torch::allclose(scale_error.direction, expected_direction, 1e-4, 1e-9));
      const auto cosine = (scaled * x_hat).sum(-1) / (scaled.norm(2, -1) * x_hat.norm(2, -1));
      EXPECT_GT(cosine.min().item<double>(), 1 - 1e-6);

      // true_direction: x's direction, the method's norm: E_D = 0, E_M unchanged.
      const auto directed = true_direction->dequantize(true_direction->quantize(x, role, 0), role, 0);
      const auto direction_error = metrics::token_scale_error(x, directed);
      EXPECT_LE(total(direction_error.direction), 1e-9 * total(direction_error.total));
      EXPECT_NEAR(total(direction_error.magnitude), total(plain_error.magnitude),
                  1e-5 * total(plain_error.magnitude));

      for (const auto* error : {&scale_error, &direction_error})
        EXPECT_TRUE(torch::allclose(error->magnitude + error->direction, error->total, 1e-9,
                                    1e-9 * error->total.max().item<double>()));
    }
  }
}

TEST(Wrappers, StorageStatesTheSideInformation) {
  // KVarN k2v2, D = G = 64 over a 64-token tile: 2 + 0.75 bits; true_scale keeps one float32 norm
  // per token (32 / 64 = 0.5 more), true_direction the whole float32 vector (32 more).
  const auto x = torch::randn({1, 64, 64});
  auto bits = [&](const std::string& wrap) {
    ParamMap params = {{"preset", "k2v2"}, {"tile_size", "64"}};
    if (!wrap.empty()) params["wrap"] = wrap;
    auto q = make_quantizer("kvarn", params, 64);
    return stored_bits_per_element(q->quantize(x, Role::Key, 0), x.numel());
  };
  EXPECT_DOUBLE_EQ(bits(""), 2.75);
  EXPECT_DOUBLE_EQ(bits("true_scale"), 3.25);
  EXPECT_DOUBLE_EQ(bits("true_direction"), 34.75);
  const std::string bad = test::error_message([] { make_quantizer("kivi", {{"wrap", "true_norm"}}, 64); });
  EXPECT_EQ(bad,
            "quantizer 'kivi': parameter wrap = 'true_norm' is not one of true_scale, true_direction, "
            "equal_error_scale, equal_error_direction, repair_worst");
  EXPECT_DOUBLE_EQ(bits("equal_error_scale"), 34.75);  // it keeps the true vector too
}

// The equal-error wrappers keep each token's error energy E_T = |x - x_hat|^2 and put all of it in one
// component: E_M' = E_T, E_D' = 0 (scale), or E_D' = E_T, E_M' = 0 (direction; at most 4 |x|^2, a
// turn by pi), to 1e-6 of E_T plus the float32 rounding of the wrapped vector.
TEST(Wrappers, EqualErrorMovesTheWholeErrorIntoOneComponent) {
  const std::vector<std::pair<std::string, ParamMap>> methods = {
      {"rtn", {{"k_bits", "2"}, {"v_bits", "2"}, {"group_size", "16"}}},
      {"kivi", {{"group_size", "16"}, {"residual_length", "32"}}},
      {"quarot", {{"k_bits", "2"}, {"v_bits", "2"}}},
      {"kvarn", {{"preset", "k2v2"}, {"tile_size", "32"}}},
  };
  auto x = outlier_tiles(11);
  x.select(1, 3).zero_();  // a zero token vector stays the method's (zero) vector
  for (const auto& [method, params] : methods) {
    for (Role role : {Role::Key, Role::Value}) {
      SCOPED_TRACE(method + " " + role_name(role));
      auto plain = make_quantizer(method, params, 64);
      const auto x_hat = plain->dequantize(plain->quantize(x, role, 0), role, 0);
      const auto energy = metrics::token_scale_error(x, x_hat).total;
      for (const std::string wrap : {"equal_error_scale", "equal_error_direction"}) {
        ParamMap wrapped_params = params;
        wrapped_params["wrap"] = wrap;
        auto wrapped = make_quantizer(method, wrapped_params, 64);
        EXPECT_EQ(wrapped->resolved_params().at("wrap"), wrap);
        EXPECT_EQ(wrapped->policy(role).block, plain->policy(role).block);
        const auto moved = wrapped->dequantize(wrapped->quantize(x, role, 0), role, 0);
        const auto error = metrics::token_scale_error(x, moved);
        const bool scale = wrap == "equal_error_scale";
        const auto& kept = scale ? error.magnitude : error.direction;
        const auto& removed = scale ? error.direction : error.magnitude;
        // A turn by pi is as far as a direction error goes: E_D' = 4 |x|^2 where E_T exceeds it.
        const auto squared_norm = x.to(torch::kFloat64).pow(2).sum(-1);
        const auto energy_kept = scale ? energy : torch::minimum(energy, 4 * squared_norm);
        // The wrapped vector is float32: its norm is off by ~1e-7 |x|, which moves E_M' = (sqrt(E_T) +- that)^2
        // by ~2e-7 |x| sqrt(E_T), and either component by ~1e-14 |x|^2.
        const auto bound = 1e-6 * energy + 1e-6 * squared_norm.sqrt() * energy.sqrt() + 1e-12 * squared_norm + 1e-12;
        EXPECT_TRUE(((kept - energy_kept).abs() <= bound).all().item<bool>()) << wrap;
        // Except at the zero vector, which keeps the method's x_hat and so all its error as magnitude.
        const auto nonzero = squared_norm > 0;
        EXPECT_TRUE((removed.abs() <= bound).masked_select(nonzero).all().item<bool>()) << wrap;
        EXPECT_TRUE(torch::equal(moved.select(1, 3), x_hat.select(1, 3))) << wrap;
        if (scale) {
          // The sign of the method's norm error is kept where |x| - sqrt(E_T) stays non-negative.
          const auto norm = x.norm(2, -1), hat_norm = x_hat.norm(2, -1), moved_norm = moved.norm(2, -1);
          const auto keeps = (norm - energy.sqrt().to(torch::kFloat32) > 1e-3) & (hat_norm < norm - 1e-3);
          EXPECT_TRUE((moved_norm.masked_select(keeps) < norm.masked_select(keeps)).all().item<bool>());
        }
      }
    }
  }
}

// A pure magnitude error of the same energy: by hand, x = (3, 4) (|x| = 5) and a method that gives
// (0, 4): E_T = 9, norm falls (4 < 5), so x_hat' = x / 5 * (5 - 3) = (1.2, 1.6). The direction arm
// turns x by theta with 2 * 25 * (1 - cos theta) = 9, towards (-4, 3)'s side (x_hat's part orthogonal
// to x is (0, 4) - 16/25 (3, 4) = (-1.92, 1.44)): cos = 0.82, sin = sqrt(1 - 0.6724).
TEST(Wrappers, EqualErrorByHand) {
  class Fixed final : public Quantizer {
   public:
    std::string method() const override { return "fixed"; }
    ParamMap resolved_params() const override { return {}; }
    RolePolicy policy(Role) const override { return {0, 1, 1}; }
    QuantizedTiles quantize(const torch::Tensor& x, Role, int64_t) const override {
      return {torch::zeros(x.sizes(), torch::kUInt8), 8, {}};
    }
    torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
      return torch::tensor({0.0f, 4.0f}).expand(tiles.codes.sizes()).clone();
    }
  };
  const auto x = torch::tensor({3.0f, 4.0f}).reshape({1, 1, 2});
  auto scale = wrap_quantizer(std::make_unique<Fixed>(), "equal_error_scale");
  const auto scaled = scale->dequantize(scale->quantize(x, Role::Key, 0), Role::Key, 0).flatten();
  EXPECT_NEAR(scaled[0].item<double>(), 1.2, 1e-6);
  EXPECT_NEAR(scaled[1].item<double>(), 1.6, 1e-6);
  auto direction = wrap_quantizer(std::make_unique<Fixed>(), "equal_error_direction");
  const auto turned = direction->dequantize(direction->quantize(x, Role::Key, 0), Role::Key, 0).flatten();
  const double sine = std::sqrt(1 - 0.82 * 0.82);
  EXPECT_NEAR(turned[0].item<double>(), 0.82 * 3 - sine * 4, 1e-5);
  EXPECT_NEAR(turned[1].item<double>(), 0.82 * 4 + sine * 3, 1e-5);
  EXPECT_EQ(test::error_message([] { make_quantizer("none", {{"wrap", "equal_error_scale"}}, 64); }),
            "quantizer 'none': wrap = 'equal_error_scale' needs a method with an error to redistribute; 'none' has none");
}

// repair_worst on KVarN k2v2 tiles of 32 tokens: round(0.1 * 32) = 3 rows per tile, chosen here from the
// method's own error by a sort on the host (ties to the earlier row), get their true scale or vector
// back; every other row is the method's, bit for bit.
TEST(Wrappers, RepairWorstRepairsExactlyTheWorstRowsOfEachBlock) {
  const auto x = outlier_tiles(11);  // [3 tiles, 32 tokens, 64]
  const ParamMap kvarn = {{"preset", "k2v2"}, {"tile_size", "32"}};
  const auto plain = make_quantizer("kvarn", kvarn, 64);
  for (Role role : {Role::Key, Role::Value}) {
    const auto x_hat = plain->dequantize(plain->quantize(x, role, 0), role, 0);
    for (const std::string rank_by : {"absolute", "relative"}) {
      for (const std::string repair : {"scale", "vector"}) {
        SCOPED_TRACE(std::string(role_name(role)) + " " + rank_by + " " + repair);
        ParamMap params = kvarn;
        params.insert({{"wrap", "repair_worst"}, {"fraction", "0.1"}, {"repair", repair}, {"rank_by", rank_by}});
        const auto q = make_quantizer("kvarn", params, 64);
        const auto repaired = q->dequantize(q->quantize(x, role, 0), role, 0);
        auto error = (x - x_hat).to(torch::kFloat64).pow(2).sum(-1);
        if (rank_by == "relative") error = error / x.to(torch::kFloat64).pow(2).sum(-1);
        for (int64_t n = 0; n < x.size(0); ++n) {
          std::vector<std::pair<double, int64_t>> ranked;
          for (int64_t t = 0; t < x.size(1); ++t) ranked.push_back({-error[n][t].item<double>(), t});
          std::sort(ranked.begin(), ranked.end());
          std::vector<bool> worst(x.size(1), false);
          for (int k = 0; k < 3; ++k) worst[ranked[k].second] = true;
          for (int64_t t = 0; t < x.size(1); ++t) {
            const auto row = repaired[n][t], truth = x[n][t], method = x_hat[n][t];
            if (!worst[t]) {
              EXPECT_TRUE(torch::equal(row, method)) << "tile " << n << " row " << t;
            } else if (repair == "vector") {
              EXPECT_TRUE(torch::equal(row, truth)) << "tile " << n << " row " << t;
            } else {
              EXPECT_NEAR(row.norm().item<double>() / truth.norm().item<double>(), 1.0, 1e-6);
              EXPECT_GT((row * method).sum().item<double>() / (row.norm() * method.norm()).item<double>(), 1 - 1e-6);
            }
          }
        }
      }
    }
  }
}

TEST(Wrappers, RepairWorstAtFractionZeroIsTheMethodAtOneTheTruthAndCountsItsSideInformation) {
  const auto x = outlier_tiles(12).narrow(1, 0, 32);
  const ParamMap kvarn = {{"preset", "k2v2"}, {"tile_size", "32"}};
  const auto round_trip = [&](ParamMap extra) {
    extra.insert(kvarn.begin(), kvarn.end());
    const auto q = make_quantizer("kvarn", extra, 64);
    return q->dequantize(q->quantize(x, Role::Key, 0), Role::Key, 0);
  };
  EXPECT_TRUE(torch::equal(round_trip({{"wrap", "repair_worst"}, {"fraction", "0"}}), round_trip({})));
  EXPECT_TRUE(torch::equal(round_trip({{"wrap", "repair_worst"}, {"fraction", "1"}, {"repair", "vector"}}), x));
  EXPECT_TRUE(torch::allclose(round_trip({{"wrap", "repair_worst"}, {"fraction", "1"}}),
                              round_trip({{"wrap", "true_scale"}}), 1e-6, 1e-6));
  // KVarN k2v2, D = G = 64 over a 64-token tile: 2.75 bits; round(0.05 * 64) = 3 repaired rows, each a
  // uint8 index and a float32 norm (+3 * 40 / 4096) or the float32 vector (+3 * (8 + 64 * 32) / 4096).
  const auto tile = torch::randn({1, 64, 64});
  auto bits = [&](const std::string& repair) {
    auto q = make_quantizer("kvarn", {{"preset", "k2v2"}, {"tile_size", "64"}, {"wrap", "repair_worst"},
                                      {"repair", repair}}, 64);
    return stored_bits_per_element(q->quantize(tile, Role::Key, 0), tile.numel());
  };
  EXPECT_DOUBLE_EQ(bits("scale"), 2.75 + 3.0 * 40 / 4096);
  EXPECT_DOUBLE_EQ(bits("vector"), 2.75 + 3.0 * (8 + 64 * 32) / 4096);
  const auto q = make_quantizer("kvarn", {{"preset", "k2v2"}, {"wrap", "repair_worst"}}, 64);
  EXPECT_EQ(q->resolved_params().at("fraction"), "0.05");
  EXPECT_EQ(q->resolved_params().at("repair"), "scale");
  EXPECT_EQ(q->resolved_params().at("rank_by"), "absolute");
}

TEST(Wrappers, RepairWorstLeavesTokenAtATimeRolesAndRefusesMethodsWithoutBlocks) {
  // KIVI quantizes keys in blocks of residual_length tokens and values one token at a time: its keys are
  // repaired, its values left as the method's.
  const auto x = outlier_tiles(13);
  const ParamMap kivi = {{"group_size", "16"}, {"residual_length", "32"}};
  ParamMap wrapped = kivi;
  wrapped.insert({{"wrap", "repair_worst"}, {"fraction", "0.25"}, {"repair", "vector"}});
  const auto plain = make_quantizer("kivi", kivi, 64), q = make_quantizer("kivi", wrapped, 64);
  EXPECT_TRUE(torch::equal(q->dequantize(q->quantize(x, Role::Value, 0), Role::Value, 0),
                           plain->dequantize(plain->quantize(x, Role::Value, 0), Role::Value, 0)));
  const auto keys = q->dequantize(q->quantize(x, Role::Key, 0), Role::Key, 0);
  EXPECT_EQ((keys == x).all(-1).sum().item<int64_t>(), 3 * 8);  // round(0.25 * 32) = 8 rows per tile
  EXPECT_EQ(test::error_message([] { make_quantizer("quarot", {{"wrap", "repair_worst"}}, 64); }),
            "quantizer 'quarot': wrap: repair_worst repairs the worst rows of each quantized block, and this method "
            "quantizes keys and values one token at a time (block 1): no block has rows to rank");
  EXPECT_EQ(test::error_message([] { make_quantizer("kvarn", {{"wrap", "repair_worst"}, {"fraction", "1.5"}}, 64); }),
            "quantizer 'kvarn': parameter fraction = 1.5 is out of range [0, 1]");
  EXPECT_EQ(test::error_message([] { make_quantizer("kvarn", {{"wrap", "repair_worst"}, {"repair", "norm"}}, 64); }),
            "quantizer 'kvarn': parameter repair = 'norm' is not one of scale, vector");
  EXPECT_EQ(test::error_message([] { make_quantizer("kvarn", {{"wrap", "true_scale"}, {"fraction", "0.1"}}, 64); }),
            "quantizer 'kvarn': parameter fraction belongs to wrap: repair_worst, not to wrap: true_scale");
  EXPECT_EQ(test::error_message([] { make_quantizer("kvarn", {{"fraction", "0.1"}}, 64); })
                .rfind("quantizer 'kvarn': unknown parameter 'fraction'", 0),
            0u);
}

}  // namespace
}  // namespace kvdrift
