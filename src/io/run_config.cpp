#include "io/run_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "core/error.h"
#include "io/yaml_size.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kSections = {"model", "prompts", "decoding", "quantizers", "lanes", "metrics", "analysis", "output"};
const std::string kSyntheticPrefix = "synthetic:";

bool is_synthetic(const std::string& model_path) { return model_path.rfind(kSyntheticPrefix, 0) == 0; }

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

// "a", "a or b", "a, b or c".
std::string or_list(const std::vector<std::string>& items) {
  std::string text = items.front();
  for (size_t i = 1; i < items.size(); ++i) text += (i + 1 == items.size() ? " or " : ", ") + items[i];
  return text;
}

// Where each value of the config came from, for error messages: a line of the file, or the --set
// argument that wrote it or a mapping or list around it.
class Provenance {
 public:
  explicit Provenance(std::string file) : file_(std::move(file)) {}

  // `key_path` and everything under it now come from `argument`.
  void record_override(const std::string& key_path, const std::string& argument) {
    for (auto it = overrides_.begin(); it != overrides_.end();)
      it = holds(key_path, it->first) ? overrides_.erase(it) : std::next(it);
    overrides_[key_path] = argument;
  }

  // The --set argument behind `key_path` (the innermost override holding it), or null when it comes
  // from the file.
  const std::string* override_of(const std::string& key_path) const {
    const std::string* found = nullptr;
    size_t found_length = 0;
    for (const auto& [path, argument] : overrides_) {
      if (holds(path, key_path) && (!found || path.size() > found_length)) {
        found = &argument;
        found_length = path.size();
      }
    }
    return found;
  }

  // "--set ARG", "FILE:LINE", or "FILE" where there is no line (a key that is missing).
  std::string where(const std::string& key_path, const YAML::Mark& mark) const {
    if (const std::string* argument = override_of(key_path)) return "--set " + *argument;
    return mark.is_null() ? file_ : fmt::format("{}:{}", file_, mark.line + 1);
  }

 private:
  // Whether `inner` is `outer` or lies under it, as "quantizers[0].params" lies under "quantizers".
  static bool holds(const std::string& outer, const std::string& inner) {
    if (inner.compare(0, outer.size(), outer) != 0) return false;
    return inner.size() == outer.size() || inner[outer.size()] == '.' || inner[outer.size()] == '[';
  }

  std::string file_;
  std::map<std::string, std::string> overrides_;  // key path -> --set argument
};

// The allowed values of a number, worded as error messages state them.
struct Range {
  double low = -std::numeric_limits<double>::infinity();
  bool low_open = false;
  double high = std::numeric_limits<double>::infinity();

  bool contains(double value) const { return (low_open ? value > low : value >= low) && value <= high; }
  std::string describe() const {
    if (std::isinf(high)) return fmt::format("{} {}", low_open ? ">" : ">=", low);
    return fmt::format("in {}{}, {}]", low_open ? "(" : "[", low, high);
  }
};
const Range kAnyNumber;
const Range kNonNegative{0.0};
const Range kPositive{0.0, true};
const Range kAtLeastOne{1.0};
const Range kAtLeastTwo{2.0};  // a slope needs two points
const Range kUnitInterval{0.0, true, 1.0};

class Mapping;

// One node of the config with its key path ("quantizers[1].name"). Typed reads fail with that path
// and where the value came from. A key that is absent reads as a null Value.
class Value {
 public:
  Value(const Provenance& provenance, YAML::Node node, std::string path, YAML::Mark mark)
      : provenance_(&provenance), node_(std::move(node)), path_(std::move(path)), mark_(mark) {}

  const std::string& path() const { return path_; }
  bool is_null() const { return node_.IsNull(); }
  bool from_override() const { return provenance_->override_of(path_) != nullptr; }
  // The 1-based line in the config file; 0 when the value comes from --set.
  int line() const { return from_override() || mark_.is_null() ? 0 : mark_.line + 1; }
  [[noreturn]] void reject(const std::string& message) const {
    fail("{}: {}", provenance_->where(path_, mark_), message);
  }

