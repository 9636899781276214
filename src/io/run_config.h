#pragma once
// The run configuration of `kvdrift run CONFIG.yaml [--set a.b=value ...]`: what model to load, which
// prompts to decode and how, which quantizers and lanes to compare, what to log and where. Read by
// io/strict_yaml.h, so unknown keys, wrong types and values out of range are errors naming the dotted
// key and where it came from; so are settings that cannot take effect together.
//
// Paths: model.path, model.tokenizer and prompts.path are relative to the directory of what wrote them
// (the config file, the working directory for --set, the sweep file for its values); output.path to
// the working directory (outputs belong to the caller). All are stored absolute and normalized;
// synthetic:NAME model paths as written.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/enum_names.h"
#include "io/prompts.h"
#include "io/strict_yaml.h"

namespace kvdrift {

// The lanes a run compares with its full-precision reference (SPEC §1; one_step: docs/engine.md). Their
// names ("static", "teacher_forced", "one_step", "free_running") appear only in config files and run logs.
enum class Lane { Static, TeacherForced, OneStep, FreeRunning };
inline constexpr EnumName<Lane> kLaneNames[] = {{Lane::Static, "static"},
                                                {Lane::TeacherForced, "teacher_forced"},
                                                {Lane::OneStep, "one_step"},
                                                {Lane::FreeRunning, "free_running"}};
inline const char* lane_name(Lane lane) { return enum_name(kLaneNames, lane); }
std::vector<std::string> lane_names(const std::vector<Lane>& lanes);

// decoding.prefill (docs/engine.md).
enum class PrefillMode { Full, Chunked };
inline constexpr EnumName<PrefillMode> kPrefillModeNames[] = {{PrefillMode::Full, "full"},
                                                              {PrefillMode::Chunked, "chunked"}};
inline const char* prefill_mode_name(PrefillMode mode) { return enum_name(kPrefillModeNames, mode); }

// Optional strings below use "" for "not given"; the YAML may also leave such a key out, set it to
// null or to "".

struct ModelSettings {
  std::string path;               // llama2.c .bin, HF directory, or synthetic:NAME
  std::string tokenizer;          // "": the model's own (an HF directory's tokenizer.json)
  std::string device = "cpu";     // cpu | cuda | cuda:N (the form is checked, not availability)
  std::string dtype = "float32";  // float32 | float16 | bfloat16
  uint64_t seed = 0;              // synthetic weights; only accepted with a synthetic: path
  std::string origin;             // where path was set, for errors about the model ("demo.yaml:2")
};

// NAME of a synthetic:NAME model path ("" for "synthetic:" alone); nullopt for any other path. The one
// place that reads the prefix.
std::optional<std::string> synthetic_model_name(const std::string& model_path);

// The prompts section is the prompt reader's own input, so that the two cannot drift apart. YAML keys
// map to fields by name, except `source` (-> kind) and `template` (-> template_text). Keys that belong
// to another source are rejected, so every field that is set is one the chosen source reads;
// inline needs at least one text (an empty one is a BOS-only prompt), token_ids at least one
// non-empty list of ids >= 0.
using PromptSettings = PromptSource;

struct DecodingSettings {
  int64_t max_new_tokens = 256;
  bool stop_at_eos = true;
  double temperature = 0.0;  // 0: greedy, and then top_p and top_k must keep their defaults
  double top_p = 1.0;        // in (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
  int64_t batch_prompts = 1;
  // full: the prompt in one prefill whose attention reads it in full precision (deployment).
  // chunked: the prompt pseudo-decoded in chunks of prefill_chunk tokens, each reading the earlier
  // chunks as its quantizer's cache holds them (the KVarN paper's accumulation protocol).
  PrefillMode prefill = PrefillMode::Full;
  int64_t prefill_chunk = 128;
  // A lane decodes as its reference (no row of its own) until the forward in which it would first read
  // a quantized position, and forks from it there (docs/engine.md); false: every lane its own row from
  // the prefill on.
  bool share_until_onset = true;
};

struct QuantizerSettings {
  std::string name;                           // unique, [A-Za-z0-9._-]+
  std::string method;                         // checked by the quantizer registry, not here
  std::map<std::string, std::string> params;  // values as written, for the method's ParamReader
  std::string origin;  // where the entry was set, for errors ("demo.yaml:12", "--set quantizers.0.params.k_bits=3")
};

struct MetricSettings {
  int64_t layer_stride = 1;  // per-layer arrays are logged every layer_stride steps
  bool token_scale = true;
  bool attention_error = true;
};

// How the run log's summary measures growth after the onset (docs/hdf5-schema.md, "Summary").
struct AnalysisSettings {
  int64_t onset_margin = 16;          // post-onset slopes start this many steps after the first quantized read
  int64_t min_post_onset_steps = 64;  // a sample enters them with at least this many such steps
};

struct OutputSettings {
  std::string path;            // relative to the current working directory
  double flush_seconds = 5.0;  // > 0
};

struct RunConfig {
  ModelSettings model;
  PromptSettings prompts;
  DecodingSettings decoding;
  std::vector<QuantizerSettings> quantizers;
  std::vector<Lane> lanes = {Lane::Static, Lane::TeacherForced, Lane::FreeRunning};  // in the order given
  MetricSettings metrics;
  AnalysisSettings analysis;
  OutputSettings output;
  std::string source_path;  // the config file as named by the caller (YamlSource::file)

  // The settings as YAML, defaults filled in and overrides applied, keys in schema order and only
  // those the settings use: recorded in outputs and compared on resume. Loading this text again
  // gives an equal RunConfig and the same text.
  std::string resolved_yaml() const;
};

// Equal settings. Where they were read from (source_path, the origins) is not compared.
bool operator==(const ModelSettings& a, const ModelSettings& b);
bool operator==(const DecodingSettings& a, const DecodingSettings& b);
bool operator==(const QuantizerSettings& a, const QuantizerSettings& b);
bool operator==(const MetricSettings& a, const MetricSettings& b);
bool operator==(const AnalysisSettings& a, const AnalysisSettings& b);
bool operator==(const OutputSettings& a, const OutputSettings& b);
bool operator==(const RunConfig& a, const RunConfig& b);

// The run config of `document` as read from `source` with `overrides` applied in order (to `document`
// itself: pass a tree of your own), validated. Throws Error on the first problem, naming the value's
// origin (a line of source.file, or the override's origin) followed by source.context. In memory:
// `kvdrift sweep plan` builds every point so.
RunConfig load_run_config(YAML::Node document, const YamlSource& source, const std::vector<Override>& overrides);

// Reads the YAML file at `path` and applies `set_arguments` ("a.b=value"; a number selects a list
// entry, as in quantizers.0.params.k_bits=4; the value is YAML, so lanes=[static] sets a list).
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& set_arguments);

}  // namespace kvdrift
