#include "tokenizer/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "core/json_integer.h"
#include "tokenizer/pair_merge.h"

namespace kvdrift {
namespace {

using json = nlohmann::json;

// The pre-tokenizer regex of GPT-2, used by ByteLevel when "use_regex" is true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Added special tokens with one of these contents are end-of-sequence ids: the end-of-text and
// end-of-turn markers of Llama-2 (</s>), Llama-3 base and instruct, GPT-2 and Qwen2 base, and Qwen2
// chat. tokenizer.json does not say which token is EOS (tokenizer_config.json and
// generation_config.json do), so the known names are listed here.
constexpr std::array<std::string_view, 5> kEosContents = {"</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>",
                                                          "<|im_end|>"};

// Far above any real vocabulary (the largest are about 256K): ids index per-id tables, and two of
// them are packed into one 64-bit merge key.
constexpr TokenId kMaxTokenId = (1 << 24) - 1;

// UTF-8 of a codepoint below U+0800, all that the byte-level table needs.
std::string utf8(uint32_t codepoint) {
  if (codepoint < 0x80) return std::string(1, static_cast<char>(codepoint));
  return {static_cast<char>(0xC0 | (codepoint >> 6)), static_cast<char>(0x80 | (codepoint & 0x3F))};
}

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes for
// U+0100, U+0101, ... in byte order, so that every byte is one visible character in the vocabulary.
std::array<std::string, 256> byte_level_chars() {
  std::array<std::string, 256> chars;
  uint32_t next_unprintable = 0x100;
  for (uint32_t byte = 0; byte < 256; ++byte) {
    const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
    chars[byte] = utf8(printable ? byte : next_unprintable++);
  }
  return chars;
}

// "type" of a normalizer / pre-tokenizer / post-processor, for checks and messages.
std::string component_type(const json& component) {
  if (component.is_null()) return "null";
  return component.is_object() ? component.value("type", "(no type)") : component.dump();
}

uint64_t pair_key(TokenId left, TokenId right) {
  return (static_cast<uint64_t>(left) << 32) | static_cast<uint64_t>(right);
}

struct Pcre2CodeFree {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct Pcre2MatchDataFree {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

std::string pcre2_message(int error_code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(error_code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

struct Pcre2MatchContextFree {
  void operator()(pcre2_match_context* context) const { pcre2_match_context_free(context); }
};

// The work one regex search may do, in PCRE2 match steps: the regexes tokenizer.json files ship need
// about one step per byte of a whitespace run (Qwen2's \s*[\r\n]+ scans the run and gives it back)
// and a few dozen otherwise, so 10,000 + 4 per byte left to search refuses only a backtracking regex
// (one took 43 s on 2.5 KB under PCRE2's default limit of 10^7 steps per search).
constexpr uint32_t kMatchStepsBase = 10'000;
constexpr uint32_t kMatchStepsPerByte = 4;

// A pre-tokenizer split with Hugging Face's "Isolated" behaviour.
class IsolatingSplit {
 public:
  IsolatingSplit(const std::string& pattern, bool literal, const std::string& path) : pattern_(pattern), path_(path) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &error_code,
                              &error_offset, nullptr));
    if (!code_) {
      fail("{}: cannot compile pre-tokenizer regex {:?} at offset {}: {}", path, pattern, error_offset,
           pcre2_message(error_code));
    }
  }