  // T: std::string (any scalar, as written), bool, int64_t or double (plain scalars: a quoted "12"
  // is text, not a number). Numbers must lie in `range`.
  template <typename T>
  T as(const Range& range = kAnyNumber) const {
    const bool plain = node_.IsScalar() && node_.Tag() != "!";  // YAML tags quoted scalars "!"
    if constexpr (std::is_same_v<T, std::string>) {
      if (!node_.IsScalar()) expected("a string");
      return node_.Scalar();
    } else if constexpr (std::is_same_v<T, bool>) {
      // YAML 1.2 core schema booleans; yes/no/on/off are text there, so they are errors here.
      static const std::set<std::string> kTrue = {"true", "True", "TRUE"}, kFalse = {"false", "False", "FALSE"};
      if (plain && kTrue.count(node_.Scalar())) return true;
      if (plain && kFalse.count(node_.Scalar())) return false;
      expected("true or false");
    } else {
      static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, uint64_t> || std::is_same_v<T, double>);
      T number{};
      const std::string text = plain ? node_.Scalar() : "";
      const bool plus_sign = text.size() > 1 && text[0] == '+' && text[1] != '-';  // YAML allows "+1"; from_chars not
      const auto [end, error] = std::from_chars(text.data() + plus_sign, text.data() + text.size(), number);
      const bool whole_text = end == text.data() + text.size();
      if constexpr (std::is_integral_v<T>) {
        if (plain && whole_text && error == std::errc::result_out_of_range)
          reject(fmt::format("{} must be an integer from {} to {}, got {}", path_, std::numeric_limits<T>::min(),
                             std::numeric_limits<T>::max(), text));
      }
      if (!plain || !whole_text || error != std::errc() || !std::isfinite(static_cast<double>(number)))
        expected(std::is_same_v<T, double> ? "a number" : std::is_signed_v<T> ? "an integer" : "a non-negative integer");
      if (!range.contains(static_cast<double>(number))) reject(fmt::format("{} must be {}", path_, range.describe()));
      return number;
    }
  }

  template <typename T>
  T as_or(const T& fallback, const Range& range = kAnyNumber) const {
    return is_null() ? fallback : as<T>(range);
  }

  // A string from `allowed`; `fallback` (if given) when null.
  std::string one_of(const std::vector<std::string>& allowed, const std::string& noun,
                     const std::optional<std::string>& fallback = std::nullopt) const {
    if (fallback && is_null()) return *fallback;
    const std::string text = as<std::string>();
    if (!contains(allowed, text))
      reject(fmt::format("{}: unknown {} '{}' (known: {})", path_, noun, text, fmt::join(allowed, ", ")));
    return text;
  }

  // The enum value named by a string of `table`, with `fallback` (second form) when null.
  template <typename Enum, size_t N>
  Enum choice(const EnumName<Enum> (&table)[N], const std::string& noun) const {
    return *parse_enum(table, one_of(enum_names(table), noun));
  }
  template <typename Enum, size_t N>
  Enum choice(const EnumName<Enum> (&table)[N], const std::string& noun, Enum fallback) const {
    return is_null() ? fallback : choice(table, noun);
  }

  // The entries of a non-empty list.
  std::vector<Value> elements(const std::string& noun) const {
    if (!node_.IsSequence()) expected("a list");
    if (node_.size() == 0) reject(fmt::format("{}: empty list names no {}", path_, noun));
    std::vector<Value> entries;
    for (const YAML::Node& entry : node_)
      entries.emplace_back(*provenance_, entry, fmt::format("{}[{}]", path_, entries.size()), entry.Mark());
    return entries;
  }

  // A mapping (null reads as empty) whose keys must be among `known_keys`.
  Mapping mapping(const std::vector<std::string>& known_keys) const;
  // A mapping with keys of any name (a quantizer's params, which its own parser checks).
  Mapping open_mapping() const;

 private:
  [[noreturn]] void expected(const std::string& what) const {
    std::string got = node_.IsNull() ? "nothing" : node_.IsSequence() ? "a list" : node_.IsMap() ? "a mapping" : "";
    if (node_.IsScalar()) got = fmt::format("{}'{}'", node_.Tag() == "!" ? "the quoted string " : "", node_.Scalar());
    reject(fmt::format("{}: expected {}, got {}", path_, what, got));
  }

  const Provenance* provenance_;
  YAML::Node node_;
  std::string path_;
  YAML::Mark mark_;  // the value's own position, or its key's when the value is null
};

// A mapping of the config. Construction checks its keys: each given once and, unless the mapping
// is open, each one of the known keys.
class Mapping {
 public:
  struct Entry {
    std::string key;
    YAML::Mark key_mark;
    Value value;
  };

