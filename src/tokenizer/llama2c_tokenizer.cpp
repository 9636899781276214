#include "tokenizer/llama2c_tokenizer.h"

#include <charconv>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/pair_merge.h"

namespace kvdrift {
namespace {

constexpr TokenId kBosId = 1;
constexpr TokenId kEosId = 2;
constexpr int64_t kMinVocabSize = 3 + 256;  // <unk>, BOS, EOS, then one token per byte value

// run.c decodes "<0xNN>" pieces to the raw byte NN (sscanf "<0x%02hhX>").
std::optional<char> byte_piece_value(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return std::nullopt;
  unsigned value = 0;
  auto [end, error] = std::from_chars(piece.data() + 3, piece.data() + 5, value, 16);
  if (error != std::errc() || end != piece.data() + 5) return std::nullopt;
  return static_cast<char>(value);
}

class Llama2cTokenizer final : public Tokenizer {
 public:
  explicit Llama2cTokenizer(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot read tokenizer file {}", path);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t offset = 0;
    auto read_field = [&](auto& value, const char* field) {
      // The format has no token count: a partial entry at the end is a cut-off file or stray bytes.
      if (bytes.size() - offset < sizeof value) {
        fail("{}: llama2.c tokenizer ends inside token {} ({} of it is cut off at byte {}): the file is truncated or "
             "has {} trailing bytes",
             path, pieces_.size(), field, bytes.size(), bytes.size() - offset);
      }
      std::memcpy(&value, bytes.data() + offset, sizeof value);
      offset += sizeof value;
    };
    uint32_t max_token_length = 0;
    if (bytes.size() < sizeof max_token_length) fail("{}: truncated llama2.c tokenizer: no header", path);
    read_field(max_token_length, "max_token_length");
    while (offset < bytes.size()) {
      float score = 0;
      int32_t length = 0;
      read_field(score, "the score");
      read_field(length, "the byte length");
      if (length < 0 || static_cast<uint32_t>(length) > max_token_length) {
        fail("{}: token {} has byte length {}, outside 0..{} (the file's max_token_length)", path, pieces_.size(),
             length, max_token_length);
      }
      if (bytes.size() - offset < static_cast<size_t>(length)) {
        fail("{}: llama2.c tokenizer ends inside token {} (it needs {} bytes, {} left): the file is truncated or has "
             "trailing bytes",
             path, pieces_.size(), length, bytes.size() - offset);
      }
      pieces_.emplace_back(bytes, offset, length);
      scores_.push_back(score);
      offset += length;
    }
    if (static_cast<int64_t>(pieces_.size()) < kMinVocabSize) {
      fail("{}: holds {} tokens; a llama2.c tokenizer needs at least {} (<unk>, BOS, EOS and 256 byte tokens)", path,
           pieces_.size(), kMinVocabSize);
    }
    // run.c looks pieces up by binary search, which picks an unspecified one among duplicates; the
    // first id wins here (tok512.bin has no duplicates).
    for (size_t id = 0; id < pieces_.size(); ++id) ids_.emplace(pieces_[id], static_cast<TokenId>(id));
    auto space = ids_.find(" ");
    if (space == ids_.end()) fail("{}: has no \" \" token, needed as the dummy prefix of every text", path);
    dummy_prefix_id_ = space->second;

    decoded_.reserve(pieces_.size());
    for (const auto& piece : pieces_) {
      auto byte = byte_piece_value(piece);
      decoded_.push_back(byte ? std::string(1, *byte) : piece);
    }
    decoded_[kBosId].clear();
    decoded_[kEosId].clear();
  }

  std::vector<TokenId> encode(std::string_view text, bool add_bos, bool add_eos) const override {
    std::vector<TokenId> tokens;
    if (add_bos) tokens.push_back(kBosId);
    if (!text.empty()) tokens.push_back(dummy_prefix_id_);
    // Like run.c: a byte plus the UTF-8 continuation bytes after it (4 bytes at most) is one
    // codepoint; codepoints missing from the vocabulary fall back to one token per byte.
    for (size_t start = 0; start < text.size();) {
      size_t end = start + 1;
      while (end < text.size() && end - start < 4 && (static_cast<uint8_t>(text[end]) & 0xC0) == 0x80) ++end;
      auto found = ids_.find(std::string(text.substr(start, end - start)));
      if (found != ids_.end()) {
        tokens.push_back(found->second);
      } else {
        for (size_t i = start; i < end; ++i) tokens.push_back(static_cast<uint8_t>(text[i]) + 3);
      }
      start = end;
    }
    merge_by_score(tokens);
    if (add_eos) tokens.push_back(kEosId);
    return tokens;
  }

  std::string decode(const std::vector<TokenId>& ids) const override {
    std::string text;
    TokenId previous = -1;
    for (TokenId id : ids) {
      if (id < 0 || id >= vocab_size()) {
        fail("token id {} is outside the vocabulary of {} ({} tokens)", id, path_, vocab_size());
      }
      std::string_view piece = decoded_[id];
      // The dummy-prefix space that encode() put after BOS is not part of the text.
      if (previous == kBosId && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
      text += piece;
      previous = id;
    }
    return text;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  std::optional<TokenId> bos_id() const override { return kBosId; }
  std::vector<TokenId> eos_ids() const override { return {kEosId}; }

 private:
  // The token whose piece is the concatenation of the two, if it exists; -1 otherwise.
  TokenId merged(TokenId left, TokenId right) const {
    auto found = ids_.find(pieces_[left] + pieces_[right]);
    return found == ids_.end() ? -1 : found->second;
  }

  // run.c's merge loop: repeatedly merge the adjacent pair whose merged token has the highest score
  // (the leftmost such pair on ties; scores must beat -1e10).
  void merge_by_score(std::vector<TokenId>& tokens) const {
    kvdrift::merge_pairs(tokens, [this](TokenId left, TokenId right) -> std::optional<PairMerge> {
      const TokenId merged_id = merged(left, right);
      if (merged_id < 0 || scores_[merged_id] <= -1e10f) return std::nullopt;
      return PairMerge{-static_cast<double>(scores_[merged_id]), merged_id};
    });
  }

  std::string path_;
  std::vector<std::string> pieces_;  // indexed by id, exactly as stored
  std::vector<float> scores_;
  std::unordered_map<std::string, TokenId> ids_;
  TokenId dummy_prefix_id_ = -1;
  std::vector<std::string> decoded_;  // what each id decodes to: byte tokens as the byte, BOS/EOS as ""
};

}  // namespace

std::unique_ptr<Tokenizer> load_llama2c_tokenizer(const std::string& path) {
  return std::make_unique<Llama2cTokenizer>(path);
}

}  // namespace kvdrift