  // Appends each match and each non-empty stretch of text between matches, in order.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const {
    std::unique_ptr<pcre2_match_data, Pcre2MatchDataFree> match(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    std::unique_ptr<pcre2_match_context, Pcre2MatchContextFree> limits(pcre2_match_context_create(nullptr));
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    uint32_t options = 0;  // the first call checks that the text is UTF-8; later calls need not
    size_t offset = 0;
    size_t unmatched_start = 0;
    while (offset < text.size()) {
      const size_t steps = kMatchStepsBase + kMatchStepsPerByte * static_cast<uint64_t>(text.size() - offset);
      pcre2_set_match_limit(limits.get(), static_cast<uint32_t>(std::min<size_t>(steps, UINT32_MAX)));
      const int rc = pcre2_match(code_.get(), subject, text.size(), offset, options, match.get(), limits.get());
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc == PCRE2_ERROR_MATCHLIMIT) {
        fail("{}: pre-tokenizer regex {:?} needs more than {} match steps at byte {} of a {}-byte text (the bound is "
             "{} + {} per byte left; this regex backtracks far more than Hugging Face's pre-tokenizers do)",
             path_, pattern_, steps, offset, text.size(), kMatchStepsBase, kMatchStepsPerByte);
      }
      if (rc < 0) fail("{}: cannot pre-tokenize text: {}", path_, pcre2_message(rc));
      options = PCRE2_NO_UTF_CHECK;
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
      const size_t begin = ovector[0];
      const size_t end = ovector[1];
      if (begin == end) {  // empty matches make no piece (as in Hugging Face); go on after the next character
        offset = end + 1;
        while (offset < text.size() && (static_cast<uint8_t>(text[offset]) & 0xC0) == 0x80) ++offset;
        continue;
      }
      if (begin > unmatched_start) pieces.push_back(text.substr(unmatched_start, begin - unmatched_start));
      pieces.push_back(text.substr(begin, end - begin));
      unmatched_start = offset = end;
    }
    if (unmatched_start < text.size()) pieces.push_back(text.substr(unmatched_start));
  }

 private:
  std::string pattern_;
  std::string path_;
  std::unique_ptr<pcre2_code, Pcre2CodeFree> code_;
};

struct AddedToken {
  std::string content;
  TokenId id;
  bool special;
};

struct Merge {
  size_t rank;  // position in model.merges: lower merges first
  TokenId merged;
};

class HfTokenizer final : public Tokenizer {
 public:
  explicit HfTokenizer(const std::string& path) : path_(path), byte_chars_(byte_level_chars()) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot read tokenizer file {}", path);
    json root;
    try {
      root = json::parse(in);
    } catch (const json::exception& e) {  // parse_error, and out_of_range for a number too large
      fail("{}: not valid JSON: {}", path, e.what());
    }
    try {
      if (!root.is_object()) fail("{}: not a tokenizer.json (the top level is not a JSON object)", path);
      read_model(root.at("model"));
      read_normalizer(root.value("normalizer", json()));
      read_pre_tokenizer(root.value("pre_tokenizer", json()));
      read_added_tokens(root.value("added_tokens", json::array()));
      read_post_processor(root.value("post_processor", json()));
    } catch (const json::exception& e) {  // a key missing or of the wrong JSON type
      fail("{}: malformed tokenizer.json: {}", path, e.what());
    }
    build_decoded();
  }

  std::vector<TokenId> encode(std::string_view text, bool add_bos, bool add_eos) const override {
    std::vector<TokenId> ids;
    if (add_bos && bos_id_) ids.push_back(*bos_id_);
    // Added tokens written in the text are cut out first; the stretches between them are BPE-encoded.
    size_t start = 0;
    while (true) {
      const auto [position, added] = find_added_token(text, start);
      encode_ordinary(text.substr(start, position - start), ids);
      if (!added) break;
      ids.push_back(added->id);
      start = position + added->content.size();
    }
    if (add_eos && !eos_ids_.empty()) ids.push_back(eos_ids_.front());
    return ids;
  }

  std::string decode(const std::vector<TokenId>& ids) const override {
    std::string text;
    for (TokenId id : ids) {
      if (id < 0 || id >= vocab_size()) {
        fail("token id {} is outside the vocabulary of {} ({} ids)", id, path_, vocab_size());
      }
      text += decoded_[id];
    }
    return text;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(decoded_.size()); }
  std::optional<TokenId> bos_id() const override { return bos_id_; }
  std::vector<TokenId> eos_ids() const override { return eos_ids_; }