  Mapping(const Provenance& provenance, const YAML::Node& node, std::string path,
          const std::vector<std::string>* known_keys)
      : provenance_(&provenance), path_(std::move(path)) {
    for (const auto& pair : node) {
      const YAML::Node& key_node = pair.first;
      if (!key_node.IsScalar())
        fail("{}: {}: a key must be a name", provenance.where(path_, key_node.Mark()),
             path_.empty() ? "the config" : path_);
      const std::string& key = key_node.Scalar();
      const std::string key_path = child_path(key);
      const std::string where = provenance.where(key_path, key_node.Mark());
      if (known_keys && !contains(*known_keys, key))
        fail("{}: unknown key '{}' (known: {})", where, key_path, fmt::join(*known_keys, ", "));
      if (const Entry* first = find(key))
        fail("{}: key '{}' is given twice (first on line {})", where, key_path, first->key_mark.line + 1);
      const YAML::Node& value = pair.second;
      const YAML::Mark value_mark = value.IsNull() ? key_node.Mark() : value.Mark();
      entries_.push_back({key, key_node.Mark(), Value(provenance, value, key_path, value_mark)});
    }
  }

  // The value at `key`; a null Value when the key is absent.
  Value at(const std::string& key) const {
    if (const Entry* entry = find(key)) return entry->value;
    return Value(*provenance_, YAML::Node(), child_path(key), YAML::Mark::null_mark());
  }

  Value required(const std::string& key) const {
    Value value = at(key);
    if (value.is_null())
      fail("{}: missing required key '{}'", provenance_->where(value.path(), YAML::Mark::null_mark()), value.path());
    return value;
  }

  std::string required_text(const std::string& key) const {
    const Value value = required(key);
    std::string text = value.as<std::string>();
    if (text.empty()) value.reject(fmt::format("{} must not be empty", value.path()));
    return text;
  }

  bool has(const std::string& key) const { return !at(key).is_null(); }

  // An error located at the key itself, for settings that are wrong in combination with others.
  [[noreturn]] void reject_key(const std::string& key, const std::string& message) const {
    const Entry* entry = find(key);
    const std::string key_path = child_path(key);
    fail("{}: {}", provenance_->where(key_path, entry ? entry->key_mark : YAML::Mark::null_mark()), message);
  }

  const std::vector<Entry>& entries() const { return entries_; }

 private:
  std::string child_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  const Entry* find(const std::string& key) const {
    for (const Entry& entry : entries_)
      if (entry.key == key) return &entry;
    return nullptr;
  }

  const Provenance* provenance_;
  std::string path_;
  std::vector<Entry> entries_;
};

Mapping Value::mapping(const std::vector<std::string>& known_keys) const {
  if (!is_null() && !node_.IsMap()) expected("a mapping");
  return Mapping(*provenance_, node_, path_, &known_keys);
}

Mapping Value::open_mapping() const {
  if (!is_null() && !node_.IsMap()) expected("a mapping");
  return Mapping(*provenance_, node_, path_, nullptr);
}

// A path value written in the config file is relative to the file's directory; one given with --set
// is relative to the working directory, as the shell user typed it. "" when not given.
std::string resolve_path(const Value& value, const fs::path& config_dir) {
  const std::string text = value.as_or<std::string>("");
  if (text.empty()) return text;
  const fs::path base = value.from_override() ? fs::current_path() : config_dir;
  return (base / text).lexically_normal().string();
}

// --- The field tables ---
//
// Every setting once: its YAML key, the member it fills, and how it is read. Reading (the keys a
// section accepts, and the plain fields), the resolved YAML and the comparison of two configs all walk
// these tables, so a new setting is one line here (plus its checks, if it has any).

template <typename S>
using Member = std::variant<bool S::*, int64_t S::*, uint64_t S::*, double S::*, std::string S::*, PrefillMode S::*,
                            PromptKind S::*, std::optional<std::string> S::*, std::vector<std::string> S::*,
                            std::vector<std::vector<TokenId>> S::*, std::map<std::string, std::string> S::*>;

template <typename S>
struct Field {
  const char* key;
  Member<S> member;
  Range range = kAnyNumber;  // numbers
  const char* noun = "";     // an enum's name in "unknown <noun> 'x'"
  // Read by the section's own code (paths, values checked against other settings), not generically.
  bool by_hand = false;
  bool (*written)(const S&) = nullptr;  // the resolved YAML holds it only when this is true (null: always)
  bool flow = false;                    // written in YAML flow style ([a, b], {k: v})

  Field when(bool (*condition)(const S&)) const {
    Field copy = *this;
    copy.written = condition;
    return copy;
  }
  Field in_flow() const {
    Field copy = *this;
    copy.flow = true;
    return copy;
  }
};

