// The causal wrappers (`wrap: true_scale | true_direction`) on synthetic tiles: each removes exactly
// one part of the token-scale error and keeps the other, the identity E_T = E_M + E_D still holds,
// and their storage states the side information they keep.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "core/error.h"
#include "metrics/token_scale.h"
#include "quant/quantizer.h"
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
  EXPECT_EQ(bad, "quantizer 'kivi': parameter wrap = 'true_norm' is not one of true_scale, true_direction");
}

}  // namespace
}  // namespace kvdrift
