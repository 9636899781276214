#include "io/prompts.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string_view>
#include <utility>

#include "core/error.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

constexpr std::string_view kWhitespace = " \t\r\n\f\v";

std::string_view trim(std::string_view text) {
  const size_t begin = text.find_first_not_of(kWhitespace);
  if (begin == std::string_view::npos) return {};
  return text.substr(begin, text.find_last_not_of(kWhitespace) + 1 - begin);
}

std::vector<std::string_view> split(std::string_view text, std::string_view separator) {
  std::vector<std::string_view> pieces;
  for (size_t start = 0;;) {
    const size_t end = text.find(separator, start);
    pieces.push_back(text.substr(start, end - start));
    if (end == std::string_view::npos) return pieces;
    start = end + separator.size();
  }
}

// "data/HumanEval.jsonl.gz" -> "HumanEval", "data/test.jsonl" -> "test".
std::string file_stem(const std::string& path) {
  fs::path name = fs::path(path).filename();
  if (name.extension() == ".gz") name = name.stem();
  return name.stem().string();
}

// zlib's gzread passes files that are not gzip through unchanged, so one reader serves .txt,
// .jsonl and .jsonl.gz alike.
std::string read_possibly_gzipped(const std::string& path) {
  std::error_code ignored;
  const fs::file_status status = fs::status(path, ignored);
  if (!fs::exists(status)) fail("prompt file not found: {}", path);
  if (!fs::is_regular_file(status)) {
    const fs::file_type type = status.type();
    const char* kind = type == fs::file_type::directory   ? "a folder"
                       : type == fs::file_type::character ? "a character device"
                       : type == fs::file_type::block     ? "a block device"
                       : type == fs::file_type::fifo      ? "a FIFO"
                       : type == fs::file_type::socket    ? "a socket"
                                                          : "not a regular file";
    fail("prompt file {} is {}, not a file kvdrift can read to its end; name a regular file", path, kind);
  }
  std::unique_ptr<gzFile_s, decltype(&gzclose)> file(gzopen(path.c_str(), "rb"), &gzclose);
  if (!file) fail("cannot open prompt file {}", path);
  std::string contents;
  std::array<char, 1 << 16> buffer;
  for (;;) {
    const int count = gzread(file.get(), buffer.data(), static_cast<unsigned>(buffer.size()));
    if (count > 0) {
      contents.append(buffer.data(), count);
      continue;
    }
    // gzread ends a truncated gzip stream like a complete one; only gzerror (Z_BUF_ERROR) tells.
    int code = Z_OK;
    const char* message = gzerror(file.get(), &code);
    if (code == Z_OK) return contents;
    fail("cannot read prompt file {}: {}", path, code == Z_BUF_ERROR ? "gzip data ends early" : message);
  }
}

// One top-level field of a JSONL record. Strings and numbers have a text (a number spelled as in
// the file); anything else can only be named in an error.
struct JsonField {
  std::string text;
  const char* non_text_type = nullptr;  // "an array", "null", ... when neither string nor number
};

struct JsonlRecord {
  std::string where;  // "path:line", for messages
  std::map<std::string, JsonField> fields;

  // The text of field `name`; fails when it is missing or neither a string nor a number.
  const std::string& text(const std::string& name) const {
    const auto found = fields.find(name);
    if (found == fields.end()) fail("{}: record has no field '{}'", where, name);
    if (found->second.non_text_type) {
      fail("{}: field '{}' is {}, not a string or number", where, name, found->second.non_text_type);
    }
    return found->second.text;
  }
};