// A field read generically: a bool, a number within `range`, or an enum named in its table.
template <typename S, typename T>
Field<S> plain(const char* key, T S::*member, Range range = kAnyNumber, const char* noun = "") {
  return {key, member, range, noun};
}
template <typename S, typename T>
Field<S> by_hand(const char* key, T S::*member) {
  Field<S> field{key, member};
  field.by_hand = true;
  return field;
}

template <typename S>
std::vector<std::string> keys_of(const std::vector<Field<S>>& fields) {
  std::vector<std::string> keys;
  for (const Field<S>& field : fields) keys.emplace_back(field.key);
  return keys;
}

// Reads the fields not read by hand, each keeping its default when absent.
template <typename S>
void read_plain_fields(const Mapping& section, const std::vector<Field<S>>& fields, S& settings) {
  for (const Field<S>& field : fields) {
    if (field.by_hand) continue;
    const Value value = section.at(field.key);
    std::visit(
        [&](auto S::*member) {
          using T = std::decay_t<decltype(settings.*member)>;
          T& target = settings.*member;
          if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, double> || std::is_same_v<T, int64_t> ||
                        std::is_same_v<T, uint64_t>) {
            target = value.as_or<T>(target, field.range);
          } else if constexpr (std::is_same_v<T, PrefillMode>) {
            target = value.choice(kPrefillModeNames, field.noun, target);
          } else {
            internal_error("a plain field is a bool, a number or an enum", __FILE__, __LINE__);
          }
        },
        field.member);
  }
}

// The shortest text that reads back as the same double.
std::string number_text(double value) { return fmt::format("{}", value); }

template <typename S>
void write_fields(YAML::Emitter& out, const S& settings, const std::vector<Field<S>>& fields) {
  out << YAML::BeginMap;
  for (const Field<S>& field : fields) {
    if (field.written && !field.written(settings)) continue;
    out << YAML::Key << field.key << YAML::Value;
    if (field.flow) out << YAML::Flow;
    std::visit(
        [&](auto S::*member) {
          const auto& value = settings.*member;
          using T = std::decay_t<decltype(value)>;
          if constexpr (std::is_same_v<T, double>) {
            out << number_text(value);
          } else if constexpr (std::is_same_v<T, PrefillMode>) {
            out << prefill_mode_name(value);
          } else if constexpr (std::is_same_v<T, PromptKind>) {
            out << prompt_kind_name(value);
          } else if constexpr (std::is_same_v<T, std::optional<std::string>>) {
            out << value.value_or("");
          } else {
            out << value;
          }
        },
        field.member);
  }
  out << YAML::EndMap;
}

template <typename S>
bool equal_fields(const S& a, const S& b, const std::vector<Field<S>>& fields) {
  for (const Field<S>& field : fields)
    if (!std::visit([&](auto S::*member) { return a.*member == b.*member; }, field.member)) return false;
  return true;
}

const std::vector<Field<ModelSettings>>& model_fields() {
  using M = ModelSettings;
  static const std::vector<Field<M>> fields = {
      by_hand("path", &M::path),
      by_hand("tokenizer", &M::tokenizer).when([](const M& m) { return !m.tokenizer.empty(); }),
      by_hand("device", &M::device),
      by_hand("dtype", &M::dtype),
      by_hand("seed", &M::seed).when([](const M& m) { return is_synthetic(m.path); }),
  };
  return fields;
}

// `prompts.source` is the member `kind`, `prompts.template` the member `template_text`.
const std::vector<Field<PromptSettings>>& prompt_fields() {
  using P = PromptSettings;
  static const std::vector<Field<P>> fields = {
      by_hand("source", &P::kind),
      by_hand("texts", &P::texts).when([](const P& p) { return p.kind == PromptKind::Inline; }),
      by_hand("path", &P::path).when([](const P& p) { return !p.path.empty(); }),
      by_hand("separator", &P::separator).when([](const P& p) { return p.separator.has_value(); }),
      by_hand("field", &P::field).when([](const P& p) { return !p.field.empty(); }),
      by_hand("template", &P::template_text).when([](const P& p) { return !p.template_text.empty(); }),
      by_hand("answer_field", &P::answer_field).when([](const P& p) { return !p.answer_field.empty(); }),
      by_hand("ids", &P::ids).when([](const P& p) { return p.kind == PromptKind::TokenIds; }).in_flow(),
      plain("offset", &P::offset, kNonNegative),
      plain("limit", &P::limit, kNonNegative),
      plain("add_bos", &P::add_bos).when([](const P& p) { return p.kind != PromptKind::TokenIds; }),
      plain("chat_template", &P::chat_template).when([](const P& p) { return p.chat_template; }),
      by_hand("system_prompt", &P::system_prompt).when([](const P& p) { return p.system_prompt.has_value(); }),
  };
  return fields;
}

