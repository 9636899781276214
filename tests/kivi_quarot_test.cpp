// KIVI and QuaRot quantizers on hand-made tiles, their parameter checks, and the known Hadamard
// matrices behind non-power-of-two head dims.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "core/error.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"
#include "support.h"

namespace kvdrift {
std::unique_ptr<Quantizer> make_kivi(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_quarot(ParamReader& params, int64_t head_dim);
}  // namespace kvdrift

namespace kvdrift {
namespace {

using Factory = std::unique_ptr<Quantizer> (*)(ParamReader&, int64_t);

// What make_quantizer does: build, then reject parameters nobody read.
std::unique_ptr<Quantizer> build(Factory factory, const std::string& method, const ParamMap& params,
                                 int64_t head_dim) {
  ParamReader reader(method, params);
  auto quantizer = factory(reader, head_dim);
  reader.finish();
  return quantizer;
}

// Expects `make` to throw kvdrift::Error whose message contains every one of `needles`.
template <typename Make>
void expect_error_naming(Make make, std::initializer_list<std::string> needles) {
  const std::string message = test::error_message(make);
  for (const auto& needle : needles) EXPECT_NE(message.find(needle), std::string::npos) << message;
}

torch::Tensor tensor_2d(std::initializer_list<std::initializer_list<float>> rows) {
  std::vector<float> flat;
  for (const auto& row : rows) flat.insert(flat.end(), row);
  const int64_t columns = static_cast<int64_t>(rows.begin()->size());
  return torch::tensor(flat).reshape({-1, columns});
}

torch::Tensor codes_2d(std::initializer_list<std::initializer_list<float>> rows) {
  return tensor_2d(rows).to(torch::kUInt8);
}

// --- known Hadamard matrices -------------------------------------------------------------------

TEST(KnownHadamard, EveryOrderIsHadamardExactly) {
  for (int64_t k : {12, 20, 28, 36, 40, 52, 60}) {
    auto h = quant::known_hadamard_matrix(k);
    ASSERT_EQ(h.sizes(), (std::vector<int64_t>{k, k})) << k;
    EXPECT_TRUE(torch::equal(h.abs(), torch::ones({k, k}))) << "entries are not +-1 for K = " << k;
    EXPECT_TRUE(torch::equal(torch::matmul(h, h.t()), k * torch::eye(k))) << "H H^T != K I for K = " << k;
  }
}

TEST(KnownHadamard, Paley12FirstRowsFollowTheConstruction) {
  // H = I + [[0, 1^T], [-1, Q]]: first row all ones, first column -1 below the diagonal; Q[0][1] =
  // chi(0 - 1) = chi(10) = -1 in GF(11) (squares 1, 3, 4, 5, 9), Q[0][2] = chi(-2) = chi(9) = +1.
  auto h = quant::known_hadamard_matrix(12);
  EXPECT_TRUE(torch::equal(h[0], torch::ones({12})));
  EXPECT_TRUE(torch::equal(h.slice(0, 1).select(1, 0), -torch::ones({11})));
  EXPECT_EQ(h[1][1].item<float>(), 1.0f);
  EXPECT_EQ(h[1][2].item<float>(), -1.0f);
  EXPECT_EQ(h[1][3].item<float>(), 1.0f);
}

TEST(KnownHadamard, UnknownOrderThrowsNamingIt) {
  expect_error_naming([] { quant::known_hadamard_matrix(44); }, {"44"});
}

TEST(KnownHadamard, RotationRoundTripsAndPreservesNorms) {
  torch::manual_seed(7);
  for (int64_t d : {96, 80, 128, 56, 72, 104, 120, 160}) {
    auto x = torch::randn({3, 5, d});
    auto rotated = quant::hadamard_rotate(x);
    EXPECT_TRUE(torch::allclose(rotated.norm(2, -1), x.norm(2, -1), 1e-5, 1e-5)) << d;
    EXPECT_TRUE(torch::allclose(quant::hadamard_unrotate(rotated), x, 1e-5, 1e-5)) << d;
    EXPECT_GT((rotated - x).abs().max().item<float>(), 0.1f) << "d = " << d << " did not rotate";
  }
}

// The CPU kernel against its reference (torch operations): equal bit for bit, on contiguous and strided
// inputs, magnitudes from 1e-30 to 1e30, every power-of-two length up to 256; the input is left as it was.
TEST(WalshHadamard, CpuKernelEqualsTheReferenceBitForBit) {
  torch::manual_seed(11);
  for (int64_t d : {1, 2, 4, 8, 16, 32, 64, 128, 256}) {
    const auto magnitudes = torch::pow(10.0, torch::randint(-30, 31, {3, 5, 1}).to(torch::kFloat32));
    const auto x = torch::randn({3, 5, d}) * magnitudes;
    const auto before = x.clone();
    const auto kernel = quant::walsh_hadamard_cpu(x);
    EXPECT_TRUE(torch::equal(kernel, quant::walsh_hadamard_reference(x))) << d;
    EXPECT_TRUE(torch::equal(x, before)) << d;
    EXPECT_TRUE(torch::equal(quant::walsh_hadamard(x), kernel)) << d;  // the kernel is what float32 CPU gets
    const auto strided = torch::randn({2 * d, 6}).t();                  // last dimension of stride 6
    EXPECT_TRUE(torch::equal(quant::walsh_hadamard_cpu(strided), quant::walsh_hadamard_reference(strided))) << d;
  }
  // H_4 by hand on one vector: rows of [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
  const auto e = quant::walsh_hadamard_cpu(torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}));
  EXPECT_TRUE(torch::equal(e, torch::tensor({10.0f, -2.0f, -4.0f, 0.0f})));
  expect_error_naming([] { quant::walsh_hadamard_cpu(torch::ones({4}, torch::kFloat64)); }, {"float32 CPU", "Double"});
  expect_error_naming([] { quant::walsh_hadamard_cpu(torch::ones({2, 12})); }, {"length 12", "power of two"});
}

// --- KIVI -----------------------------------------------------------------------------------------

// Four tokens x four channels; with G = R = 4 the key groups are the columns, the value groups the rows.
torch::Tensor kivi_tile() {
  return tensor_2d({{0.0f, 1.0f, -3.0f, 2.0f},  //
                    {1.0f, 1.0f, 0.0f, 2.5f},
                    {2.0f, 1.0f, 1.4f, 2.0f},
                    {3.0f, 1.0f, 3.0f, 3.5f}});
}

TEST(Kivi, KeyCodesPerChannelMatchHandComputed) {
  auto kivi = build(make_kivi, "kivi", {{"group_size", "4"}, {"residual_length", "4"}, {"scale_dtype", "float32"}}, 4);
  // Two tiles: the second is twice the first, so it has the same codes and doubled parameters.
  auto x = torch::stack({kivi_tile(), 2 * kivi_tile()});
  auto tiles = kivi->quantize(x, Role::Key, 0);
  // Columns, 2 bits: [0,1,2,3] s=1; constant 1 (s = eps); [-3,0,1.4,3] s=2 -> 0,1.5,2.2,3 -> 0,2,2,3
  // (half to even); [2,2.5,2,3.5] s=0.5 -> 0,1,0,3.
  auto codes = codes_2d({{0, 0, 0, 0}, {1, 0, 2, 1}, {2, 0, 2, 0}, {3, 0, 3, 3}});
  EXPECT_EQ(tiles.bits, 2);
  EXPECT_TRUE(torch::equal(tiles.codes, torch::stack({codes, codes})));
  auto scale = tiles.params.at("scale").values;
  auto minimum = tiles.params.at("minimum").values;
  ASSERT_EQ(scale.sizes(), (std::vector<int64_t>{2, 1, 4}));
  // The constant channel keeps the eps scale in both tiles.
  EXPECT_TRUE(torch::equal(scale[0][0], torch::tensor({1.0f, 1e-8f, 2.0f, 0.5f})));
  EXPECT_TRUE(torch::equal(scale[1][0], torch::tensor({2.0f, 1e-8f, 4.0f, 1.0f})));
  EXPECT_TRUE(torch::equal(minimum[0][0], torch::tensor({0.0f, 1.0f, -3.0f, 2.0f})));
  EXPECT_TRUE(torch::equal(minimum[1], 2 * minimum[0]));
  // x^ = q s + min.
  auto expected = tensor_2d({{0, 1, -3, 2}, {1, 1, 1, 2.5}, {2, 1, 1, 2}, {3, 1, 3, 3.5}});
  auto back = kivi->dequantize(tiles, Role::Key, 0);
  EXPECT_TRUE(torch::equal(back[0], expected));
  EXPECT_TRUE(torch::equal(back[1], 2 * expected));
}

TEST(Kivi, ValueCodesPerTokenMatchHandComputed) {
  auto kivi = build(make_kivi, "kivi", {{"group_size", "4"}, {"residual_length", "4"}}, 4);
  auto tiles = kivi->quantize(kivi_tile().unsqueeze(0), Role::Value, 0);
  // Rows, 2 bits: [0,1,-3,2] s=5/3 -> 1.8,2.4,0,3; [1,1,0,2.5] s=5/6 -> 1.2,1.2,0,3;
  // [2,1,1.4,2] s=1/3 -> 3,0,1.2,3; [3,1,3,3.5] s=5/6 -> 2.4,0,2.4,3.
  auto codes = codes_2d({{2, 2, 0, 3}, {1, 1, 0, 3}, {3, 0, 1, 3}, {2, 0, 2, 3}});
  EXPECT_TRUE(torch::equal(tiles.codes[0], codes));
  const auto& scale = tiles.params.at("scale");
  EXPECT_EQ(scale.dtype, StoredDtype::Float16);
  ASSERT_EQ(scale.values.sizes(), (std::vector<int64_t>{1, 4, 1}));
  // Dequantization uses the float16-rounded scale, not the float32 one the codes came from.
  auto stored = torch::tensor({5.0f / 3, 2.5f / 3, 1.0f / 3, 2.5f / 3}).to(torch::kFloat16).to(torch::kFloat32);
  EXPECT_TRUE(torch::equal(scale.values.flatten(), stored));
  auto minimum = torch::tensor({-3.0f, 0.0f, 1.0f, 1.0f}).unsqueeze(1);
  auto expected = codes.to(torch::kFloat32) * stored.unsqueeze(1) + minimum;
  EXPECT_TRUE(torch::equal(kivi->dequantize(tiles, Role::Value, 0)[0], expected));
}

TEST(Kivi, KVarNPaperPresetSinkAndValueGroups) {
  auto paper = build(make_kivi, "kivi", {{"preset", "kvarn-paper"}}, 128);
  const ParamMap expected = {{"preset", "kvarn-paper"}, {"k_bits", "2"},             {"v_bits", "2"},
                             {"group_size", "128"},     {"value_group_size", "128"}, {"residual_length", "128"},
                             {"sink_tokens", "128"},    {"scale_dtype", "float16"},  {"zero_dtype", "float16"},
                             {"scale_rounding", "after_codes"}};
  EXPECT_EQ(paper->resolved_params(), expected);
  for (Role role : {Role::Key, Role::Value}) EXPECT_EQ(paper->policy(role).sink, 128);
  // Keys flush R = 128 at a time counted from the sink: at token 255 nothing, at 256 [128, 256).
  EXPECT_EQ(paper->policy(Role::Key).quantized_prefix(255), 128);
  EXPECT_EQ(paper->policy(Role::Key).quantized_prefix(256), 256);
  // Values: the window of 128 full-precision values behind the sink.
  EXPECT_EQ(paper->policy(Role::Value).quantized_prefix(200), 128);
  EXPECT_EQ(paper->policy(Role::Value).quantized_prefix(300), 172);
  // A 64-wide head cannot hold a 128-channel value group: the preset takes the whole head.
  EXPECT_EQ(build(make_kivi, "kivi", {{"preset", "kvarn-paper"}}, 64)->resolved_params().at("value_group_size"), "64");
  // A sink not a multiple of the residual: blocks still start at the sink.
  auto odd = build(make_kivi, "kivi", {{"sink_tokens", "4"}, {"residual_length", "32"}}, 64);
  EXPECT_EQ(odd->policy(Role::Key).quantized_prefix(35), 4);
  EXPECT_EQ(odd->policy(Role::Key).quantized_prefix(36), 36);
  const std::string bad = test::error_message([] { build(make_kivi, "kivi", {{"value_group_size", "48"}}, 64); });
  EXPECT_NE(bad.find("value_group_size 48 does not divide head_dim 64"), std::string::npos) << bad;
}

TEST(Kivi, DefaultsShapesAndPolicy) {
  auto kivi = build(make_kivi, "kivi", {}, 64);
  const ParamMap expected = {{"preset", "kivi"},         {"k_bits", "2"},           {"v_bits", "2"},
                             {"group_size", "32"},       {"value_group_size", "32"}, {"residual_length", "128"},
                             {"sink_tokens", "0"},       {"scale_dtype", "float16"}, {"zero_dtype", "float16"},
                             {"scale_rounding", "after_codes"}};
  EXPECT_EQ(kivi->resolved_params(), expected);
  auto keys = kivi->quantize(torch::randn({3, 128, 64}), Role::Key, 0);
  EXPECT_EQ(keys.codes.sizes(), (std::vector<int64_t>{3, 128, 64}));
  EXPECT_EQ(keys.params.at("scale").values.sizes(), (std::vector<int64_t>{3, 4, 64}));
  EXPECT_EQ(keys.params.at("minimum").values.sizes(), (std::vector<int64_t>{3, 4, 64}));
  auto values = kivi->quantize(torch::randn({3, 7, 64}), Role::Value, 0);
  EXPECT_EQ(values.codes.sizes(), (std::vector<int64_t>{3, 7, 64}));
  EXPECT_EQ(values.params.at("scale").values.sizes(), (std::vector<int64_t>{3, 7, 2}));
  EXPECT_LE(values.codes.max().item<int>(), 3);
  const RolePolicy key_policy = kivi->policy(Role::Key), value_policy = kivi->policy(Role::Value);
  EXPECT_EQ(key_policy.sink, 0);
  EXPECT_EQ(key_policy.block, 128);
  EXPECT_EQ(key_policy.lag, 0);
  EXPECT_EQ(value_policy.sink, 0);
  EXPECT_EQ(value_policy.block, 1);
  EXPECT_EQ(value_policy.lag, -128);
}

TEST(Kivi, KeyTileMustHoldTheResidual) {
  auto kivi = build(make_kivi, "kivi", {}, 64);
  expect_error_naming([&] { kivi->quantize(torch::randn({1, 64, 64}), Role::Key, 0); }, {"residual_length", "64"});
}

TEST(Kivi, ConstantTilesStayFinite) {
  auto kivi = build(make_kivi, "kivi", {{"k_bits", "4"}, {"v_bits", "3"}}, 64);
  for (float constant : {0.0f, 0.3f, -7.0f}) {
    auto keys = torch::full({2, 128, 64}, constant);
    auto values = torch::full({2, 5, 64}, constant);
    auto key_back = kivi->dequantize(kivi->quantize(keys, Role::Key, 0), Role::Key, 0);
    auto value_back = kivi->dequantize(kivi->quantize(values, Role::Value, 0), Role::Value, 0);
    ASSERT_TRUE(torch::isfinite(key_back).all().item<bool>()) << constant;
    ASSERT_TRUE(torch::isfinite(value_back).all().item<bool>()) << constant;
    // The minimum carries the whole value, rounded to float16.
    const float stored = torch::tensor(constant).to(torch::kFloat16).item<float>();
    EXPECT_TRUE(torch::equal(key_back, torch::full_like(keys, stored))) << constant;
    EXPECT_TRUE(torch::equal(value_back, torch::full_like(values, stored))) << constant;
  }
}

TEST(Kivi, BadParametersNameTheParameter) {
  expect_error_naming([] { build(make_kivi, "kivi", {{"group_size", "5"}}, 64); }, {"group_size", "5", "64"});
  expect_error_naming([] { build(make_kivi, "kivi", {{"residual_length", "100"}}, 64); }, {"residual_length", "100"});
  expect_error_naming([] { build(make_kivi, "kivi", {{"k_bit", "4"}}, 64); }, {"k_bit"});
  expect_error_naming([] { build(make_kivi, "kivi", {{"v_bits", "9"}}, 64); }, {"v_bits"});
  expect_error_naming([] { build(make_kivi, "kivi", {{"scale_dtype", "bfloat16"}}, 64); }, {"scale_dtype"});
}

// --- QuaRot ---------------------------------------------------------------------------------------

// The model-frame vector whose rotation by H_4 / 2 (Sylvester) is `rotated`; exact for these values.
torch::Tensor unrotated_row(std::initializer_list<float> rotated) {
  return quant::hadamard_unrotate(torch::tensor(std::vector<float>(rotated)).reshape({1, 1, 4}));
}

TEST(QuaRot, KeyCodesWithZeroPointMatchHandComputed) {
  auto quarot = build(make_quarot, "quarot", {{"k_bits", "2"}, {"clip_ratio", "1"}, {"scale_dtype", "float32"}}, 4);
  auto x = unrotated_row({3.0f, 0.0f, -1.5f, 1.5f});
  EXPECT_TRUE(torch::equal(x.flatten(), torch::tensor({1.5f, 0.0f, 1.5f, 3.0f})));
  auto tiles = quarot->quantize(x, Role::Key, 0);
  // Range [-1.5, 3], s = 4.5 / 3 = 1.5, z = round(1.5 / 1.5) = 1, q = round(y / s) + z.
  EXPECT_TRUE(torch::equal(tiles.codes.flatten(), torch::tensor({3, 1, 0, 2}).to(torch::kUInt8)));
  EXPECT_EQ(tiles.params.at("scale").values.item<float>(), 1.5f);
  EXPECT_EQ(tiles.params.at("zero").values.item<float>(), 1.0f);
  EXPECT_EQ(tiles.params.at("zero").dtype, StoredDtype::UInt8);
  EXPECT_TRUE(torch::equal(quarot->dequantize(tiles, Role::Key, 0), x));
}

TEST(QuaRot, KeyZeroPointIsZeroForAllPositiveGroup) {
  auto quarot = build(make_quarot, "quarot", {{"k_bits", "2"}, {"clip_ratio", "1"}}, 4);
  auto x = unrotated_row({1.0f, 2.5f, 3.0f, 4.0f});
  auto tiles = quarot->quantize(x, Role::Key, 0);
  // Range [0, 4], s = 4/3, z = 0, q = round(0.75, 1.875, 2.25, 3).
  EXPECT_EQ(tiles.params.at("zero").values.item<float>(), 0.0f);
  EXPECT_TRUE(torch::equal(tiles.codes.flatten(), torch::tensor({1, 2, 2, 3}).to(torch::kUInt8)));
  // An all-negative group puts the zero point at the top code.
  auto negative = quarot->quantize(-x, Role::Key, 0);
  EXPECT_EQ(negative.params.at("zero").values.item<float>(), 3.0f);
  EXPECT_TRUE(torch::equal(negative.codes.flatten(), torch::tensor({2, 1, 1, 0}).to(torch::kUInt8)));
}

TEST(QuaRot, ValueCodesAndPerRoleClipDefaults) {
  // 8-bit keys clip at 1.0, 2-bit values at 0.95.
  auto quarot = build(make_quarot, "quarot", {{"k_bits", "8"}, {"v_bits", "2"}, {"scale_dtype", "float32"}}, 4);
  EXPECT_EQ(quarot->resolved_params().at("clip_ratio"), "1 (keys), 0.95 (values)");
  auto x = unrotated_row({3.0f, 0.0f, -1.5f, 1.5f});
  auto keys = quarot->quantize(x, Role::Key, 0);
  EXPECT_FLOAT_EQ(keys.params.at("scale").values.item<float>(), 4.5f / 255);
  auto values = quarot->quantize(x, Role::Value, 0);
  // [min c, max c] = [-1.425, 2.85], s = 1.425, z = round(1.425 / s) = 1: round(y / s) + z =
  // round(2.1, 0, -1.05, 1.05) + 1 = 3, 1, 0, 2.
  EXPECT_FLOAT_EQ(values.params.at("scale").values.item<float>(), 1.425f);
  EXPECT_EQ(values.params.at("zero").values.item<float>(), 1.0f);
  EXPECT_EQ(values.params.at("zero").dtype, StoredDtype::Float32);  // zero_dtype follows scale_dtype
  EXPECT_TRUE(torch::equal(values.codes.flatten(), torch::tensor({3, 1, 0, 2}).to(torch::kUInt8)));
  auto rotated_back = quant::hadamard_rotate(quarot->dequantize(values, Role::Value, 0)).flatten();
  EXPECT_TRUE(torch::allclose(rotated_back, torch::tensor({2.85f, 0.0f, -1.425f, 1.425f}), 1e-5, 1e-6));
}

TEST(QuaRot, ValueZeroPointIsQuaRotsIntegerOneOutsideTheCodesWhenTheRangeExcludesZero) {
  auto quarot = build(make_quarot, "quarot", {{"v_bits", "2"}, {"clip_ratio", "1"}}, 4);
  auto x = unrotated_row({1.0f, 2.5f, 3.0f, 4.0f});
  auto values = quarot->quantize(x, Role::Value, 0);
  // [1, 4], s = 1, z = round(-1) = -1 (stored in float16): q = round(y) - 1 = 0, 1 (2.5 -> 2), 2, 3;
  // x_hat = s (q - z) = 1, 2, 3, 4.
  EXPECT_EQ(values.params.at("zero").values.item<float>(), -1.0f);
  EXPECT_EQ(values.params.at("zero").dtype, StoredDtype::Float16);
  EXPECT_TRUE(torch::equal(values.codes.flatten(), torch::tensor({0, 1, 2, 3}).to(torch::kUInt8)));
  auto rotated_back = quant::hadamard_rotate(quarot->dequantize(values, Role::Value, 0)).flatten();
  EXPECT_TRUE(torch::allclose(rotated_back, torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}), 0, 1e-6));
  // The float-minimum variant: q = round(y - 1) = 0, 2 (1.5 -> 2), 2, 3, x_hat = q + 1 = 1, 3, 3, 4.
  auto float_minimum = build(make_quarot, "quarot",
                             {{"v_bits", "2"}, {"clip_ratio", "1"}, {"value_zero_point", "float_minimum"}}, 4);
  auto minimum_values = float_minimum->quantize(x, Role::Value, 0);
  EXPECT_EQ(minimum_values.params.count("zero"), 0u);
  EXPECT_EQ(minimum_values.params.at("minimum").values.item<float>(), 1.0f);
  rotated_back = quant::hadamard_rotate(float_minimum->dequantize(minimum_values, Role::Value, 0)).flatten();
  EXPECT_TRUE(torch::allclose(rotated_back, torch::tensor({1.0f, 3.0f, 3.0f, 4.0f}), 0, 1e-6));
  // A constant group is widened to contain 0 and comes back exactly: [0, 2], s = 2/3, z = 0, q = 3.
  auto constant = quarot->quantize(unrotated_row({2.0f, 2.0f, 2.0f, 2.0f}), Role::Value, 0);
  EXPECT_EQ(constant.params.at("zero").values.item<float>(), 0.0f);
  EXPECT_TRUE(torch::equal(constant.codes.flatten(), torch::tensor({3, 3, 3, 3}).to(torch::kUInt8)));
  const std::string unknown =
      test::error_message([] { build(make_quarot, "quarot", {{"value_zero_point", "float"}}, 4); });
  EXPECT_NE(unknown.find("value_zero_point"), std::string::npos) << unknown;
}

