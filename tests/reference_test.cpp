// Validates the independent double-precision reference model (tests/reference/) itself, so that it can
// be trusted as the oracle for the LibTorch model's logits.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "reference/llama2c_pieces.h"
#include "reference/llama2c_reference.h"
#include "support.h"

namespace kvdrift::reference {
namespace {

constexpr int64_t kBosToken = 1;

// llama2.c's known-good greedy output: the oracle must reproduce it byte for byte, which checks the
// loading, RoPE, GQA and tied classifier against an independent implementation.
TEST(Llama2cReferenceTest, GreedyFromBosReproducesKnownGoodText) {
  const std::string dir = test::stories260k_dir();
  const Llama2cReference model(dir + "/stories260K.bin");
  const Llama2cPieces pieces(dir + "/tok512.bin");
  ASSERT_EQ(pieces.size(), model.vocab_size());

  // run.c semantics: 200 forward passes starting from BOS at position 0, so 200 generated tokens.
  const std::vector<int64_t> generated = greedy(model, kBosToken, 200);
  EXPECT_EQ(generated.size(), 200u);
  EXPECT_EQ(pieces.decode_all(kBosToken, generated), test::read_file(dir + "/expected_greedy_200steps.txt"));
}

// The full-sequence matrix path and the one-token-at-a-time KV-cache path share no attention code,
// so agreement at every position checks the causal mask, the RoPE positions and the cache.
TEST(Llama2cReferenceTest, FullRecomputationMatchesIncrementalCache) {
  const Llama2cReference model(test::stories260k_dir() + "/stories260K.bin");
  std::vector<int64_t> tokens = {kBosToken};
  while (tokens.size() < 20) tokens.push_back((tokens.back() * 97 + 31) % model.vocab_size());

  const std::vector<Eigen::VectorXd> full = model.logits(tokens);
  ASSERT_EQ(full.size(), tokens.size());
  Llama2cKvCache cache;
  for (size_t pos = 0; pos < tokens.size(); ++pos) {
    const Eigen::VectorXd incremental = model.step(tokens[pos], cache);
    ASSERT_EQ(incremental.size(), model.vocab_size());
    EXPECT_LT((full[pos] - incremental).cwiseAbs().maxCoeff(), 1e-9) << "position " << pos;
  }
}

TEST(Llama2cReferenceTest, TruncatedCheckpointThrowsNamingThePath) {
  const std::string checkpoint = test::read_file(test::stories260k_dir() + "/stories260K.bin");
  const std::string truncated_path = test::scratch_dir() + "/truncated.bin";
  test::write_file(truncated_path, checkpoint.substr(0, checkpoint.size() - 4));
  try {
    Llama2cReference model(truncated_path);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find(truncated_path), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace kvdrift::reference