const std::vector<Field<DecodingSettings>>& decoding_fields() {
  using D = DecodingSettings;
  static const std::vector<Field<D>> fields = {
      plain("max_new_tokens", &D::max_new_tokens, kAtLeastOne),
      plain("stop_at_eos", &D::stop_at_eos),
      plain("temperature", &D::temperature, kNonNegative),
      plain("top_p", &D::top_p, kUnitInterval),
      plain("top_k", &D::top_k, kNonNegative),
      plain("seed", &D::seed, kNonNegative),
      plain("batch_prompts", &D::batch_prompts, kAtLeastOne),
      plain("prefill", &D::prefill, kAnyNumber, "prefill mode"),
      plain("prefill_chunk", &D::prefill_chunk, kAtLeastOne),
  };
  return fields;
}

const std::vector<Field<QuantizerSettings>>& quantizer_fields() {
  using Q = QuantizerSettings;
  static const std::vector<Field<Q>> fields = {
      by_hand("name", &Q::name),
      by_hand("method", &Q::method),
      by_hand("params", &Q::params).in_flow(),
  };
  return fields;
}

const std::vector<Field<MetricSettings>>& metric_fields() {
  using M = MetricSettings;
  static const std::vector<Field<M>> fields = {
      plain("layer_stride", &M::layer_stride, kAtLeastOne),
      plain("token_scale", &M::token_scale),
      plain("attention_error", &M::attention_error),
  };
  return fields;
}

const std::vector<Field<AnalysisSettings>>& analysis_fields() {
  using A = AnalysisSettings;
  static const std::vector<Field<A>> fields = {
      plain("onset_margin", &A::onset_margin, kNonNegative),
      plain("min_post_onset_steps", &A::min_post_onset_steps, kAtLeastTwo),
  };
  return fields;
}

const std::vector<Field<OutputSettings>>& output_fields() {
  using O = OutputSettings;
  static const std::vector<Field<O>> fields = {
      by_hand("path", &O::path),
      plain("flush_seconds", &O::flush_seconds, kPositive),
  };
  return fields;
}

// --- The sections: the fields read by hand, and the checks between settings ---

ModelSettings read_model(const Mapping& root, const fs::path& config_dir) {
  const Mapping model = root.at("model").mapping(keys_of(model_fields()));
  ModelSettings settings;
  settings.path = model.required_text("path");
  const Value path = model.at("path");
  if (!is_synthetic(settings.path)) {
    settings.path = resolve_path(path, config_dir);
  } else if (settings.path == kSyntheticPrefix) {
    path.reject("model.path: synthetic: needs a model name, e.g. synthetic:llama-3.2-1b");
  }
  settings.tokenizer = resolve_path(model.at("tokenizer"), config_dir);

  const Value device = model.at("device");
  settings.device = device.as_or<std::string>(settings.device);
  static const std::regex kDeviceForm("cpu|cuda(:[0-9]+)?");
  if (!std::regex_match(settings.device, kDeviceForm))
    device.reject(fmt::format("model.device: expected cpu, cuda or cuda:N, got '{}'", settings.device));
  settings.dtype = model.at("dtype").one_of({"float32", "float16", "bfloat16"}, "dtype", settings.dtype);

  if (model.has("seed") && !is_synthetic(settings.path))
    model.reject_key("seed", "model.seed is only valid with a synthetic:NAME model (it seeds random weights)");
  settings.seed = model.at("seed").as_or<uint64_t>(0, kNonNegative);
  return settings;
}

// The prompt keys that only some sources read; giving one to another source is an error.
const std::vector<PromptKind> kTextSources = {PromptKind::Inline, PromptKind::TextFile, PromptKind::Jsonl};
const std::vector<std::pair<std::string, std::vector<PromptKind>>> kSourceOnlyKeys = {
    {"texts", {PromptKind::Inline}},
    {"path", {PromptKind::TextFile, PromptKind::Jsonl}},
    {"separator", {PromptKind::TextFile}},
    {"field", {PromptKind::Jsonl}},
    {"template", {PromptKind::Jsonl}},
    {"answer_field", {PromptKind::Jsonl}},
    {"ids", {PromptKind::TokenIds}},
    {"add_bos", kTextSources},
    {"chat_template", kTextSources},
    {"system_prompt", kTextSources},
};

