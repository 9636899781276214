// The ggml method (llama.cpp's KV cache types) on blocks worked out by hand from ggml's reference
// quantizers, its storage cost, rotation and parameter errors. Bit-exactness against the gguf package's
// numpy quantizers on real keys and values: tests/oracle/test_ggml_formats.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "cache/quantized_kv_cache.h"
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

TEST(Ggml, Iq4NlCodesAgainstTheSignedMaximumThenFitsTheScaleByWeightedLeastSquares) {
  // Signed max -7.9375: d0 = -7.9375 / -127 = 1/16, so x / d0 = 16 x = -127, 13, 50, 7, -115.5, 0. Grid
  // -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113: 50 -> 53; 7 and -115.5 lie halfway and
  // take the larger (13, -104); 0 -> 1 (the grid has no zero). d = sum(x^3 v) / sum(x^2 v^2) in float32,
  // in element order (worked out with a numpy float32 port of quantize_row_iq4_nl_impl): 0.064862385,
  // stored as float16 0.06488037109375.
  const auto q = make_quantizer("ggml", {{"type", "iq4_nl"}}, 32);
  const auto tiles = q->quantize(block_of({-7.9375f, 0.8125f, 3.125f, 0.4375f, -7.21875f}), Role::Key, 0);
  EXPECT_EQ(tiles.bits, 4);
  EXPECT_EQ(codes_of(tiles, 6), (std::vector<int64_t>{0, 9, 12, 9, 1, 8}));
  EXPECT_EQ(values_of(tiles.params.at("scale").values, 1), (std::vector<float>{0.06488037109375f}));
  EXPECT_EQ(values_of(q->dequantize(tiles, Role::Key, 0), 6),
            (std::vector<float>{-8.23980712890625f, 0.84344482421875f, 3.43865966796875f, 0.84344482421875f,
                                -6.74755859375f, 0.06488037109375f}));
  // A positive maximum takes code 0 (-127) under a negative d: 113 -> -127, -50 -> 56.2 -> 53.
  const auto flipped = q->quantize(block_of({113.0f, -50.0f}), Role::Key, 0);
  EXPECT_EQ(codes_of(flipped, 3), (std::vector<int64_t>{0, 12, 8}));
  EXPECT_EQ(values_of(flipped.params.at("scale").values, 1), (std::vector<float>{-0.8916015625f}));
  EXPECT_EQ(values_of(q->dequantize(flipped, Role::Key, 0), 3),
            (std::vector<float>{113.2333984375f, -47.2548828125f, -0.8916015625f}));
  // Under ggml's 1e-15 a block is zero: d = 0, and every value comes back +0.
  const auto tiny = q->quantize(block_of({1e-16f, -1e-16f}), Role::Key, 0);
  EXPECT_EQ(values_of(tiny.params.at("scale").values, 1), (std::vector<float>{0.0f}));
  const auto restored = q->dequantize(tiny, Role::Key, 0);
  EXPECT_FALSE(restored.signbit().any().item<bool>());
  EXPECT_EQ(restored.abs().max().item<float>(), 0.0f);
}

TEST(Ggml, Nvfp4ScalesEachSixteenChannelsByAnUnsignedE4M3OfAmaxOverSix) {
  // Group 0: amax 6 -> 6 / 6 = 1 = ue4m3 0x38 (exponent 7, mantissa 0), half-scale 0.5: the grid is
  // 0 .5 1 1.5 2 3 4 6, ties to the first code as in mxfp4. Group 1: amax 0.9 -> 0.15 = 1.2 * 2^-3,
  // mantissa .2 = 1/8 + .075 with the rounding bit (1/16) set: 1.25 * 2^-3, code (4 << 3) | 2 = 34,
  // half-scale 0.078125, and 0.9 / 0.078125 = 11.52 -> 12 (code 7) -> 0.9375. Group 2: amax 6.375 ->
  // 1.0625, exactly halfway between 1 and 1.125: rounded up, code 57. Group 3: amax 6000 -> 1000 is clamped
  // to 448 and saturates at 0x7E (448, half-scale 224).
  const auto q = make_quantizer("ggml", {{"type", "nvfp4"}}, 64);
  std::vector<float> x(64, 0.0f);
  const std::vector<float> group0 = {6.0f, -6.0f, 0.75f, 5.0f, -1.4f, 2.6f};
  std::copy(group0.begin(), group0.end(), x.begin());
  x[16] = 0.9f;
  x[32] = 6.375f;
  x[48] = -6000.0f;
  x[49] = 100.0f;
  const auto tiles = q->quantize(torch::tensor(x).reshape({1, 1, 64}), Role::Value, 0);
  EXPECT_EQ(tiles.bits, 4);
  EXPECT_EQ(values_of(tiles.params.at("ue4m3_scale").values, 4), (std::vector<float>{56, 34, 57, 126}));
  EXPECT_EQ(codes_of(tiles, 7), (std::vector<int64_t>{7, 15, 1, 6, 11, 5, 0}));
  const auto restored = values_of(q->dequantize(tiles, Role::Value, 0), 64);
  EXPECT_EQ(std::vector<float>(restored.begin(), restored.begin() + 6), (std::vector<float>{6, -6, 0.5, 4, -1.5, 3}));
  EXPECT_EQ(restored[16], 0.9375f);
  EXPECT_EQ(restored[32], 6.75f);  // 6.375 / 0.5625 = 11.33 -> 12
  EXPECT_EQ(restored[48], -2688.0f);  // 12 * 224
  EXPECT_EQ(restored[49], 0.0f);      // 100 / 224 = 0.45 -> 0 (0.5 is the next value)
  // amax 6e-3 -> 1e-3 is subnormal in ue4m3: round(1e-3 * 512) = 1, half-scale 2^-10; amax 1e-4 -> code 0.
  const auto small = q->quantize(torch::cat({torch::full({1, 1, 16}, 6e-3f), torch::full({1, 1, 48}, 1e-4f)}, 2),
                                 Role::Value, 0);
  EXPECT_EQ(values_of(small.params.at("ue4m3_scale").values, 4), (std::vector<float>{1, 0, 0, 0}));
  // 6e-3 / 2^-10 = 6.14 -> 6 (code 5): 6 * 2^-10; the code-0 groups come back 0.
  std::vector<float> expected(16, 6.0f / 1024.0f);
  expected.push_back(0.0f);
  EXPECT_EQ(values_of(q->dequantize(small, Role::Value, 0), 17), expected);
}

