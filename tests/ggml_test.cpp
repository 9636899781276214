// The ggml method (llama.cpp's KV cache types) on blocks worked out by hand from ggml's reference
// quantizers, its storage cost, rotation and parameter errors. Bit-exactness against the gguf package's
// numpy quantizers on real keys and values: tests/oracle/test_ggml_formats.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "quant/hadamard.h"
#include "quant/quantizer.h"
#include "quant/storage.h"
#include "support.h"

namespace kvdrift {
namespace {

// One token of 32 channels: `head` first, the rest `fill`.
torch::Tensor block_of(std::vector<float> head, float fill = 0.0f) {
  head.resize(32, fill);
  return torch::tensor(head).reshape({1, 1, 32});
}

std::vector<int64_t> codes_of(const QuantizedTiles& tiles, int64_t count) {
  auto flat = tiles.codes.reshape({-1}).to(torch::kLong);
  return std::vector<int64_t>(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + count);
}

std::vector<float> values_of(const torch::Tensor& t, int64_t count) {
  auto flat = t.reshape({-1}).contiguous();
  return std::vector<float>(flat.data_ptr<float>(), flat.data_ptr<float>() + count);
}

TEST(Ggml, Q8_0RoundsHalfAwayFromZeroAgainstAmaxOver127) {
  // amax 127 gives d = 1: codes are roundf(x) + 128, so 2.5 -> 3 and -2.5 -> -3 (round-half-even would give 2).
  const auto q = make_quantizer("ggml", {{"type", "q8_0"}}, 32);
  const auto x = block_of({127.0f, -2.5f, 2.5f, 0.49f, -127.0f});
  const auto tiles = q->quantize(x, Role::Key, 0);
  EXPECT_EQ(tiles.bits, 8);
  EXPECT_EQ(codes_of(tiles, 6), (std::vector<int64_t>{255, 125, 131, 128, 1, 128}));
  EXPECT_EQ(values_of(tiles.params.at("scale").values, 1), (std::vector<float>{1.0f}));
  EXPECT_EQ(values_of(q->dequantize(tiles, Role::Key, 0), 5), (std::vector<float>{127, -3, 3, 0, -127}));
}

TEST(Ggml, Q4_0MapsTheSignedMaximumToCodeZeroAndTruncates) {
  // Signed max -8 (first of the largest magnitudes): d = -8 / -8 = 1; q = min(15, trunc(x + 8.5)).
  const auto q = make_quantizer("ggml", {{"type", "q4_0"}}, 32);
  const auto x = block_of({-8.0f, 1.0f, 2.4f, 7.9f, 8.0f, -0.6f});
  const auto tiles = q->quantize(x, Role::Value, 0);
  EXPECT_EQ(codes_of(tiles, 7), (std::vector<int64_t>{0, 9, 10, 15, 15, 7, 8}));
  EXPECT_EQ(values_of(q->dequantize(tiles, Role::Value, 0), 7), (std::vector<float>{-8, 1, 2, 7, 7, -1, 0}));
  // A positive maximum flips the sign of d: 4 -> d = -0.5, and 4 itself becomes code 0.
  const auto flipped = q->quantize(block_of({4.0f, -1.0f}), Role::Value, 0);
  EXPECT_EQ(values_of(flipped.params.at("scale").values, 1), (std::vector<float>{-0.5f}));
  EXPECT_EQ(codes_of(flipped, 3), (std::vector<int64_t>{0, 10, 8}));
}

TEST(Ggml, Q4_1AndQ5_1StoreMinimumAndStep) {
  const auto q4 = make_quantizer("ggml", {{"type", "q4_1"}}, 32);
  const auto x = block_of({-1.0f, 14.0f, 2.5f, 2.49f}, 5.2f);  // min -1, max 14: d = 1
  const auto tiles = q4->quantize(x, Role::Key, 0);
  EXPECT_EQ(codes_of(tiles, 5), (std::vector<int64_t>{0, 15, 4, 3, 6}));
  EXPECT_EQ(values_of(tiles.params.at("minimum").values, 1), (std::vector<float>{-1.0f}));
  EXPECT_EQ(values_of(q4->dequantize(tiles, Role::Key, 0), 5), (std::vector<float>{-1, 14, 3, 2, 5}));
  const auto q5 = make_quantizer("ggml", {{"type", "q5_1"}}, 32);
  const auto tiles5 = q5->quantize(block_of({0.0f, 31.0f, 30.5f}, 7.0f), Role::Key, 0);  // d = 1
  EXPECT_EQ(codes_of(tiles5, 4), (std::vector<int64_t>{0, 31, 31, 7}));
}

TEST(Ggml, Q5_0UsesSixteenAsItsCentre) {
  const auto q = make_quantizer("ggml", {{"type", "q5_0"}}, 32);
  const auto tiles = q->quantize(block_of({-16.0f, 15.6f, 3.0f}), Role::Key, 0);  // d = 1
  EXPECT_EQ(codes_of(tiles, 4), (std::vector<int64_t>{0, 31, 19, 16}));
  EXPECT_EQ(values_of(q->dequantize(tiles, Role::Key, 0), 3), (std::vector<float>{-16, 15, 3}));
}

TEST(Ggml, Mxfp4PicksTheNearestE2M1ValueUnderAPowerOfTwoScale) {
  // amax 6: e = floor(log2 6) - 2 + 127 = 127, d = 2^-1, so the grid is 0, .5, 1, 1.5, 2, 3, 4, 6 (and
  // negatives). 0.75 and 5 lie halfway: the first code wins (0.5, 4).
  const auto q = make_quantizer("ggml", {{"type", "mxfp4"}}, 32);
  const auto tiles = q->quantize(block_of({6.0f, -6.0f, 0.75f, 5.0f, -1.4f, 2.6f}), Role::Value, 0);
  EXPECT_EQ(values_of(tiles.params.at("exponent").values, 1), (std::vector<float>{127.0f}));
  EXPECT_EQ(codes_of(tiles, 7), (std::vector<int64_t>{7, 15, 1, 6, 11, 5, 0}));
  EXPECT_EQ(values_of(q->dequantize(tiles, Role::Value, 0), 6), (std::vector<float>{6, -6, 0.5, 4, -1.5, 3}));
  // An all-zero block: exponent 0, every code 0, dequantized to 0.
  const auto zero = q->quantize(torch::zeros({1, 1, 32}), Role::Value, 0);
  EXPECT_EQ(values_of(zero.params.at("exponent").values, 1), (std::vector<float>{0.0f}));
  EXPECT_EQ(q->dequantize(zero, Role::Value, 0).abs().max().item<float>(), 0.0f);
}

TEST(Ggml, StorageCostIsTheFormatsBitsPerElement) {
  // Every token is quantized when written (no sink, no residual), so the cost is the block's at any length.
  const std::vector<std::pair<std::string, double>> expected = {{"q8_0", 8.5}, {"q4_0", 4.5}, {"q4_1", 5.0},
                                                                {"q5_0", 5.5}, {"q5_1", 6.0}, {"mxfp4", 4.25}};
  for (const auto& [type, bits] : expected) {
    const auto q = make_quantizer("ggml", {{"type", type}}, 64);
    EXPECT_DOUBLE_EQ(storage_cost(*q, 64, 100).bits_per_element, bits) << type;
    const RolePolicy policy = q->policy(Role::Key);
    EXPECT_EQ((std::vector<int64_t>{policy.sink, policy.block, policy.lag}), (std::vector<int64_t>{0, 1, 1}));
  }
}

TEST(Ggml, RotationQuantizesTheRotatedVectorAndRotatesBack) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  auto x = torch::randn({3, 5, 64}, generator, torch::kFloat32);
  x.index_put_({torch::indexing::Slice(), torch::indexing::Slice(), 3}, 40.0f);  // an outlier channel
  const auto rotated = make_quantizer("ggml", {{"type", "q4_0"}, {"rotate", "true"}}, 64);
  const auto plain = make_quantizer("ggml", {{"type", "q4_0"}}, 64);
  const auto expected =
      quant::hadamard_unrotate(plain->dequantize(plain->quantize(quant::hadamard_rotate(x), Role::Key, 0), Role::Key, 0));
  EXPECT_TRUE(torch::equal(rotated->dequantize(rotated->quantize(x, Role::Key, 0), Role::Key, 0), expected));
  // The rotation spreads the outlier channel: lower error than without it.
  const auto error = [&](const Quantizer& q) {
    return (q.dequantize(q.quantize(x, Role::Key, 0), Role::Key, 0) - x).pow(2).sum().item<double>();
  };
  EXPECT_LT(error(*rotated), 0.5 * error(*plain));
  EXPECT_EQ(rotated->resolved_params(), (ParamMap{{"type", "q4_0"}, {"rotate", "true"}}));
}

TEST(Ggml, ParameterErrorsNameTheValue) {
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {}, 64); }),
            "quantizer 'ggml': needs a type (q8_0, q4_0, q4_1, q5_0, q5_1 or mxfp4), e.g. params: {type: q4_0}");
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q3_k"}}, 64); }),
            "quantizer 'ggml': parameter type = 'q3_k' is not one of q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4");
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}}, 48); }),
            "quantizer 'ggml': head_dim 48 is not a multiple of ggml's block of 32 channels");
  const std::string no_hadamard =
      test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}, {"rotate", "true"}}, 352); });
  EXPECT_EQ(no_hadamard.rfind("quantizer 'ggml': rotate: head_dim 352 has no Hadamard construction", 0), 0u)
      << no_hadamard;
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}, {"bits", "4"}}, 64); }),
            "quantizer 'ggml': unknown parameter 'bits' (its parameters: rotate, type)");
}

}  // namespace
}  // namespace kvdrift