PromptSettings read_prompts(const Mapping& root, const fs::path& config_dir, const ModelSettings& model) {
  const Mapping prompts = root.at("prompts").mapping(keys_of(prompt_fields()));
  PromptSettings settings;
  settings.kind = prompts.required("source").choice(kPromptKindNames, "prompt source");
  for (const auto& [key, sources] : kSourceOnlyKeys) {
    if (prompts.has(key) && std::find(sources.begin(), sources.end(), settings.kind) == sources.end()) {
      std::vector<std::string> names;
      for (PromptKind source : sources) names.emplace_back(prompt_kind_name(source));
      prompts.reject_key(key, fmt::format("prompts.{} is only valid with source {}", key, or_list(names)));
    }
  }
  // Synthetic models have random weights and no vocabulary of their own to encode text with.
  if (settings.kind != PromptKind::TokenIds && is_synthetic(model.path) && model.tokenizer.empty())
    prompts.reject_key("source", fmt::format("prompts.source {} needs a tokenizer, and a synthetic model has none "
                                             "(set model.tokenizer, or use source token_ids)",
                                             prompt_kind_name(settings.kind)));
  read_plain_fields(prompts, prompt_fields(), settings);

  if (settings.kind == PromptKind::Inline) {
    for (const Value& text : prompts.required("texts").elements("prompt"))
      settings.texts.push_back(text.as<std::string>());
  }
  if (settings.kind == PromptKind::TextFile || settings.kind == PromptKind::Jsonl) {
    prompts.required_text("path");
    settings.path = resolve_path(prompts.at("path"), config_dir);
  }
  if (prompts.has("separator")) {
    const Value separator = prompts.at("separator");
    settings.separator = separator.as<std::string>();
    if (settings.separator->empty())
      separator.reject("prompts.separator must not be empty (leave it out for one prompt per non-empty line)");
  }
  settings.field = prompts.at("field").as_or<std::string>("");
  settings.template_text = prompts.at("template").as_or<std::string>("");
  settings.answer_field = prompts.at("answer_field").as_or<std::string>("");
  if (settings.kind == PromptKind::Jsonl) {
    if (!settings.field.empty() && !settings.template_text.empty())
      prompts.reject_key("template", "give prompts.field or prompts.template, not both");
    if (settings.template_text.empty()) settings.field = prompts.required_text("field");
  }
  if (settings.kind == PromptKind::TokenIds) {
    for (const Value& prompt : prompts.required("ids").elements("prompt")) {
      auto& ids = settings.ids.emplace_back();
      for (const Value& id : prompt.elements("token")) ids.push_back(id.as<int64_t>(kNonNegative));
    }
  }
  if (prompts.has("system_prompt")) {
    if (!settings.chat_template)
      prompts.reject_key("system_prompt", "prompts.system_prompt needs prompts.chat_template: true");
    settings.system_prompt = prompts.at("system_prompt").as<std::string>();
  }
  if (settings.chat_template) {
    if (prompts.has("add_bos") && settings.add_bos)
      prompts.reject_key("add_bos", "prompts.add_bos: true cannot be used with prompts.chat_template: true (the "
                                    "template writes the model's own special tokens)");
    settings.add_bos = false;
  }
  return settings;
}

DecodingSettings read_decoding(const Mapping& root) {
  const Mapping decoding = root.at("decoding").mapping(keys_of(decoding_fields()));
  DecodingSettings settings;
  read_plain_fields(decoding, decoding_fields(), settings);
  // Greedy decoding ignores the sampling cut-offs, so one given with it is a mistake, not a no-op.
  if (settings.temperature == 0.0) {
    const std::pair<const char*, bool> cutoffs[] = {{"top_p", settings.top_p == 1.0}, {"top_k", settings.top_k == 0}};
    for (const auto& [key, is_default] : cutoffs)
      if (!is_default)
        decoding.reject_key(key, fmt::format("decoding.{} only applies when sampling (decoding.temperature > 0)", key));
  }
  return settings;
}

