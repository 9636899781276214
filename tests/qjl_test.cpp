// QJL keys against the estimator's formula evaluated here in double precision, its unbiasedness and
// its 1/m variance over the random projection; values handed to the value method unchanged; storage
// and parameter errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "quant/qjl_sketch.h"
#include "quant/quantizer.h"
#include "quant/storage.h"
#include "support.h"

namespace kvdrift {
namespace {

torch::Tensor gaussian(std::vector<int64_t> shape, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn(shape, generator, torch::kFloat32);
}

TEST(Qjl, KeysAreTheQjlEstimatorOfTheirSketch) {
  // k_hat = sqrt(pi/2)/m |k| S^T sign(S k), with S the seed's Gaussian [m, d] and |k| as stored (float16).
  const auto keys = gaussian({2, 3, 64}, 1) * 3.0;
  for (const int64_t m : {64, 192}) {
    const auto q = make_quantizer("qjl", {{"m", std::to_string(m)}, {"seed", "7"}}, 64);
    const auto tiles = q->quantize(keys, Role::Key, 0);
    EXPECT_EQ(tiles.bits, 1);
    const auto projection = quant::gaussian_projection(m, 64, 7).to(torch::kFloat64);
    const auto k = keys.to(torch::kFloat64);
    const auto signs = torch::where(k.matmul(projection.t()) >= 0, 1.0, -1.0).to(torch::kFloat64);
    const auto norm = keys.norm(2, -1).to(torch::kFloat16).to(torch::kFloat64).unsqueeze(-1);
    const auto expected = std::sqrt(std::acos(-1.0) / 2.0) / static_cast<double>(m) * norm * signs.matmul(projection);
    const auto restored = q->dequantize(tiles, Role::Key, 0).to(torch::kFloat64);
    EXPECT_LT((restored - expected).abs().max().item<double>(), 1e-5 * expected.abs().max().item<double>()) << m;
  }
}

TEST(Qjl, InnerProductsAreUnbiasedWithVarianceFallingAsOneOverM) {
  // One key and one query, 2,000 seeds: the mean error of q . k_hat lies within 3 standard errors of 0,
  // and doubling m halves the variance (QJL's variance is (pi/2 - 1) |k|^2 |q_perp|^2 / m to first order).
  const auto key = gaussian({1, 1, 64}, 2);
  const auto query = gaussian({1, 1, 64}, 3);
  const double truth = (query * key).sum().item<double>();
  std::vector<double> variances;
  for (const std::string m : {"64", "128"}) {
    std::vector<double> errors;
    for (int seed = 0; seed < 2000; ++seed) {
      const auto q = make_quantizer("qjl", {{"m", m}, {"seed", std::to_string(seed)}}, 64);
      errors.push_back((query * q->dequantize(q->quantize(key, Role::Key, 0), Role::Key, 0)).sum().item<double>() -
                       truth);
    }
    const auto t = torch::tensor(errors, torch::kFloat64);
    const double mean = t.mean().item<double>(), standard_error = t.std().item<double>() / std::sqrt(2000.0);
    EXPECT_LT(std::abs(mean), 3.0 * standard_error) << "m " << m << ": " << mean << " +- " << standard_error;
    variances.push_back(t.var().item<double>());
  }
  EXPECT_NEAR(variances[1] / variances[0], 0.5, 0.1);
}

TEST(Qjl, ValuesAreTheValueMethodsAndStorageCountsBoth) {
  const auto values = gaussian({2, 40, 64}, 4);
  const auto q = make_quantizer("qjl", {{"value_method", "kivi"}, {"value.v_bits", "2"}}, 64);
  const auto kivi = make_quantizer("kivi", {{"v_bits", "2"}}, 64);
  EXPECT_TRUE(torch::equal(q->dequantize(q->quantize(values, Role::Value, 0), Role::Value, 0),
                           kivi->dequantize(kivi->quantize(values, Role::Value, 0), Role::Value, 0)));
  const RolePolicy value_policy = q->policy(Role::Value), kivi_policy = kivi->policy(Role::Value);
  EXPECT_EQ((std::vector<int64_t>{value_policy.sink, value_policy.block, value_policy.lag}),
            (std::vector<int64_t>{kivi_policy.sink, kivi_policy.block, kivi_policy.lag}));
  const RolePolicy key_policy = q->policy(Role::Key);
  EXPECT_EQ((std::vector<int64_t>{key_policy.sink, key_policy.block, key_policy.lag}), (std::vector<int64_t>{0, 1, 1}));
  EXPECT_EQ(q->resolved_params().at("value.v_bits"), "2");
  EXPECT_EQ(q->resolved_params().at("value_method"), "kivi");
  // Keys: m sign bits and a float16 norm per token of d channels; the cost is the mean of both roles'.
  const auto rtn_values = make_quantizer("rtn", {{"k_bits", "2"}, {"v_bits", "2"}}, 64);
  for (const int64_t m : {64, 128}) {
    const auto sketched = make_quantizer("qjl", {{"m", std::to_string(m)}, {"value.v_bits", "2"}}, 64);
    const double key_bits = (static_cast<double>(m) + 16.0) / 64.0;
    EXPECT_NEAR(storage_cost(*sketched, 64, 100).bits_per_element,
                0.5 * (key_bits + storage_cost(*rtn_values, 64, 100).bits_per_element), 1e-12)
        << m;
  }
}

// The QJL authors' sketch (sketch: orthogonal): each block of d rows is d orthogonal rows of norm
// sqrt(d), the same for a seed and another for another seed; the key is the estimator under that S.
TEST(Qjl, OrthogonalSketchHasOrthogonalBlocksAndKeysAreItsEstimator) {
  const auto projection = quant::orthogonal_projection(128, 64, 5).to(torch::kFloat64);
  ASSERT_EQ(projection.sizes(), (c10::IntArrayRef{128, 64}));
  for (int64_t begin : {0, 64}) {
    const auto block = projection.narrow(0, begin, 64);
    EXPECT_LT((block.matmul(block.t()) - 64.0 * torch::eye(64, torch::kFloat64)).abs().max().item<double>(), 1e-3);
  }
  // Not merely orthogonal: the two blocks come from different Gaussian draws.
  EXPECT_GT((projection.narrow(0, 0, 64) - projection.narrow(0, 64, 64)).abs().max().item<double>(), 1.0);
  EXPECT_TRUE(torch::equal(quant::orthogonal_projection(128, 64, 5), quant::orthogonal_projection(128, 64, 5)));
  EXPECT_FALSE(torch::equal(quant::orthogonal_projection(128, 64, 5), quant::orthogonal_projection(128, 64, 6)));
  const auto keys = gaussian({2, 3, 64}, 1) * 3.0;
  const auto q = make_quantizer("qjl", {{"m", "128"}, {"seed", "5"}, {"sketch", "orthogonal"}}, 64);
  EXPECT_EQ(q->resolved_params().at("sketch"), "orthogonal");
  const auto k = keys.to(torch::kFloat64);
  const auto signs = torch::where(k.matmul(projection.t()) >= 0, 1.0, -1.0).to(torch::kFloat64);
  const auto norm = keys.norm(2, -1).to(torch::kFloat16).to(torch::kFloat64).unsqueeze(-1);
  const auto expected = std::sqrt(std::acos(-1.0) / 2.0) / 128.0 * norm * signs.matmul(projection);
  const auto restored = q->dequantize(q->quantize(keys, Role::Key, 0), Role::Key, 0).to(torch::kFloat64);
  EXPECT_LT((restored - expected).abs().max().item<double>(), 1e-5 * expected.abs().max().item<double>());
}

// residual_length R: the newest keys stay full precision and are sketched R at a time (KIVI's key
// residual, the authors' buffer of 128); without it every key is sketched as it is written.
TEST(Qjl, AResidualBufferSketchesKeysInBlocks) {
  const auto buffered = make_quantizer("qjl", {{"residual_length", "128"}}, 64);
  const RolePolicy policy = buffered->policy(Role::Key);
  EXPECT_EQ((std::vector<int64_t>{policy.sink, policy.block, policy.lag}), (std::vector<int64_t>{0, 128, 0}));
  EXPECT_EQ(policy.quantized_prefix(127), 0);    // the step of token 127 reads 128 full-precision keys
  EXPECT_EQ(policy.quantized_prefix(128), 128);  // the step of token 128 reads the first 128 sketched
  EXPECT_EQ(policy.quantized_prefix(300), 256);
  EXPECT_EQ(buffered->resolved_params().at("residual_length"), "128");
  const RolePolicy plain = make_quantizer("qjl", {}, 64)->policy(Role::Key);
  EXPECT_EQ(plain.quantized_prefix(5), 6);  // its own token included
  EXPECT_EQ(make_quantizer("qjl", {}, 64)->resolved_params().at("sketch"), "gaussian");
}

TEST(Qjl, ParameterErrorsNameTheValue) {
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"m", "100"}}, 64); }),
            "quantizer 'qjl': m 100 is not a multiple of head_dim 64");
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"value_method", "qjl"}}, 64); }),
            "quantizer 'qjl': value_method cannot be qjl: QJL's sketch is for keys");
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"sketch", "haar"}}, 64); }),
            "quantizer 'qjl': parameter sketch = 'haar' is not one of gaussian, orthogonal");
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"residual_length", "-1"}}, 64); }),
            "quantizer 'qjl': parameter residual_length = -1 is out of range [0, 1048576]");
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"value_method", "kivii"}}, 64); })
                .rfind("unknown quantizer method 'kivii' (known: ", 0),
            0u);
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"value.v_bit", "2"}}, 64); })
                .rfind("quantizer 'rtn': unknown parameter 'v_bit'", 0),
            0u);
  EXPECT_EQ(test::error_message([] { make_quantizer("qjl", {{"v_bits", "2"}}, 64); })
                .rfind("quantizer 'qjl': unknown parameter 'v_bits'", 0),
            0u);
}

}  // namespace
}  // namespace kvdrift
