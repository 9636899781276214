// TurboQuant against numbers it did not produce: the Lloyd-Max distortion of a unit Gaussian (Max 1960;
// the paper's Theorem 1 table), the closed form of the 1-bit codebook, and the unbiasedness of the prod
// variant's inner products over its random projection, with the mse variant's bias as the control that
// shows the test can fail.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/quantizer.h"
#include "quant/storage.h"
#include "support.h"

namespace kvdrift {
namespace {

torch::Tensor random_unit_vectors(int64_t count, int64_t dim, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto x = torch::randn({1, count, dim}, generator, torch::kFloat32);
  return x / x.norm(2, -1, /*keepdim=*/true);
}

torch::Tensor round_trip(const Quantizer& q, const torch::Tensor& x, Role role = Role::Key) {
  return q.dequantize(q.quantize(x, role, 0), role, 0);
}

TEST(TurboQuant, MseDistortionOfUnitVectorsIsTheGaussianLloydMaxDistortion) {
  // 10,000 uniformly random unit vectors in d = 128: each rotated coordinate has variance 1/d, so the
  // squared error per vector is the Lloyd-Max distortion of a unit Gaussian, 0.3634, 0.1175, 0.03454,
  // 0.009497 for 1..4 bits (the paper rounds them to 0.36, 0.117, 0.03, 0.009); within 5%.
  const auto x = random_unit_vectors(10000, 128, 11);
  const std::vector<double> gaussian = {0.3634, 0.1175, 0.03454, 0.009497};
  for (int bits = 1; bits <= 4; ++bits) {
    const auto q = make_quantizer("turboquant", {{"k_bits", std::to_string(bits)}}, 128);
    const double distortion = (round_trip(*q, x) - x).pow(2).sum(-1).mean().item<double>();
    EXPECT_NEAR(distortion / gaussian[bits - 1], 1.0, 0.05) << bits << " bits: " << distortion;
  }
}

TEST(TurboQuant, OneBitCodebookIsPlusMinusTheMeanAbsoluteCoordinate) {
  // The 1-bit Lloyd-Max quantizer of a symmetric unimodal density is +-E|t|; for a coordinate of a random
  // unit vector in d dims E|t| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)). Every rotated coordinate is then
  // +-E|t|, so |x_hat| = sqrt(d) E|t| for a unit x.
  for (int64_t dim : {64, 128}) {
    const double mean_abs =
        std::exp(std::lgamma(dim / 2.0) - std::lgamma((dim + 1) / 2.0)) / std::sqrt(std::acos(-1.0));
    const auto q = make_quantizer("turboquant", {{"k_bits", "1"}}, dim);
    const auto restored = round_trip(*q, random_unit_vectors(5, dim, 3));
    const auto norms = restored.norm(2, -1);
    EXPECT_NEAR(norms.min().item<double>(), std::sqrt(static_cast<double>(dim)) * mean_abs, 2e-5) << dim;
    EXPECT_NEAR(norms.max().item<double>(), std::sqrt(static_cast<double>(dim)) * mean_abs, 2e-5) << dim;
  }
}

TEST(TurboQuant, ProdInnerProductsAreUnbiasedOverTheProjection) {
  // One key and one query with <q, x> = 0.8, quantized under 2,000 seeds (each its own rotation and S):
  // the mean error of <q, x_hat> must lie within 3 standard errors of 0 for prod, while mse at 1 bit
  // shrinks inner products by about 2/pi and must lie far outside.
  const auto x = random_unit_vectors(1, 128, 5);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(6);
  auto noise = torch::randn({1, 1, 128}, generator, torch::kFloat32);
  noise = noise - (noise * x).sum() * x;
  const auto query = 0.8 * x + 0.6 * noise / noise.norm();
  const double truth = (query * x).sum().item<double>();
  const auto mean_and_error = [&](const std::string& variant, const std::string& bits) {
    std::vector<double> errors;
    for (int seed = 0; seed < 2000; ++seed) {
      const auto q = make_quantizer(
          "turboquant", {{"k_bits", bits}, {"variant", variant}, {"seed", std::to_string(seed)}}, 128);
      errors.push_back((query * round_trip(*q, x)).sum().item<double>() - truth);
    }
    const auto t = torch::tensor(errors, torch::kFloat64);
    return std::pair<double, double>{t.mean().item<double>(), t.std().item<double>() / std::sqrt(errors.size())};
  };
  for (const std::string bits : {"1", "2", "3"}) {
    const auto [mean, standard_error] = mean_and_error("prod", bits);
    EXPECT_LT(std::abs(mean), 3.0 * standard_error) << "prod " << bits << " bits: " << mean << " +- " << standard_error;
  }
  const auto [mean, standard_error] = mean_and_error("mse", "1");
  EXPECT_LT(mean, -10.0 * standard_error) << mean << " +- " << standard_error;
  EXPECT_NEAR(mean / truth, 2.0 / std::acos(-1.0) - 1.0, 0.05);
}

TEST(TurboQuant, StorageSeedsPolicyAndZeroVectors) {
  // Codes at b bits (3 bits count 3), the float16 norm per token, and for prod the residual's norm.
  const std::vector<std::tuple<std::string, std::string, double>> expected = {
      {"mse", "4", 4.0 + 16.0 / 128}, {"mse", "3", 3.0 + 16.0 / 128}, {"prod", "4", 4.0 + 32.0 / 128}};
  for (const auto& [variant, bits, cost] : expected) {
    const auto q = make_quantizer("turboquant", {{"k_bits", bits}, {"v_bits", bits}, {"variant", variant}}, 128);
    EXPECT_DOUBLE_EQ(storage_cost(*q, 128, 100).bits_per_element, cost) << variant << bits;
    const RolePolicy policy = q->policy(Role::Value);
    EXPECT_EQ((std::vector<int64_t>{policy.sink, policy.block, policy.lag}), (std::vector<int64_t>{0, 1, 1}));
  }
  const auto x = random_unit_vectors(4, 64, 9) * 7.0;
  const auto seed0 = make_quantizer("turboquant", {{"variant", "prod"}}, 64);
  const auto again = make_quantizer("turboquant", {{"variant", "prod"}, {"seed", "0"}}, 64);
  const auto seed1 = make_quantizer("turboquant", {{"variant", "prod"}, {"seed", "1"}}, 64);
  EXPECT_TRUE(torch::equal(round_trip(*seed0, x), round_trip(*again, x)));
  EXPECT_FALSE(torch::equal(round_trip(*seed0, x), round_trip(*seed1, x)));
  EXPECT_EQ(seed0->resolved_params(), (ParamMap{{"k_bits", "4"}, {"v_bits", "4"}, {"variant", "prod"}, {"seed", "0"}}));
  // Keys and values use their own bits: 2-bit values lose more than 4-bit keys.
  const auto mixed = make_quantizer("turboquant", {{"k_bits", "4"}, {"v_bits", "2"}}, 64);
  EXPECT_LT((round_trip(*mixed, x, Role::Key) - x).pow(2).sum().item<double>(),
            0.5 * (round_trip(*mixed, x, Role::Value) - x).pow(2).sum().item<double>());
  const auto zero = round_trip(*seed0, torch::zeros({1, 2, 64}));
  EXPECT_EQ(zero.abs().max().item<float>(), 0.0f);
}

TEST(TurboQuant, ParameterErrorsNameTheValue) {
  EXPECT_EQ(test::error_message([] { make_quantizer("turboquant", {{"variant", "qjl"}}, 64); }),
            "quantizer 'turboquant': parameter variant = 'qjl' is not one of mse, prod");
  EXPECT_EQ(test::error_message([] { make_quantizer("turboquant", {{"k_bits", "0"}}, 64); }).rfind(
                "quantizer 'turboquant': parameter k_bits = 0", 0),
            0u);
  EXPECT_EQ(test::error_message([] { make_quantizer("turboquant", {}, 44); }).rfind(
                "quantizer 'turboquant': head_dim 44 has no Hadamard construction for the randomized rotation", 0),
            0u);
}

}  // namespace
}  // namespace kvdrift