std::vector<QuantizerSettings> read_quantizers(const Mapping& root) {
  static const std::regex kNameForm("[A-Za-z0-9._-]+");
  std::vector<QuantizerSettings> quantizers;
  std::set<std::string> names;
  for (const Value& entry : root.required("quantizers").elements("quantizer")) {
    const Mapping fields = entry.mapping(keys_of(quantizer_fields()));
    QuantizerSettings settings;
    const Value name = fields.required("name");
    settings.name = name.as<std::string>();
    if (!std::regex_match(settings.name, kNameForm))
      name.reject(fmt::format("{} '{}' may only hold letters, digits, '.', '_' and '-'", name.path(), settings.name));
    if (!names.insert(settings.name).second)
      name.reject(fmt::format("{} '{}' is used twice", name.path(), settings.name));
    settings.method = fields.required_text("method");
    const Mapping params = fields.at("params").open_mapping();
    for (const auto& param : params.entries()) settings.params[param.key] = param.value.as<std::string>();
    settings.line = entry.line();
    quantizers.push_back(std::move(settings));
  }
  return quantizers;
}

std::vector<Lane> read_lanes(const Mapping& root, std::vector<Lane> fallback) {
  if (!root.has("lanes")) return fallback;
  std::vector<Lane> lanes;
  for (const Value& entry : root.at("lanes").elements("lane")) {
    const Lane lane = entry.choice(kLaneNames, "lane");
    if (std::find(lanes.begin(), lanes.end(), lane) != lanes.end())
      entry.reject(fmt::format("{}: lane '{}' is listed twice", entry.path(), lane_name(lane)));
    lanes.push_back(lane);
  }
  return lanes;
}

MetricSettings read_metrics(const Mapping& root) {
  const Mapping metrics = root.at("metrics").mapping(keys_of(metric_fields()));
  MetricSettings settings;
  read_plain_fields(metrics, metric_fields(), settings);
  return settings;
}

AnalysisSettings read_analysis(const Mapping& root) {
  const Mapping analysis = root.at("analysis").mapping(keys_of(analysis_fields()));
  AnalysisSettings settings;
  read_plain_fields(analysis, analysis_fields(), settings);
  return settings;
}

OutputSettings read_output(const Mapping& root) {
  const Mapping output = root.at("output").mapping(keys_of(output_fields()));
  OutputSettings settings;
  read_plain_fields(output, output_fields(), settings);
  settings.path = (fs::current_path() / output.required_text("path")).lexically_normal().string();
  return settings;
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::istringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) parts.push_back(part);
  if (text.empty() || text.back() == separator) parts.emplace_back();  // getline drops a trailing empty part
  return parts;
}

std::optional<size_t> parse_index(const std::string& text) {
  size_t index = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), index);
  if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return index;
}

// Applies one --set KEY=VALUE to the document before validation, so that overrides are checked
// exactly like the file. KEY is dotted, with list entries selected by index
// (quantizers.0.params.k_bits); VALUE is YAML, so lanes=[static] sets a list.
void apply_override(YAML::Node& document, const std::string& argument, Provenance& provenance) {
  const size_t equals = argument.find('=');
  if (equals == std::string::npos) fail("--set {}: expected KEY=VALUE, e.g. decoding.max_new_tokens=64", argument);
  const std::string dotted_key = argument.substr(0, equals);
  const std::vector<std::string> keys = split(dotted_key, '.');
  if (contains(keys, ""))
    fail("--set {}: '{}' is not a dotted key such as decoding.max_new_tokens", argument, dotted_key);
  YAML::Node value;
  try {
    value = load_yaml(argument.substr(equals + 1));
  } catch (const YAML::Exception& error) {
    fail("--set {}: the value is not valid YAML: {}", argument, error.msg);
  }

  YAML::Node node = document;
  std::string path;
  std::string first_added;  // the first key this override adds: everything under it comes from here
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string& key = keys[i];
    const bool last = i + 1 == keys.size();
    if (node.IsSequence()) {
      const std::optional<size_t> index = parse_index(key);
      if (!index || *index >= node.size())
        fail("--set {}: {} has {} entries, so '{}' names none (entries are numbered from 0)", argument, path,
             node.size(), key);
      path += fmt::format("[{}]", *index);
      if (last) {
        node[*index] = value;
      } else {
        node.reset(node[*index]);  // reset rebinds the handle; operator= would overwrite the node
      }
      continue;
    }
    if (node.IsNull()) node = YAML::Node(YAML::NodeType::Map);  // e.g. "model:" left empty in the file
    if (!node.IsMap()) fail("--set {}: {} holds a single value, not a mapping with key '{}'", argument, path, key);
    path += path.empty() ? key : "." + key;
    const bool exists = static_cast<bool>(std::as_const(node)[key]);  // the const lookup adds nothing
    if (!exists && first_added.empty()) first_added = path;
    if (last) {
      node[key] = value;
    } else {
      if (!exists) node[key] = YAML::Node(YAML::NodeType::Map);
      node.reset(node[key]);
    }
  }
  provenance.record_override(first_added.empty() ? path : first_added, argument);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) fail("cannot read config file {}", path);
  return text.str();
}

}  // namespace