// Collects the top-level fields of one JSON object. A SAX parser rather than a json value because
// only SAX sees a float's original spelling ("1.50" stays "1.50", not "1.5").
class TopLevelFields final : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit TopLevelFields(std::map<std::string, JsonField>& fields) : fields_(fields) {}

  bool is_object() const { return is_object_; }
  const std::string& error() const { return error_; }

  bool null() override { return value({"", "null"}); }
  bool boolean(bool) override { return value({"", "a boolean"}); }
  bool number_integer(number_integer_t number) override { return value({std::to_string(number)}); }
  bool number_unsigned(number_unsigned_t number) override { return value({std::to_string(number)}); }
  bool number_float(number_float_t, const string_t& spelling) override { return value({spelling}); }
  bool string(string_t& text) override { return value({std::move(text)}); }
  bool binary(binary_t&) override { return value({"", "binary data"}); }
  bool start_object(std::size_t) override {
    if (depth_ == 0) {
      is_object_ = true;
    } else {
      value({"", "an object"});
    }
    ++depth_;
    return true;
  }
  bool key(string_t& name) override {
    if (depth_ == 1) key_ = std::move(name);
    return true;
  }
  bool end_object() override {
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    value({"", "an array"});
    ++depth_;
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& error) override {
    error_ = error.what();
    return false;
  }

 private:
  bool value(JsonField field) {
    if (depth_ == 1) fields_.insert_or_assign(key_, std::move(field));
    return true;
  }

  std::map<std::string, JsonField>& fields_;
  int depth_ = 0;  // 1 inside the top-level object
  std::string key_;
  bool is_object_ = false;
  std::string error_;
};

JsonlRecord parse_record(std::string_view line, std::string where) {
  JsonlRecord record{std::move(where), {}};
  TopLevelFields sax(record.fields);
  if (!nlohmann::json::sax_parse(line, &sax)) fail("{}: not JSON: {}", record.where, sax.error());
  if (!sax.is_object()) fail("{}: not a JSON object", record.where);
  return record;
}

// A prompt template split once into literal text and field names.
struct TemplatePart {
  bool is_field;
  std::string text;  // the literal, or the field's name
};

std::vector<TemplatePart> parse_template(const std::string& template_text) {
  std::vector<TemplatePart> parts;
  std::string literal;
  for (size_t i = 0; i < template_text.size(); ++i) {
    const char c = template_text[i];
    const bool doubled = i + 1 < template_text.size() && template_text[i + 1] == c;
    if ((c == '{' || c == '}') && doubled) {
      literal += c;
      ++i;
    } else if (c == '{') {
      const size_t close = template_text.find_first_of("{}", i + 1);
      if (close == std::string::npos || template_text[close] == '{' || close == i + 1) {
        fail("template \"{}\": '{{' at offset {} opens no {{name}}", template_text, i);
      }
      if (!literal.empty()) parts.push_back({false, std::move(literal)});
      literal.clear();
      parts.push_back({true, template_text.substr(i + 1, close - i - 1)});
      i = close;
    } else if (c == '}') {
      fail("template \"{}\": '}}' at offset {} closes no {{name}} (write }}}} for a literal brace)", template_text, i);
    } else {
      literal += c;
    }
  }
  if (!literal.empty()) parts.push_back({false, std::move(literal)});
  return parts;
}

std::string render(const std::vector<TemplatePart>& parts, const JsonlRecord& record) {
  std::string text;
  for (const auto& part : parts) text += part.is_field ? record.text(part.text) : part.text;
  return text;
}

std::vector<Prompt> inline_prompts(const std::vector<std::string>& texts) {
  std::vector<Prompt> prompts;
  for (size_t i = 0; i < texts.size(); ++i) prompts.push_back({fmt::format("inline:{}", i), texts[i], {}, {}});
  return prompts;
}

std::vector<Prompt> text_file_prompts(const PromptSource& source) {
  if (source.separator && source.separator->empty()) fail("text_file {}: separator must not be empty", source.path);
  const std::string contents = read_possibly_gzipped(source.path);
  const std::string stem = file_stem(source.path);
  std::vector<Prompt> prompts;
  for (std::string_view piece : split(contents, source.separator.value_or("\n"))) {
    piece = trim(piece);
    if (!piece.empty()) prompts.push_back({fmt::format("{}:{}", stem, prompts.size()), std::string(piece), {}, {}});
  }
  return prompts;
}

