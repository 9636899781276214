#pragma once
// Text <-> token ids. Two formats: llama2.c's tokenizer.bin (score-greedy SentencePiece-style merges)
// and Hugging Face tokenizer.json (byte-level BPE with a pre-tokenizer regex).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kvdrift {

using TokenId = int64_t;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Special tokens written literally in `text` (e.g. "<|im_start|>") encode to their ids.
  virtual std::vector<TokenId> encode(std::string_view text, bool add_bos, bool add_eos = false) const = 0;
  // Special tokens (BOS/EOS) are dropped from the text; byte tokens are reassembled into UTF-8.
  virtual std::string decode(const std::vector<TokenId>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<TokenId> bos_id() const = 0;
  virtual std::vector<TokenId> eos_ids() const = 0;
};

// `path` is a tokenizer.json (Hugging Face) or a llama2.c tokenizer .bin; a directory means its
// tokenizer.json. Throws Error naming the file on anything malformed.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// The tokenizer a model runs with: `tokenizer_path` when given, else the tokenizer.json inside a
// Hugging Face model directory `model_path`, else none (nullptr).
std::unique_ptr<Tokenizer> tokenizer_for_model(const std::string& tokenizer_path, const std::string& model_path);

}  // namespace kvdrift