 private:
  TokenId checked_id(const json& id_json, const std::string& token) const {
    const auto value = json_int64(id_json);
    if (!value) fail("{}: token {:?} has id {}, not an integer", path_, token, id_json.dump());
    const int64_t id = *value;
    if (id < 0 || id > kMaxTokenId) fail("{}: token {:?} has id {}, outside 0..{}", path_, token, id, kMaxTokenId);
    return id;
  }

  void read_model(const json& model) {
    const std::string type = component_type(model);
    if (type != "BPE") {
      fail("{}: unsupported tokenizer model type {:?} (only byte-level BPE is implemented)", path_, type);
    }
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (model.contains(affix) && !model[affix].is_null() && !model[affix].get<std::string>().empty()) {
        fail("{}: unsupported BPE option model.{} (byte-level BPE does not use it)", path_, affix);
      }
    }
    for (const auto& [token, id] : model.at("vocab").items()) vocab_.emplace(token, checked_id(id, token));
    byte_ids_.fill(-1);
    for (size_t byte = 0; byte < 256; ++byte) {
      if (auto found = vocab_.find(byte_chars_[byte]); found != vocab_.end()) byte_ids_[byte] = found->second;
    }
    ignore_merges_ = model.value("ignore_merges", false);

    const json& merges = model.at("merges");
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const json& merge = merges[rank];
      std::string left, right;
      if (merge.is_string()) {  // "left right"
        const auto& line = merge.get_ref<const std::string&>();
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          fail("{}: merge {} {:?} is not two tokens separated by one space", path_, rank, line);
        }
        left = line.substr(0, space);
        right = line.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2) {  // ["left", "right"]
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        fail("{}: merge {} is neither \"left right\" nor [left, right]: {}", path_, rank, merge.dump());
      }
      const auto left_id = vocab_.find(left), right_id = vocab_.find(right), merged_id = vocab_.find(left + right);
      if (left_id == vocab_.end() || right_id == vocab_.end() || merged_id == vocab_.end()) {
        fail("{}: merge {} ({:?} + {:?}) uses a token missing from model.vocab", path_, rank, left, right);
      }
      // Of duplicated merges the first, lowest rank counts.
      merges_.emplace(pair_key(left_id->second, right_id->second), Merge{rank, merged_id->second});
    }
  }

  // NFC is accepted and applied as the identity: text already in NFC, which includes all ASCII text
  // and nearly all stored text (it is written precomposed), is unchanged by it. Text holding
  // decomposed sequences such as "e" + U+0301 would tokenize differently from Hugging Face; real
  // composition needs the Unicode tables of a library such as ICU, which kvdrift does not link.
  void read_normalizer(const json& normalizer) {
    const std::string type = component_type(normalizer);
    if (type != "null" && type != "NFC") fail("{}: unsupported normalizer {:?} (supported: none, NFC)", path_, type);
  }

  void read_pre_tokenizer(const json& pre_tokenizer) {
    std::vector<json> stages = {pre_tokenizer};
    if (component_type(pre_tokenizer) == "Sequence") {
      stages = pre_tokenizer.at("pretokenizers").get<std::vector<json>>();
    }
    for (size_t i = 0; i < stages.size(); ++i) {
      const json& stage = stages[i];
      const std::string type = component_type(stage);
      const bool last = i + 1 == stages.size();
      if (type == "Split" && !last) {
        const std::string behavior = stage.at("behavior").get<std::string>();
        if (behavior != "Isolated" || stage.value("invert", false)) {
          fail("{}: unsupported Split pre-tokenizer (behavior {:?}, invert {}); only Isolated, not inverted", path_,
               behavior, stage.value("invert", false));
        }
        const json& pattern = stage.at("pattern");
        const bool literal = pattern.contains("String");
        splits_.emplace_back(pattern.at(literal ? "String" : "Regex").get<std::string>(), literal, path_);
      } else if (type == "ByteLevel" && last) {
        // Hugging Face's default for add_prefix_space is true.
        if (stage.value("add_prefix_space", true)) {
          fail("{}: unsupported ByteLevel pre-tokenizer option add_prefix_space=true", path_);
        }
        if (stage.value("use_regex", true)) splits_.emplace_back(kGpt2Pattern, false, path_);
      } else {
        fail("{}: unsupported pre_tokenizer {:?} (supported: ByteLevel, Sequence[Split..., ByteLevel])", path_, type);
      }
    }
  }

  // lstrip/rstrip/single_word options of added tokens are not implemented: content matches as is.
  // Hugging Face tokenizers gives an added token whose id another added token has a new id of its own,
  // so a text holding it tokenizes differently there: such a file is refused.
  void read_added_tokens(const json& tokens) {
    std::unordered_map<TokenId, std::string> content_of_id;
    for (const json& token : tokens) {
      auto content = token.at("content").get<std::string>();
      if (content.empty()) fail("{}: added token {} has empty content", path_, token.at("id").dump());
      const TokenId id = checked_id(token.at("id"), content);
      const auto [first, inserted] = content_of_id.emplace(id, content);
      if (!inserted)
        fail("{}: added tokens {:?} and {:?} both have id {} (Hugging Face tokenizers would give the second another "
             "id); give each added token its own id",
             path_, first->second, content, id);
      added_tokens_.push_back({std::move(content), id, token.value("special", false)});
    }
    // Longest first, so that at one position the longest added token wins (as in Hugging Face).
    std::stable_sort(added_tokens_.begin(), added_tokens_.end(),
                     [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
    for (const auto& token : added_tokens_) {
      added_first_bytes_[static_cast<uint8_t>(token.content.front())] = true;
      if (token.special && std::find(kEosContents.begin(), kEosContents.end(), token.content) != kEosContents.end()) {
        eos_ids_.push_back(token.id);
      }
    }
    // Lowest id first, which puts the base model's end-of-text before the chat end-of-turn.
    std::sort(eos_ids_.begin(), eos_ids_.end());
  }

  // BOS is the special token that TemplateProcessing's "single" template starts with, if any (Llama-3:
  // <|begin_of_text|>; GPT-2 and Qwen2 have no template and no BOS).
  void read_post_processor(const json& post_processor) {
    std::vector<json> processors = {post_processor};
    if (component_type(post_processor) == "Sequence") {
      processors = post_processor.at("processors").get<std::vector<json>>();
    }
    for (const json& processor : processors) {
      if (component_type(processor) != "TemplateProcessing") continue;
      const json& single = processor.at("single");
      if (single.empty() || !single[0].contains("SpecialToken")) continue;
      const auto bos = single[0]["SpecialToken"].at("id").get<std::string>();
      bos_id_ = token_id(bos);
      if (!bos_id_) {
        fail("{}: the post_processor's BOS token {:?} is neither an added token nor in model.vocab", path_, bos);
      }
    }
  }

  std::optional<TokenId> token_id(const std::string& content) const {
    for (const auto& token : added_tokens_) {
      if (token.content == content) return token.id;
    }
    if (auto found = vocab_.find(content); found != vocab_.end()) return found->second;
    return std::nullopt;
  }

  // What each id decodes to. Vocabulary tokens map back through the byte-level table; a token with
  // a character outside it stands for its own UTF-8 bytes (Hugging Face's ByteLevel decoder does the
  // same). Added tokens decode to their content, except BOS and EOS, which decode to nothing, as do
  // ids that no token has.
  void build_decoded() {
    std::unordered_map<std::string, char> char_bytes;
    for (size_t byte = 0; byte < 256; ++byte) char_bytes.emplace(byte_chars_[byte], static_cast<char>(byte));
    TokenId max_id = -1;
    for (const auto& [token, id] : vocab_) max_id = std::max(max_id, id);
    for (const auto& token : added_tokens_) max_id = std::max(max_id, token.id);
    decoded_.assign(max_id + 1, std::string());
    for (const auto& [token, id] : vocab_) {
      std::string bytes;
      for (size_t i = 0; i < token.size();) {
        const size_t char_length = static_cast<uint8_t>(token[i]) < 0x80 ? 1 : 2;  // byte-level chars are < U+0800
        auto found = char_bytes.find(token.substr(i, char_length));
        if (found == char_bytes.end()) {
          bytes = token;
          break;
        }
        bytes += found->second;
        i += char_length;
      }
      decoded_[id] = std::move(bytes);
    }
    for (const auto& token : added_tokens_) decoded_[token.id] = token.content;
    if (bos_id_) decoded_[*bos_id_].clear();
    for (TokenId id : eos_ids_) decoded_[id].clear();
  }

  // The leftmost added token in text[from..], the longest one at that position; {text.size(),
  // nullptr} if there is none.
  std::pair<size_t, const AddedToken*> find_added_token(std::string_view text, size_t from) const {
    for (size_t position = from; position < text.size(); ++position) {
      if (!added_first_bytes_[static_cast<uint8_t>(text[position])]) continue;
      for (const auto& token : added_tokens_) {
        if (text.compare(position, token.content.size(), token.content) == 0) return {position, &token};
      }
    }
    return {text.size(), nullptr};
  }

  // Text without added tokens: pre-tokenize (each split stage cuts the pieces of the one before),
  // then BPE each piece.
  void encode_ordinary(std::string_view text, std::vector<TokenId>& ids) const {
    std::vector<std::string_view> pieces = {text};
    for (const auto& split : splits_) {
      std::vector<std::string_view> finer;
      for (auto piece : pieces) split.split(piece, finer);
      pieces = std::move(finer);
    }
    for (auto piece : pieces) encode_piece(piece, ids);
  }

  void encode_piece(std::string_view piece, std::vector<TokenId>& ids) const {
    if (piece.empty()) return;
    if (ignore_merges_) {  // Llama-3: a pre-token that is one vocabulary token is used as is
      std::string mapped;
      for (char byte : piece) mapped += byte_chars_[static_cast<uint8_t>(byte)];
      if (auto found = vocab_.find(mapped); found != vocab_.end()) {
        ids.push_back(found->second);
        return;
      }
    }
    std::vector<TokenId> symbols;
    for (char byte : piece) {
      const TokenId id = byte_ids_[static_cast<uint8_t>(byte)];
      if (id < 0) {
        fail("{}: cannot encode byte 0x{:02X}: its byte-level token {:?} is not in model.vocab", path_,
             static_cast<uint8_t>(byte), byte_chars_[static_cast<uint8_t>(byte)]);
      }
      symbols.push_back(id);
    }
    // Merge the adjacent pair with the lowest merge rank, the leftmost on ties (Hugging Face's order).
    merge_pairs(symbols, [this](TokenId left, TokenId right) -> std::optional<PairMerge> {
      auto found = merges_.find(pair_key(left, right));
      if (found == merges_.end()) return std::nullopt;
      return PairMerge{static_cast<double>(found->second.rank), found->second.merged};
    });
    ids.insert(ids.end(), symbols.begin(), symbols.end());
  }

  std::string path_;
  std::array<std::string, 256> byte_chars_;  // byte -> its byte-level character (UTF-8)
  std::unordered_map<std::string, TokenId> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;  // pair_key(left, right) -> merge
  bool ignore_merges_ = false;
  std::vector<IsolatingSplit> splits_;         // applied in order
  std::array<TokenId, 256> byte_ids_{};        // byte -> id of its byte-level token, -1 if not in the vocabulary
  std::vector<AddedToken> added_tokens_;       // longest content first
  std::array<bool, 256> added_first_bytes_{};  // whether some added token starts with this byte
  std::optional<TokenId> bos_id_;
  std::vector<TokenId> eos_ids_;
  std::vector<std::string> decoded_;  // indexed by id
};

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& path) { return std::make_unique<HfTokenizer>(path); }

}  // namespace kvdrift