std::vector<Prompt> jsonl_prompts(const PromptSource& source) {
  if (source.template_text.empty() && source.field.empty()) {
    fail("jsonl {}: needs a field or a template for the prompt text", source.path);
  }
  // A bare field is the one-placeholder template, so both report a missing field the same way.
  const std::vector<TemplatePart> parts =
      source.template_text.empty() ? std::vector<TemplatePart>{{true, source.field}} : parse_template(source.template_text);
  const std::string contents = read_possibly_gzipped(source.path);
  const std::string stem = file_stem(source.path);
  const std::vector<std::string_view> lines = split(contents, "\n");
  std::vector<Prompt> prompts;
  for (size_t line = 0; line < lines.size(); ++line) {
    if (trim(lines[line]).empty()) continue;
    const JsonlRecord record = parse_record(lines[line], fmt::format("{}:{}", source.path, line + 1));
    Prompt prompt{fmt::format("{}:{}", stem, prompts.size()), render(parts, record), {}, {}};
    for (const char* id_field : {"task_id", "unique_id", "id"}) {
      const auto found = record.fields.find(id_field);
      if (found != record.fields.end() && !found->second.non_text_type) {
        prompt.id = found->second.text;
        break;
      }
    }
    if (!source.answer_field.empty()) prompt.answer = record.text(source.answer_field);
    prompts.push_back(std::move(prompt));
  }
  return prompts;
}

std::vector<Prompt> token_id_prompts(const std::vector<std::vector<TokenId>>& ids, const Tokenizer* tokenizer) {
  std::vector<Prompt> prompts;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string id = fmt::format("ids:{}", i);
    if (ids[i].empty()) fail("prompt {} has no tokens", id);
    for (size_t position = 0; position < ids[i].size(); ++position) {
      const TokenId token = ids[i][position];
      if (token < 0) fail("prompt {}: token {} at position {} is negative", id, token, position);
      if (tokenizer && token >= tokenizer->vocab_size()) {
        fail("prompt {}: token {} at position {} is outside the tokenizer's vocabulary of {} tokens", id, token,
             position, tokenizer->vocab_size());
      }
    }
    prompts.push_back({id, "", ids[i], {}});
  }
  return prompts;
}

}  // namespace

std::vector<Prompt> load_prompts(const PromptSource& source, const Tokenizer* tokenizer, const ChatTemplate* chat) {
  const PromptKind kind = source.kind;
  const bool has_texts = kind != PromptKind::TokenIds;
  if (has_texts && !tokenizer)
    fail("prompt source '{}' needs a tokenizer to encode its texts", prompt_kind_name(kind));
  if (source.chat_template && !has_texts)
    fail("prompt source '{}' has no texts to wrap in a chat template", prompt_kind_name(kind));
  if (source.chat_template && !chat) fail("chat_template is set but the model has no chat template");
  if (source.offset < 0 || source.limit < 0) {
    fail("prompt offset and limit must be >= 0, got offset {} and limit {}", source.offset, source.limit);
  }

  std::vector<Prompt> prompts = kind == PromptKind::Inline     ? inline_prompts(source.texts)
                                : kind == PromptKind::TextFile ? text_file_prompts(source)
                                : kind == PromptKind::Jsonl    ? jsonl_prompts(source)
                                                               : token_id_prompts(source.ids, tokenizer);

  const auto total = static_cast<int64_t>(prompts.size());
  if (source.offset >= total) {
    const std::string what = kind == PromptKind::Inline     ? "inline texts"
                             : kind == PromptKind::TokenIds ? "token_ids"
                                                            : source.path;
    fail("no prompts: {} after offset {} of {}", what, source.offset, total);
  }
  const int64_t available = total - source.offset;
  const int64_t kept = source.limit == 0 ? available : std::min(available, source.limit);
  prompts.erase(prompts.begin() + source.offset + kept, prompts.end());
  prompts.erase(prompts.begin(), prompts.begin() + source.offset);

  if (has_texts) {
    const bool add_bos = source.add_bos && !source.chat_template;  // a template writes its own specials
    for (auto& prompt : prompts) {
      if (source.chat_template) prompt.text = chat->render(prompt.text, source.system_prompt);
      try {
        prompt.tokens = tokenizer->encode(prompt.text, add_bos);
      } catch (const Error& error) {
        fail("prompt {}: {}", prompt.id, error.what());
      }
      if (prompt.tokens.empty()) {
        fail("prompt {} encodes to no tokens (text \"{}\", add_bos {})", prompt.id, prompt.text, add_bos);
      }
    }
  }
  return prompts;
}

int64_t longest_prompt_tokens(const std::vector<Prompt>& prompts) {
  size_t longest = 0;
  for (const Prompt& prompt : prompts) longest = std::max(longest, prompt.tokens.size());
  return static_cast<int64_t>(longest);
}

}  // namespace kvdrift
