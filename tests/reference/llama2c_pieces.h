#pragma once
// Independent decoder of llama2.c tokenizer pieces (tok512.bin and friends), for turning the
// reference model's token ids into text in tests; it mirrors run.c's decode(). Its encode is run.c's
// encode() as written there (a full rescan per merge: quadratic, for checking, not for speed).
#include <cstdint>
#include <string>
#include <vector>

namespace kvdrift::reference {

class Llama2cPieces {
 public:
  // Reads uint32 max_token_length, then (float score, int32 length, bytes) per id until the end of
  // the file. Throws std::runtime_error naming the path if the file is unreadable or truncated.
  explicit Llama2cPieces(const std::string& tokenizer_path);

  // The bytes `token` stands for when it follows `previous_token`: a leading space is dropped
  // right after BOS (SentencePiece's dummy prefix), and "<0xNN>" byte-fallback pieces become byte NN.
  std::string decode(int64_t previous_token, int64_t token) const;

  // Concatenated text of `tokens`, where tokens[0] follows `first_token` (which is not decoded).
  std::string decode_all(int64_t first_token, const std::vector<int64_t>& tokens) const;

  // run.c encode(): BOS, the dummy-prefix " " piece, one piece per UTF-8 codepoint (else one byte
  // token, byte + 3, per byte), then merges of the best-scoring adjacent pair, leftmost on ties.
  std::vector<int64_t> encode(const std::string& text) const;

  int64_t size() const { return static_cast<int64_t>(pieces_.size()); }

 private:
  int64_t id_of(const std::string& piece) const;  // -1 when absent

  std::string path_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
};

}  // namespace kvdrift::reference