TEST(QuaRot, DefaultsAndGivenClipRatioApplyToBothRoles) {
  auto defaults = build(make_quarot, "quarot", {}, 128);
  const ParamMap expected = {{"k_bits", "4"},           {"v_bits", "4"},          {"group_size", "128"},
                             {"clip_ratio", "0.95"},     {"scale_dtype", "float16"}, {"zero_dtype", "float16"},
                             {"value_zero_point", "integer"}, {"scale_rounding", "after_codes"}};
  EXPECT_EQ(defaults->resolved_params(), expected);
  auto given = build(make_quarot, "quarot", {{"k_bits", "8"}, {"clip_ratio", "0.9"}}, 128);
  EXPECT_EQ(given->resolved_params().at("clip_ratio"), "0.9");
  for (Role role : {Role::Key, Role::Value}) {
    const RolePolicy policy = defaults->policy(role);
    EXPECT_EQ(policy.sink, 0);
    EXPECT_EQ(policy.block, 1);
    EXPECT_EQ(policy.lag, 1);
  }
}

TEST(QuaRot, GroupedNonPowerOfTwoHeadRoundTripsClosely) {
  // d = 96 = 12 * 8, 8-bit, groups of 32. In the rotated frame each element is off by at most half a
  // step plus the float16 rounding of the scale (< 255 * 2^-11 steps); the rotation keeps L2 norms.
  auto quarot = build(make_quarot, "quarot", {{"k_bits", "8"}, {"v_bits", "8"}, {"group_size", "32"}}, 96);
  torch::manual_seed(3);
  auto x = torch::randn({4, 9, 96});
  for (Role role : {Role::Key, Role::Value}) {
    auto tiles = quarot->quantize(x, role, 0);
    EXPECT_EQ(tiles.codes.sizes(), (std::vector<int64_t>{4, 9, 96}));
    EXPECT_EQ(tiles.params.at("scale").values.sizes(), (std::vector<int64_t>{4, 9, 3}));
    auto back = quarot->dequantize(tiles, role, 0);
    const float max_step = tiles.params.at("scale").values.max().item<float>();
    EXPECT_LT((back - x).norm(2, -1).max().item<float>(), 0.63f * std::sqrt(96.0f) * max_step) << "role " << static_cast<int>(role);
  }
}

