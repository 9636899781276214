// Tests of the quantizer oracle itself (tests/reference/quant_reference.*) against facts stated
// independently of it: hand-computed codes, known float16/e4m3 values, Hadamard orthogonality.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "reference/quant_reference.h"

namespace kvdrift::reference {
namespace {

// Deterministic values in [-1, 1) from the raw mt19937 stream (the std distributions are
// implementation-defined).
Eigen::MatrixXd random_matrix(int rows, int cols, unsigned seed) {
  std::mt19937 gen(seed);
  Eigen::MatrixXd m(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m(r, c) = static_cast<double>(gen()) / 2147483648.0 - 1.0;
  }
  return m;
}

Eigen::MatrixXd row(std::initializer_list<double> values) {
  Eigen::MatrixXd m(1, static_cast<int>(values.size()));
  int c = 0;
  for (double v : values) m(0, c++) = v;
  return m;
}

// -------------------------------------------------------------------------------------------------
// Hadamard matrices

TEST(QuantReferenceHadamard, OrthonormalForSupportedDims) {
  for (int d : {1, 2, 8, 64, 128, 12, 24, 12 * 8, 20, 20 * 4, 28 * 4, 36 * 2, 40, 40 * 2, 40 * 4, 52 * 2, 60 * 2}) {
    const Eigen::MatrixXd h = reference_hadamard(d);
    ASSERT_EQ(h.rows(), d);
    ASSERT_EQ(h.cols(), d);
    EXPECT_LT((h * h.transpose() - Eigen::MatrixXd::Identity(d, d)).cwiseAbs().maxCoeff(), 1e-12) << "d = " << d;
    // Every entry of a normalised Hadamard matrix is ±1/√d.
    EXPECT_LT((h.cwiseAbs().array() - 1.0 / std::sqrt(d)).abs().maxCoeff(), 1e-12) << "d = " << d;
  }
}

TEST(QuantReferenceHadamard, KnownMatricesArePlusMinusOne) {
  for (int k : {2, 4, 12, 20, 28, 36, 40, 52, 60}) {
    const Eigen::MatrixXd h = reference_known_hadamard(k);
    ASSERT_EQ(h.rows(), k);
    EXPECT_TRUE((h.array().abs() == 1.0).all()) << "K = " << k;
    // Integer arithmetic, so H·Hᵀ = K·I holds exactly.
    EXPECT_EQ(h * h.transpose(), k * Eigen::MatrixXd::Identity(k, k)) << "K = " << k;
  }
}

TEST(QuantReferenceHadamard, SylvesterEntries) {
  const Eigen::MatrixXd h = reference_hadamard(8);
  const double e = 1.0 / std::sqrt(8.0);
  EXPECT_DOUBLE_EQ(h(0, 5), e);   // 0 & 5 = 0
  EXPECT_DOUBLE_EQ(h(3, 5), -e);  // 3 & 5 = 1: one bit
  EXPECT_DOUBLE_EQ(h(7, 7), -e);  // 7 & 7 = 7: three bits
  EXPECT_DOUBLE_EQ(h(6, 7), e);   // 6 & 7 = 6: two bits
  EXPECT_EQ(h, h.transpose());
}

TEST(QuantReferenceHadamard, KroneckerIndexIsKMajor) {
  // d = 24 = 12·2, i = a·2 + b. Paley I has H_12[a][0] = −1 for a > 0 (S's first column below the
  // corner is −1 and I only touches the diagonal), Sylvester H_2[b][0] = 1. So row 1 (a = 0, b = 1)
  // starts with +1 and row 2 (a = 1, b = 0) with −1; the other index order would swap these.
  const Eigen::MatrixXd h = reference_hadamard(24);
  EXPECT_NEAR(h(1, 0) * std::sqrt(24.0), 1.0, 1e-12);
  EXPECT_NEAR(h(2, 0) * std::sqrt(24.0), -1.0, 1e-12);
}

TEST(QuantReferenceHadamard, FortyTakesPrecedenceOverTwenty) {
  // d = 40·2^m is also 20·2^(m+1); docs/quantizers.md picks K = 40 (QuaRot's order).
  const Eigen::MatrixXd h40 = reference_known_hadamard(40);
  EXPECT_LT((reference_hadamard(40) * std::sqrt(40.0) - h40).cwiseAbs().maxCoeff(), 1e-12);
  // H_40 ⊗ H_2 (i = a·2 + b) against H_20 ⊗ H_4 (i = a·4 + b), using H_20[a][0] = −1 for a > 0:
  // row 2 is a = 1 in the first (H_40[1][0] = H_20[1][0] = −1) but a = 0 in the second (+1);
  // row 40 is a = 20 in the first (H_40[20][0] = H_20[0][0] = +1) but a = 10 in the second (−1).
  const Eigen::MatrixXd h80 = reference_hadamard(80) * std::sqrt(80.0);
  EXPECT_NEAR(h80(2, 0), -1.0, 1e-12);
  EXPECT_NEAR(h80(40, 0), 1.0, 1e-12);
}

TEST(QuantReferenceHadamard, UnsupportedDimThrowsNamingIt) {
  for (int d : {10, 44, 0, 3}) {
    try {
      reference_hadamard(d);
      ADD_FAILURE() << "no throw for d = " << d;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("d = " + std::to_string(d)), std::string::npos) << e.what();
    }
  }
}

// -------------------------------------------------------------------------------------------------
// Storage rounding

TEST(QuantReferenceRounding, Float16KnownValues) {
  // 1/3 = 1.333…·2^-2: spacing 2^-12, 1365.33 → 1365 → 1365/4096.
  EXPECT_EQ(round_to_float16(1.0 / 3.0), 0.333251953125);
  EXPECT_EQ(round_to_float16(-1.0 / 3.0), -0.333251953125);
  EXPECT_EQ(round_to_float16(0.1), 0.0999755859375);  // 1638.4·2^-14 → 1638
  EXPECT_EQ(round_to_float16(65504.0), 65504.0);
  EXPECT_EQ(round_to_float16(65519.0), 65504.0);  // below the midpoint 65520 to the next (absent) value
  EXPECT_TRUE(std::isinf(round_to_float16(65520.0)));
  // Subnormals: spacing 2^-24 ≈ 5.96e-8. 1e-8 is 0.168 of a step → 0; 1e-7 is 1.68 steps → 2.
  EXPECT_EQ(round_to_float16(1e-8), 0.0);
  EXPECT_EQ(round_to_float16(1e-7), std::ldexp(1.0, -23));
  EXPECT_EQ(round_to_float16(std::ldexp(1.0, -24)), std::ldexp(1.0, -24));
  // Ties to even: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 → 1; 1 + 3·2^-11 → 1 + 2^-9.
  EXPECT_EQ(round_to_float16(1.0 + std::ldexp(1.0, -11)), 1.0);
  EXPECT_EQ(round_to_float16(1.0 + 3 * std::ldexp(1.0, -11)), 1.0 + std::ldexp(1.0, -9));
  EXPECT_EQ(round_to_float16(std::ldexp(1.0, -25)), 0.0);  // half the smallest subnormal → even 0
  EXPECT_EQ(round_to_float16(3 * std::ldexp(1.0, -25)), std::ldexp(1.0, -23));
}

TEST(QuantReferenceRounding, Float8E4m3KnownValues) {
  // 0.3 = 1.2·2^-2: 3 mantissa bits give spacing 2^-5 = 0.03125 there; 0.3/0.03125 = 9.6 → 10,
  // so 0.3 → 10·2^-5 = 0.3125 (= 1.25·2^-2).
  EXPECT_EQ(round_to_float8_e4m3(0.3), 0.3125);
  EXPECT_EQ(round_to_float8_e4m3(448.0), 448.0);
  EXPECT_EQ(round_to_float8_e4m3(240.0), 240.0);  // 1.875·2^7
  EXPECT_EQ(round_to_float8_e4m3(500.0), 448.0);  // saturates
  EXPECT_EQ(round_to_float8_e4m3(-500.0), -448.0);
  EXPECT_EQ(round_to_float8_e4m3(std::ldexp(1.0, -9)), std::ldexp(1.0, -9));  // smallest subnormal
  EXPECT_EQ(round_to_float8_e4m3(0.001), std::ldexp(1.0, -9));  // 0.512 of a step → 1
  EXPECT_EQ(round_to_float8_e4m3(std::ldexp(1.0, -10)), 0.0);   // tie → even 0
  EXPECT_EQ(round_to_float8_e4m3(3 * std::ldexp(1.0, -10)), std::ldexp(1.0, -8));  // 1.5 steps → 2
  // Ties to even at 1 (spacing 1/8): 1.0625 → 1, 1.1875 → 1.25.
  EXPECT_EQ(round_to_float8_e4m3(1.0625), 1.0);
  EXPECT_EQ(round_to_float8_e4m3(1.1875), 1.25);
}

TEST(QuantReferenceRounding, StorageDispatch) {
  EXPECT_EQ(round_to_storage(0.1, "float32"), static_cast<double>(0.1f));
  EXPECT_EQ(round_to_storage(0.3, "float8_e4m3"), 0.3125);
  EXPECT_EQ(round_to_storage(1.0 / 3.0, "float16"), 0.333251953125);
  EXPECT_THROW(round_to_storage(1.0, "bfloat16"), std::invalid_argument);
}

// -------------------------------------------------------------------------------------------------
// RTN, KIVI, QuaRot

TEST(QuantReferenceRtn, TwoBitHandRow) {
  // min −1, max 2, s = 3/3 = 1; (x − min)/s = [0, 1.5, 2.5, 3] → ties to even give [0, 2, 2, 3].
  ReferenceSettings s{"rtn", true, 2, 4};
  const ReferenceQuantized q = reference_quantize(row({-1.0, 0.5, 1.5, 2.0}), s);
  EXPECT_EQ(q.codes, (Eigen::MatrixXi(1, 4) << 0, 2, 2, 3).finished());
  EXPECT_EQ(q.unrounded, row({0.0, 1.5, 2.5, 3.0}));
  EXPECT_EQ(q.params.at("scale"), row({1.0}));
  EXPECT_EQ(q.params.at("minimum"), row({-1.0}));
  EXPECT_EQ(q.dequantized, row({-1.0, 1.0, 1.0, 2.0}));
}

TEST(QuantReferenceRtn, ClipRatioClampsOutliers) {
  // c = 0.5: range [−1, 2], s = 1; (x + 1) = [−1, 0, 2, 5] → clamped codes [0, 0, 2, 3].
  ReferenceSettings s{"rtn", false, 2, 4};
  s.clip_ratio = 0.5;
  const ReferenceQuantized q = reference_quantize(row({-2.0, -1.0, 1.0, 4.0}), s);
  EXPECT_EQ(q.codes, (Eigen::MatrixXi(1, 4) << 0, 0, 2, 3).finished());
  EXPECT_EQ(q.unrounded, row({-1.0, 0.0, 2.0, 5.0}));
  EXPECT_EQ(q.dequantized, row({-1.0, -1.0, 1.0, 2.0}));
}

TEST(QuantReferenceRtn, PerChannelGroupsAlongTokens) {
  Eigen::MatrixXd x(4, 3);
  x << 0, 5, 1,  //
      3, 5, 2,   //
      -1, 6, 1,  //
      2, 7, 1;
  ReferenceSettings s{"rtn", true, 2, 2};
  s.axis = "per_channel";
  const ReferenceQuantized q = reference_quantize(x, s);
  ASSERT_EQ(q.params.at("scale").rows(), 2);
  ASSERT_EQ(q.params.at("scale").cols(), 3);
  // Channel 0, tokens 0–1: [0, 3], s = 1 → codes 0, 3. Tokens 2–3: [−1, 2] → 0, 3.
  EXPECT_EQ(q.codes.col(0), Eigen::Vector4i(0, 3, 0, 3));
  EXPECT_EQ(q.params.at("minimum")(1, 0), -1.0);
  // Channel 1, tokens 0–1 constant 5: s = eps 1e-8 (fp16 → 0), codes 0, dequantized exactly 5.
  EXPECT_EQ(q.codes(0, 1), 0);
  EXPECT_EQ(q.params.at("scale")(0, 1), 0.0);
  EXPECT_EQ(q.dequantized(1, 1), 5.0);
}

TEST(QuantReferenceRtn, GroupMustDivideAxis) {
  ReferenceSettings s{"rtn", true, 4, 3};
  EXPECT_THROW(reference_quantize(random_matrix(2, 4, 1), s), std::invalid_argument);
  s.axis = "per_channel";
  s.group_size = 4;
  EXPECT_THROW(reference_quantize(random_matrix(6, 4, 1), s), std::invalid_argument);
  s.bits = 9;
  s.group_size = 2;
  EXPECT_THROW(reference_quantize(random_matrix(6, 4, 1), s), std::invalid_argument);
}

TEST(QuantReferenceKivi, ConstantKeyChannelIsFinite) {
  Eigen::MatrixXd x = random_matrix(8, 3, 2);
  x.col(1).setConstant(0.7);
  const ReferenceSettings s{"kivi", true, 2, 4};
  const ReferenceQuantized q = reference_quantize(x, s);
  ASSERT_EQ(q.params.at("scale").rows(), 2);  // [T/G, D]
  ASSERT_EQ(q.params.at("scale").cols(), 3);
  EXPECT_TRUE(q.dequantized.allFinite());
  EXPECT_TRUE(q.unrounded.allFinite());
  for (int t = 0; t < 8; ++t) {
    EXPECT_EQ(q.codes(t, 1), 0);
    EXPECT_EQ(q.dequantized(t, 1), round_to_float16(0.7));
  }
}

TEST(QuantReferenceKivi, ValuesGroupAlongChannels) {
  const ReferenceSettings s{"kivi", false, 2, 2};
  const ReferenceQuantized q = reference_quantize(row({0.0, 3.0, 1.0, -2.0}), s);
  ASSERT_EQ(q.params.at("scale").rows(), 1);  // [T, D/G]
  ASSERT_EQ(q.params.at("scale").cols(), 2);
  EXPECT_EQ(q.codes, (Eigen::MatrixXi(1, 4) << 0, 3, 3, 0).finished());
  EXPECT_EQ(q.params.at("minimum"), row({0.0, -2.0}));
  EXPECT_THROW(reference_quantize(row({0.0, 1.0, 2.0}), s), std::invalid_argument);  // G = 2 ∤ 3
}

TEST(QuantReferenceQuarot, KeyZeroPointRule) {
  // Build x so that x·H is the chosen rotated tile (H orthonormal): D = 8, two groups of 4, 4 bits,
  // c = 0.95.
  Eigen::MatrixXd xr(3, 8);
  xr << 1, 2, 3, 4, -1, 0.5, 2, -3,  //
      -4, -3, -2, -1, 1, 1, 1, 1,     //
      0, 0, 0, 0, 0, 0, 0, 0;
  const Eigen::MatrixXd x = xr * reference_hadamard(8).transpose();
  ReferenceSettings s{"quarot", true, 4, 4};
  s.clip_ratio = 0.95;
  const ReferenceQuantized q = reference_quantize(x, s);
  const Eigen::MatrixXd& zero = q.params.at("zero");
  // All positive: xmin = min(min, 0)·c = 0 → z = 0. s = 3.8/15, x/s = [3.95, 7.89, 11.8, 15.8]
  // → [4, 8, 12, 16 clamped to 15].
  EXPECT_EQ(zero(0, 0), 0.0);
  EXPECT_EQ(q.codes.row(0).head(4), Eigen::RowVector4i(4, 8, 12, 15));
  // Mixed: xmin = −2.85, xmax = 1.9, s = 4.75/15, −xmin/s = 9.
  EXPECT_EQ(zero(0, 1), 9.0);
  // All negative: xmax = 0, −xmin/s = 15 = 2^b − 1.
  EXPECT_EQ(zero(1, 0), 15.0);
  // All zero (exactly: the whole row is 0 in both frames): range [−1, 1], s = 2/15,
  // z = round(7.5) = 8 (to even), codes 8, dequantized 0.
  EXPECT_EQ(zero(2, 0), 8.0);
  EXPECT_EQ(q.codes(2, 3), 8);
  EXPECT_EQ(q.dequantized.row(2), Eigen::MatrixXd::Zero(1, 8));
}

TEST(QuantReferenceQuarot, DequantizedInModelFrame) {
  // 8 bits, no clipping: the round trip is close to x in the model frame, so the rotation was undone.
  const Eigen::MatrixXd x = random_matrix(4, 12, 3);
  for (bool key : {true, false}) {
    ReferenceSettings s{"quarot", key, 8, 12};
    const ReferenceQuantized q = reference_quantize(x, s);
    EXPECT_LT((q.dequantized - x).cwiseAbs().maxCoeff(), 2e-2) << "key = " << key;
    EXPECT_EQ(q.params.at("scale").cols(), 1);
  }
}

// -------------------------------------------------------------------------------------------------
// KVarN

TEST(QuantReferenceKvarn, BalancedMatrixHasImbalanceTwo) {
  Eigen::MatrixXd x(2, 2);
  x << 1, -1, -1, 1;  // every row and column std is √2
  EXPECT_DOUBLE_EQ(reference_imbalance(x), 2.0);
  EXPECT_THROW(reference_imbalance(Eigen::MatrixXd::Ones(1, 4)), std::invalid_argument);
}

TEST(QuantReferenceKvarn, VarNDoesNotIncreaseImbalance) {
  // Rows and columns with very different spreads.
  Eigen::MatrixXd t = random_matrix(16, 8, 4);
  for (int r = 0; r < t.rows(); ++r) t.row(r) *= std::exp(0.4 * r - 3.0);
  for (int c = 0; c < t.cols(); ++c) t.col(c) *= 1.0 + 3.0 * c;
  const double before = reference_imbalance(t);
  for (int iters : {1, 2, 8, 16}) {
    const ReferenceVarN v = reference_varn(t, iters);
    EXPECT_LE(v.best_imbalance, before) << "iters = " << iters;
    EXPECT_NEAR(reference_imbalance(v.balanced), v.best_imbalance, 1e-9 * v.best_imbalance);
    for (int r = 0; r < t.rows(); ++r) {
      for (int c = 0; c < t.cols(); ++c) {
        EXPECT_NEAR(v.balanced(r, c) * v.col_scale(c) * v.row_scale(r), t(r, c), 1e-12);
      }
    }
    // Log scales are clipped to [−0.3, 10].
    EXPECT_GE(v.col_scale.minCoeff(), std::exp(-0.3) * (1 - 1e-12));
    EXPECT_GE(v.row_scale.minCoeff(), std::exp(-0.3) * (1 - 1e-12));
  }
  EXPECT_LT(reference_varn(t, 8).best_imbalance, before);  // this matrix is far from balanced
}

TEST(QuantReferenceKvarn, ZeroItersIsIdentity) {
  const Eigen::MatrixXd t = random_matrix(8, 4, 5);
  const ReferenceVarN v = reference_varn(t, 0);
  EXPECT_EQ(v.col_scale, Eigen::VectorXd::Ones(4));
  EXPECT_EQ(v.row_scale, Eigen::VectorXd::Ones(8));
  EXPECT_EQ(v.balanced, t);
  EXPECT_EQ(v.best_imbalance, reference_imbalance(t));
}

TEST(QuantReferenceKvarn, HandTileWithoutRotationOrVarN) {
  Eigen::MatrixXd x(2, 2);  // [T = 2 tokens, D = 2 channels]
  x << 0, -1,  //
      3, 2;
  ReferenceSettings s{"kvarn", true, 2, 2};
  s.iters = 0;
  s.rotate = false;
  // Keys: per channel across tokens. Channel 0 [0, 3], channel 1 [−1, 2]: s = 1, codes 0 then 3.
  const ReferenceQuantized k = reference_quantize(x, s);
  EXPECT_EQ(k.codes, (Eigen::MatrixXi(2, 2) << 0, 0, 3, 3).finished());
  EXPECT_EQ(k.params.at("kS"), row({1.0, 1.0}));
  EXPECT_EQ(k.params.at("kZ"), row({0.0, -1.0}));
  EXPECT_EQ(k.params.at("kT"), row({1.0, 1.0}));
  EXPECT_EQ(k.dequantized, x);
  // Values: per token across channels. Token 0 [0, −1]: lo −1, s = 1/3 → codes 3, 0; token 1 [3, 2]:
  // lo 2 → codes 3, 0. vS = fp16(1/3) = 0.333251953125, so 3·vS − 1 = −0.000244140625 and
  // 3·vS + 2 = 2.999755859375.
  s.key = false;
  const ReferenceQuantized v = reference_quantize(x, s);
  EXPECT_EQ(v.codes, (Eigen::MatrixXi(2, 2) << 3, 0, 3, 0).finished());
  EXPECT_EQ(v.params.at("vC"), row({1.0, 1.0}));
  EXPECT_EQ(v.params.at("vS"), row({0.333251953125, 0.333251953125}));
  EXPECT_EQ(v.params.at("vZ"), row({-1.0, 2.0}));
  EXPECT_EQ(v.dequantized, (Eigen::MatrixXd(2, 2) << -0.000244140625, -1.0, 2.999755859375, 2.0).finished());
}

TEST(QuantReferenceKvarn, EightBitRoundTripAndShapes) {
  Eigen::MatrixXd x = random_matrix(8, 16, 6);
  x.col(3) *= 20.0;  // an outlier channel
  for (bool key : {true, false}) {
    ReferenceSettings s{"kvarn", key, 8, 8};
    const ReferenceQuantized q = reference_quantize(x, s);
    EXPECT_LT((q.dequantized - x).cwiseAbs().maxCoeff(), 0.1) << "key = " << key;
    for (const auto& name : key ? std::vector<std::string>{"kS", "kZ"} : std::vector<std::string>{"vC"}) {
      EXPECT_EQ(q.params.at(name).rows(), 1);
      EXPECT_EQ(q.params.at(name).cols(), 16) << name;
    }
    for (const auto& name : key ? std::vector<std::string>{"kT"} : std::vector<std::string>{"vS", "vZ"}) {
      EXPECT_EQ(q.params.at(name).rows(), 1);
      EXPECT_EQ(q.params.at(name).cols(), 8) << name;
    }
  }
}

TEST(QuantReferenceKvarn, RejectsImpossibleTiles) {
  ReferenceSettings s{"kvarn", true, 4, 16};
  EXPECT_THROW(reference_quantize(random_matrix(8, 8, 7), s), std::invalid_argument);  // T ≠ G
  s.group_size = 6;
  EXPECT_THROW(reference_quantize(random_matrix(6, 8, 7), s), std::invalid_argument);  // not a power of two
  s.group_size = 8;
  s.iters = 65;
  EXPECT_THROW(reference_quantize(random_matrix(8, 8, 7), s), std::invalid_argument);
  s.iters = 8;
  EXPECT_THROW(reference_quantize(random_matrix(8, 10, 7), s), std::invalid_argument);  // no H for 10
  s.method = "gptq";
  EXPECT_THROW(reference_quantize(random_matrix(8, 8, 7), s), std::invalid_argument);
}

}  // namespace
}  // namespace kvdrift::reference