TEST(Ggml, StorageCostIsTheFormatsBitsPerElement) {
  // Every token is quantized when written (no sink, no residual), so the cost is the block's at any length.
  const std::vector<std::pair<std::string, double>> expected = {{"q8_0", 8.5}, {"q4_0", 4.5}, {"q4_1", 5.0},
                                                                {"q5_0", 5.5}, {"q5_1", 6.0}, {"iq4_nl", 4.5},
                                                                {"mxfp4", 4.25}, {"nvfp4", 4.5}};
  for (const auto& [type, bits] : expected) {
    const auto q = make_quantizer("ggml", {{"type", type}}, 64);
    EXPECT_DOUBLE_EQ(storage_cost(*q, 64, 100).bits_per_element, bits) << type;
    const RolePolicy policy = q->policy(Role::Key);
    EXPECT_EQ((std::vector<int64_t>{policy.sink, policy.block, policy.lag}), (std::vector<int64_t>{0, 1, 1}));
  }
}

TEST(Ggml, PrefillReadsItsOwnKeysAndValuesQuantizedByDefault) {
  // llama.cpp writes every token to its cache quantized before attention reads it, the prompt's too:
  // the prefill's attention reads its own positions quantized (prefill: quantized, the default), in a
  // chunked prefill every chunk as well; prefill: full_precision gives every other method's prefill.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto k = torch::randn({1, 2, 5, 64}, generator, torch::kFloat32);
  const auto v = torch::randn({1, 2, 5, 64}, generator, torch::kFloat32);
  for (const std::string prefill : {"quantized", "full_precision"}) {
    SCOPED_TRACE(prefill);
    std::shared_ptr<const Quantizer> q = make_quantizer("ggml", {{"type", "q4_0"}, {"prefill", prefill}}, 64);
    EXPECT_EQ(q->resolved_params().at("prefill"), prefill);
    EXPECT_EQ(q->policy(Role::Key).prefill_reads_quantized, prefill == "quantized");
    const auto quantized = [&](const torch::Tensor& x, Role role) {
      return q->dequantize(q->quantize(x.reshape({-1, 1, 64}), role, 0), role, 0).reshape(x.sizes());
    };
    const auto expected = [&](const torch::Tensor& x, Role role) {
      return prefill == "quantized" ? quantized(x, role) : x;
    };
    QuantizedKVCache whole(q, 1, 1, 2, 8, 64, torch::kFloat32, torch::kCPU);
    const auto [keys, values] = whole.update(0, 0, k, v);
    EXPECT_TRUE(torch::equal(keys, expected(k, Role::Key)));
    EXPECT_TRUE(torch::equal(values, expected(v, Role::Value)));
    QuantizedKVCache chunked(q, 1, 1, 2, 8, 64, torch::kFloat32, torch::kCPU);
    chunked.update(0, 0, k.narrow(2, 0, 3), v.narrow(2, 0, 3));
    const auto [chunk_keys, chunk_values] = chunked.update(0, 3, k.narrow(2, 3, 2), v.narrow(2, 3, 2));
    // The second chunk reads the first quantized either way (due before it), its own as the policy says.
    EXPECT_TRUE(torch::equal(chunk_keys.narrow(2, 0, 3), quantized(k, Role::Key).narrow(2, 0, 3)));
    EXPECT_TRUE(torch::equal(chunk_keys.narrow(2, 3, 2), expected(k, Role::Key).narrow(2, 3, 2)));
    EXPECT_TRUE(torch::equal(chunk_values.narrow(2, 3, 2), expected(v, Role::Value).narrow(2, 3, 2)));
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
  EXPECT_EQ(rotated->resolved_params(), (ParamMap{{"type", "q4_0"}, {"rotate", "true"}, {"prefill", "quantized"}}));
}

TEST(Ggml, ParameterErrorsNameTheValue) {
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {}, 64); }),
            "quantizer 'ggml': needs a type (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4, nvfp4), e.g. params: "
            "{type: q4_0}");
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q3_k"}}, 64); }),
            "quantizer 'ggml': parameter type = 'q3_k' is not one of q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, mxfp4, "
            "nvfp4");
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}}, 48); }),
            "quantizer 'ggml': head_dim 48 is not a multiple of q8_0's block of 32 channels");
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "nvfp4"}}, 32); }),
            "quantizer 'ggml': head_dim 32 is not a multiple of nvfp4's block of 64 channels");
  const std::string no_hadamard =
      test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}, {"rotate", "true"}}, 352); });
  EXPECT_EQ(no_hadamard.rfind("quantizer 'ggml': rotate: head_dim 352 has no Hadamard construction", 0), 0u)
      << no_hadamard;
  EXPECT_EQ(test::error_message([] { make_quantizer("ggml", {{"type", "q8_0"}, {"bits", "4"}}, 64); }),
            "quantizer 'ggml': unknown parameter 'bits' (its parameters: prefill, rotate, type)");
}

}  // namespace
}  // namespace kvdrift