std::vector<std::string> lane_names(const std::vector<Lane>& lanes) {
  std::vector<std::string> names;
  for (Lane lane : lanes) names.emplace_back(lane_name(lane));
  return names;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code error;
  if (!fs::exists(path, error)) fail("config file not found: {}", path);
  if (!fs::is_regular_file(path, error)) fail("config {} is not a regular file (a device, a FIFO or a folder)", path);
  std::vector<YAML::Node> documents;
  try {
    documents = load_yaml_documents(read_text(path));
  } catch (const YAML::Exception& syntax_error) {
    fail("{}:{}: YAML syntax error: {}", path, syntax_error.mark.line + 1, syntax_error.msg);
  }
  if (documents.size() > 1)
    fail("{}:{}: a config is one YAML document, but a second one starts here", path, documents[1].Mark().line + 1);
  YAML::Node document = documents.empty() ? YAML::Node() : documents.front();
  check_yaml_size(document, path);

  Provenance provenance(path);
  if (document.IsNull()) document = YAML::Node(YAML::NodeType::Map);
  if (!document.IsMap()) fail("{}: the config must be a mapping of sections ({})", path, fmt::join(kSections, ", "));
  for (const std::string& argument : overrides) apply_override(document, argument, provenance);
  const Mapping root = Value(provenance, document, "", document.Mark()).mapping(kSections);

  RunConfig config;
  config.source_path = path;
  const fs::path config_dir = fs::absolute(path).parent_path();
  config.model = read_model(root, config_dir);
  config.prompts = read_prompts(root, config_dir, config.model);
  config.decoding = read_decoding(root);
  config.quantizers = read_quantizers(root);
  config.lanes = read_lanes(root, config.lanes);
  config.metrics = read_metrics(root);
  config.analysis = read_analysis(root);
  config.output = read_output(root);
  return config;
}

std::string RunConfig::resolved_yaml() const {
  YAML::Emitter out;
  const auto key = [&out](const char* name) -> YAML::Emitter& { return out << YAML::Key << name << YAML::Value; };
  out << YAML::BeginMap;
  key("model");
  write_fields(out, model, model_fields());
  key("prompts");
  write_fields(out, prompts, prompt_fields());
  key("decoding");
  write_fields(out, decoding, decoding_fields());
  key("quantizers") << YAML::BeginSeq;
  for (const QuantizerSettings& quantizer : quantizers) write_fields(out, quantizer, quantizer_fields());
  out << YAML::EndSeq;
  key("lanes") << YAML::Flow << lane_names(lanes);
  key("metrics");
  write_fields(out, metrics, metric_fields());
  key("analysis");
  write_fields(out, analysis, analysis_fields());
  key("output");
  write_fields(out, output, output_fields());
  out << YAML::EndMap;
  if (!out.good()) fail("cannot write the run config as YAML: {}", out.GetLastError());
  return std::string(out.c_str()) + "\n";
}

bool operator==(const ModelSettings& a, const ModelSettings& b) { return equal_fields(a, b, model_fields()); }
bool operator==(const DecodingSettings& a, const DecodingSettings& b) { return equal_fields(a, b, decoding_fields()); }
bool operator==(const QuantizerSettings& a, const QuantizerSettings& b) {
  return equal_fields(a, b, quantizer_fields());
}
bool operator==(const MetricSettings& a, const MetricSettings& b) { return equal_fields(a, b, metric_fields()); }
bool operator==(const AnalysisSettings& a, const AnalysisSettings& b) {
  return equal_fields(a, b, analysis_fields());
}
bool operator==(const OutputSettings& a, const OutputSettings& b) { return equal_fields(a, b, output_fields()); }

bool operator==(const RunConfig& a, const RunConfig& b) {
  // PromptSource belongs to io/prompts.h, so its comparison stays here rather than as its operator==.
  return equal_fields(a.prompts, b.prompts, prompt_fields()) &&
         std::tie(a.model, a.decoding, a.quantizers, a.lanes, a.metrics, a.analysis, a.output) ==
             std::tie(b.model, b.decoding, b.quantizers, b.lanes, b.metrics, b.analysis, b.output);
}

}  // namespace kvdrift
