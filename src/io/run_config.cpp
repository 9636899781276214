#include "io/run_config.h"

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

#include "core/error.h"
#include "io/strict_yaml.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kSections = {"model", "prompts", "decoding", "quantizers", "lanes", "metrics", "analysis", "output"};
bool is_synthetic(const std::string& model_path) { return synthetic_model_name(model_path).has_value(); }

// "a", "a or b", "a, b or c".
std::string or_list(const std::vector<std::string>& items) {
  std::string text = items.front();
  for (size_t i = 1; i < items.size(); ++i) text += (i + 1 == items.size() ? " or " : ", ") + items[i];
  return text;
}

// A path value is relative to the directory of what wrote it: the config file's for a value written
// there, the working directory for one given with --set (as the shell user typed it), the sweep file's
// for a grid value. "" when not given.
std::string resolve_path(const Value& value) {
  const std::string text = value.as_or<std::string>("");
  if (text.empty()) return text;
  return (fs::path(value.base_dir()) / text).lexically_normal().string();
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
      plain("share_until_onset", &D::share_until_onset),
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

ModelSettings read_model(const Mapping& root) {
  const Mapping model = root.at("model").mapping(keys_of(model_fields()));
  ModelSettings settings;
  settings.path = model.required_text("path");
  const Value path = model.at("path");
  settings.origin = path.where();
  if (!is_synthetic(settings.path)) {
    settings.path = resolve_path(path);
  } else if (synthetic_model_name(settings.path)->empty()) {
    path.reject("model.path: synthetic: needs a model name, e.g. synthetic:llama-3.2-1b");
  }
  settings.tokenizer = resolve_path(model.at("tokenizer"));

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

PromptSettings read_prompts(const Mapping& root, const ModelSettings& model) {
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
    settings.path = resolve_path(prompts.at("path"));
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
    settings.origin = entry.origin();
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

// A section of plain fields only.
template <typename S>
S read_plain_section(const Mapping& root, const char* key, const std::vector<Field<S>>& fields) {
  S settings;
  read_plain_fields(root.at(key).mapping(keys_of(fields)), fields, settings);
  return settings;
}

OutputSettings read_output(const Mapping& root) {
  const Mapping output = root.at("output").mapping(keys_of(output_fields()));
  OutputSettings settings;
  read_plain_fields(output, output_fields(), settings);
  settings.path = (fs::current_path() / output.required_text("path")).lexically_normal().string();
  return settings;
}

}  // namespace

std::optional<std::string> synthetic_model_name(const std::string& model_path) {
  static const std::string kPrefix = "synthetic:";
  if (model_path.rfind(kPrefix, 0) != 0) return std::nullopt;
  return model_path.substr(kPrefix.size());
}

std::vector<std::string> lane_names(const std::vector<Lane>& lanes) {
  std::vector<std::string> names;
  for (Lane lane : lanes) names.emplace_back(lane_name(lane));
  return names;
}

RunConfig load_run_config(YAML::Node document, const YamlSource& source, const std::vector<Override>& overrides) {
  if (!document.IsNull() && !document.IsMap())
    fail("{}{}: the config must be a mapping of sections ({})", source.file, source.context,
         fmt::join(kSections, ", "));
  Document config_document(std::move(document), source);
  for (const Override& override : overrides) config_document.apply(override);
  const Mapping root = config_document.root().mapping(kSections);

  RunConfig config;
  config.source_path = source.file;
  config.model = read_model(root);
  config.prompts = read_prompts(root, config.model);
  config.decoding = read_decoding(root);
  config.quantizers = read_quantizers(root);
  config.lanes = read_lanes(root, config.lanes);
  config.metrics = read_plain_section(root, "metrics", metric_fields());
  config.analysis = read_plain_section(root, "analysis", analysis_fields());
  config.output = read_output(root);
  return config;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& set_arguments) {
  const YamlFile file = read_yaml_file(path, "config");
  std::vector<Override> overrides;
  for (const std::string& argument : set_arguments) overrides.push_back(parse_set_argument(argument));
  return load_run_config(file.document, {path, fs::absolute(path).parent_path().string(), ""}, overrides);
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