TEST(QuaRot, ConstantTilesStayFinite) {
  auto quarot = build(make_quarot, "quarot", {}, 64);
  for (Role role : {Role::Key, Role::Value}) {
    auto zeros = torch::zeros({2, 3, 64});
    auto zero_back = quarot->dequantize(quarot->quantize(zeros, role, 0), role, 0);
    // An all-zero key group uses [-1, 1]: q = z, so zero maps exactly back to zero.
    EXPECT_TRUE(torch::equal(zero_back, zeros)) << "role " << static_cast<int>(role);
    auto ones = torch::full({2, 3, 64}, 0.25f);
    auto ones_back = quarot->dequantize(quarot->quantize(ones, role, 0), role, 0);
    EXPECT_TRUE(torch::isfinite(ones_back).all().item<bool>()) << "role " << static_cast<int>(role);
    EXPECT_TRUE(torch::allclose(ones_back, ones, 0.0, 0.05)) << "role " << static_cast<int>(role);
  }
}

TEST(QuaRot, BadParametersNameTheParameter) {
  expect_error_naming([] { build(make_quarot, "quarot", {}, 100); }, {"head_dim 100"});
  expect_error_naming([] { build(make_quarot, "quarot", {{"group_size", "5"}}, 64); }, {"group_size", "5", "64"});
  expect_error_naming([] { build(make_quarot, "quarot", {{"clip_ratio", "0"}}, 64); }, {"clip_ratio"});
  expect_error_naming([] { build(make_quarot, "quarot", {{"clip_ratio", "1.5"}}, 64); }, {"clip_ratio"});
  expect_error_naming([] { build(make_quarot, "quarot", {{"k_bit", "4"}}, 64); }, {"k_bit"});
}

}  // namespace
}  // namespace kvdrift
