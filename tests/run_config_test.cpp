// The run config loader: every setting read, defaults, path resolution, --set overrides, the
// resolved YAML round trip, and the errors users see, checked word for word with file and line.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "io/run_config.h"
#include "support.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

// The smallest valid config; tests append sections to it from line 11 on.
const std::string kMinimal = R"(model:
  path: synthetic:tiny
prompts:
  source: token_ids
  ids: [[1, 2, 3]]
quantizers:
  - name: kivi-2bit
    method: kivi
output:
  path: out.h5
)";

std::string write_config(const std::string& dir, const std::string& yaml) {
  const std::string path = dir + "/demo.yaml";
  test::write_file(path, yaml);
  return path;
}

RunConfig load(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return load_run_config(write_config(test::scratch_dir(), yaml), overrides);
}

// The message of loading `yaml`, with the scratch directory cut from the file name, so that
// expectations read as users see them: "demo.yaml:12: ...".
std::string load_error(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  const std::string dir = test::scratch_dir();
  const std::string path = write_config(dir, yaml);
  std::string message = test::error_message([&] { load_run_config(path, overrides); });
  if (message.rfind(dir + "/", 0) == 0) message.erase(0, dir.size() + 1);
  return message;
}

std::string cwd_path(const std::string& relative) {
  return (fs::current_path() / relative).lexically_normal().string();
}

TEST(RunConfig, FullConfigLoadsEveryValue) {
  const std::string dir = test::scratch_dir();
  const std::string path = write_config(dir, R"(model:
  path: models/stories.bin
  tokenizer: models/tok512.bin
  device: cuda:1
  dtype: bfloat16
prompts:
  source: jsonl
  path: data/math.jsonl.gz
  template: "Problem: {problem}\nSolution:"
  answer_field: answer
  offset: 3
  limit: 10
  add_bos: false
decoding:
  max_new_tokens: 64
  stop_at_eos: false
  temperature: 0.7
  top_p: 0.9
  top_k: 40
  seed: 7
  batch_prompts: 4
quantizers:
  - name: kivi-2bit
    method: kivi
    params: {k_bits: 2, v_bits: 2, group_size: 32}
  - name: kvarn-k2v2-noVarN
    method: kvarn
    params:
      preset: k2v2
      iters: 0
lanes: [free_running, static]
metrics:
  layer_stride: 4
  token_scale: false
  attention_error: false
output:
  path: runs/math.h5
  flush_seconds: 2.5
)");
  const RunConfig config = load_run_config(path, {});
  EXPECT_EQ(config.source_path, path);
  EXPECT_EQ(config.model.path, dir + "/models/stories.bin");
  EXPECT_EQ(config.model.tokenizer, dir + "/models/tok512.bin");
  EXPECT_EQ(config.model.device, "cuda:1");
  EXPECT_EQ(config.model.dtype, "bfloat16");
  EXPECT_EQ(config.prompts.kind, PromptKind::Jsonl);
  EXPECT_EQ(config.prompts.path, dir + "/data/math.jsonl.gz");
  EXPECT_EQ(config.prompts.template_text, "Problem: {problem}\nSolution:");
  EXPECT_EQ(config.prompts.field, "");
  EXPECT_EQ(config.prompts.answer_field, "answer");
  EXPECT_EQ(config.prompts.offset, 3);
  EXPECT_EQ(config.prompts.limit, 10);
  EXPECT_FALSE(config.prompts.add_bos);
  EXPECT_EQ(config.decoding.max_new_tokens, 64);
  EXPECT_FALSE(config.decoding.stop_at_eos);
  EXPECT_EQ(config.decoding.temperature, 0.7);
  EXPECT_EQ(config.decoding.top_p, 0.9);
  EXPECT_EQ(config.decoding.top_k, 40);
  EXPECT_EQ(config.decoding.seed, 7u);
  EXPECT_EQ(config.decoding.batch_prompts, 4);
  ASSERT_EQ(config.quantizers.size(), 2u);
  EXPECT_EQ(config.quantizers[0].name, "kivi-2bit");
  EXPECT_EQ(config.quantizers[0].method, "kivi");
  const std::map<std::string, std::string> kivi_params = {{"k_bits", "2"}, {"v_bits", "2"}, {"group_size", "32"}};
  EXPECT_EQ(config.quantizers[0].params, kivi_params);
  EXPECT_EQ(config.quantizers[0].origin, path + ":23");
  EXPECT_EQ(config.quantizers[1].name, "kvarn-k2v2-noVarN");
  EXPECT_EQ(config.quantizers[1].method, "kvarn");
  const std::map<std::string, std::string> kvarn_params = {{"preset", "k2v2"}, {"iters", "0"}};
  EXPECT_EQ(config.quantizers[1].params, kvarn_params);
  EXPECT_EQ(config.quantizers[1].origin, path + ":26");
  EXPECT_EQ(config.lanes, (std::vector<Lane>{Lane::FreeRunning, Lane::Static}));
  EXPECT_EQ(config.metrics.layer_stride, 4);
  EXPECT_FALSE(config.metrics.token_scale);
  EXPECT_FALSE(config.metrics.attention_error);
  EXPECT_EQ(config.output.path, cwd_path("runs/math.h5"));
  EXPECT_EQ(config.output.flush_seconds, 2.5);
}

TEST(RunConfig, DefaultsFillIn) {
  const RunConfig config = load(kMinimal);
  EXPECT_EQ(config.model.path, "synthetic:tiny");
  EXPECT_EQ(config.model.tokenizer, "");
  EXPECT_EQ(config.model.device, "cpu");
  EXPECT_EQ(config.model.dtype, "float32");
  EXPECT_EQ(config.model.seed, 0u);
  EXPECT_EQ(config.prompts.ids, (std::vector<std::vector<int64_t>>{{1, 2, 3}}));
  EXPECT_EQ(config.prompts.offset, 0);
  EXPECT_EQ(config.prompts.limit, 0);
  EXPECT_TRUE(config.prompts.add_bos);
  EXPECT_EQ(config.decoding.max_new_tokens, 256);
  EXPECT_TRUE(config.decoding.stop_at_eos);
  EXPECT_EQ(config.decoding.temperature, 0.0);
  EXPECT_EQ(config.decoding.top_p, 1.0);
  EXPECT_EQ(config.decoding.top_k, 0);
  EXPECT_EQ(config.decoding.seed, 0u);
  EXPECT_EQ(config.decoding.batch_prompts, 1);
  ASSERT_EQ(config.quantizers.size(), 1u);
  EXPECT_TRUE(config.quantizers[0].params.empty());
  EXPECT_EQ(config.quantizers[0].origin, config.source_path + ":7");
  EXPECT_EQ(config.lanes, (std::vector<Lane>{Lane::Static, Lane::TeacherForced, Lane::FreeRunning}));
  EXPECT_EQ(config.metrics.layer_stride, 1);
  EXPECT_TRUE(config.metrics.token_scale);
  EXPECT_TRUE(config.metrics.attention_error);
  EXPECT_EQ(config.output.flush_seconds, 5.0);
}

TEST(RunConfig, OtherPromptSourcesLoad) {
  const RunConfig inline_texts = load(R"(model: {path: synthetic:tiny, tokenizer: tok.json, seed: 3}
prompts:
  source: inline
  texts: ["Once upon a time", ""]
quantizers: [{name: q, method: none}]
output: {path: out.h5}
)");
  EXPECT_EQ(inline_texts.prompts.texts, (std::vector<std::string>{"Once upon a time", ""}));
  EXPECT_EQ(inline_texts.model.seed, 3u);

  const RunConfig text_file = load(R"(model: {path: /models/m.bin}
prompts: {source: text_file, path: stories.txt, separator: "\n---\n"}
quantizers: [{name: q, method: none}]
output: {path: out.h5}
)");
  EXPECT_EQ(text_file.prompts.separator, std::optional<std::string>("\n---\n"));

  const RunConfig jsonl = load(R"(model: {path: /models/m.bin}
prompts: {source: jsonl, path: gsm8k.jsonl, field: question, answer_field: answer}
quantizers: [{name: q, method: none}]
output: {path: out.h5}
)");
  EXPECT_EQ(jsonl.prompts.field, "question");
  EXPECT_EQ(jsonl.prompts.template_text, "");
  EXPECT_EQ(jsonl.prompts.separator, std::nullopt);
}

TEST(RunConfig, RelativePathsResolve) {
  const std::string dir = test::scratch_dir();
  fs::create_directories(dir + "/configs");
  const std::string path = dir + "/configs/demo.yaml";
  test::write_file(path, R"(model: {path: ../models/m.bin, tokenizer: /abs/tok.bin}
prompts: {source: text_file, path: ./data/../prompts.txt}
quantizers: [{name: q, method: none}]
output: {path: ../runs/out.h5}
)");
  const RunConfig from_file = load_run_config(path, {});
  EXPECT_EQ(from_file.model.path, dir + "/models/m.bin");  // against the config's directory
  EXPECT_EQ(from_file.model.tokenizer, "/abs/tok.bin");
  EXPECT_EQ(from_file.prompts.path, dir + "/configs/prompts.txt");
  EXPECT_EQ(from_file.output.path, cwd_path("../runs/out.h5"));  // against the working directory

  // Paths typed on the command line are relative to the working directory, as in a shell.
  const RunConfig overridden = load_run_config(path, {"model.path=models/other.bin", "prompts.path=p.txt"});
  EXPECT_EQ(overridden.model.path, cwd_path("models/other.bin"));
  EXPECT_EQ(overridden.prompts.path, cwd_path("p.txt"));
}

TEST(RunConfig, SetOverridesKeysListEntriesAndWholeLists) {
  const RunConfig config = load(kMinimal, {"decoding.max_new_tokens=32", "quantizers.0.params.k_bits=4",
                                           "quantizers.0.method=kvarn", "lanes=[static]",
                                           "prompts.ids=[[5], [6, 7]]", "decoding.temperature=0.5",
                                           "decoding.top_p=0.95", "output.flush_seconds=1"});
  EXPECT_EQ(config.decoding.max_new_tokens, 32);
  EXPECT_EQ(config.quantizers[0].params, (std::map<std::string, std::string>{{"k_bits", "4"}}));
  EXPECT_EQ(config.quantizers[0].method, "kvarn");
  // An entry a --set changed is named by the last such --set (an error about the quantizer points there).
  EXPECT_EQ(config.quantizers[0].origin, "--set quantizers.0.method=kvarn");
  const RunConfig untouched = load(kMinimal, {"decoding.seed=1"});
  EXPECT_EQ(untouched.quantizers[0].origin, untouched.source_path + ":7");
  EXPECT_EQ(config.lanes, std::vector<Lane>{Lane::Static});
  EXPECT_EQ(config.prompts.ids, (std::vector<std::vector<int64_t>>{{5}, {6, 7}}));
  EXPECT_EQ(config.decoding.top_p, 0.95);
  EXPECT_EQ(config.output.flush_seconds, 1.0);

  // A later --set wins; a whole list from --set is named by it.
  const RunConfig replaced = load(kMinimal, {"decoding.seed=1", "decoding.seed=2",
                                             "quantizers=[{name: a, method: rtn, params: {k_bits: 8}}]"});
  EXPECT_EQ(replaced.decoding.seed, 2u);
  ASSERT_EQ(replaced.quantizers.size(), 1u);
  EXPECT_EQ(replaced.quantizers[0].name, "a");
  EXPECT_EQ(replaced.quantizers[0].origin, "--set quantizers=[{name: a, method: rtn, params: {k_bits: 8}}]");
}

// In memory, as `kvdrift sweep plan` builds its points: each override carries its origin and the
// directory its paths are relative to; the source's context follows every location an error names.
TEST(RunConfig, InMemoryOverridesCarryTheirOwnOrigins) {
  const YamlSource source{"base.yaml", "/configs", ": point p1"};
  const auto value = [](const std::string& text) { return load_yaml(text); };
  const std::vector<Override> overrides = {
      {"model.tokenizer", value("tok.bin"), "grid.yaml:3", "/studies"},
      {"prompts", value("{source: text_file, path: p.txt}"), "grid.yaml:4", "/studies"},
      {"quantizers.0.params.k_bits", value("4"), "grid.yaml:5", "/studies"}};
  const RunConfig config = load_run_config(load_yaml(kMinimal + "lanes: [static]\n"), source, overrides);
  EXPECT_EQ(config.source_path, "base.yaml");
  EXPECT_EQ(config.model.tokenizer, "/studies/tok.bin");
  EXPECT_EQ(config.prompts.path, "/studies/p.txt");
  EXPECT_EQ(config.model.origin, "base.yaml:2: point p1");
  EXPECT_EQ(config.quantizers[0].origin, "grid.yaml:5: point p1");
  EXPECT_EQ(config.lanes, std::vector<Lane>{Lane::Static});

  EXPECT_EQ(test::error_message([&] {
              load_run_config(load_yaml(kMinimal), source,
                              {{"decoding", value("{temperature: 0.5, top_p: 2}"), "grid.yaml:9", "/studies"}});
            }),
            "grid.yaml:9: point p1: decoding.top_p must be in (0, 1]");
  EXPECT_EQ(test::error_message(
                [&] { load_run_config(load_yaml(kMinimal + "decoding: {max_new_tokens: 0}\n"), source, {}); }),
            "base.yaml:11: point p1: decoding.max_new_tokens must be >= 1");
  EXPECT_EQ(test::error_message([&] {
              load_run_config(load_yaml(kMinimal), source, {{"quantizers.3.method", value("rtn"), "grid.yaml:7", ""}});
            }),
            "grid.yaml:7: point p1: quantizers has 1 entries, so '3' names none (entries are numbered from 0)");
}

TEST(RunConfig, ResolvedYamlRoundTrips) {
  const std::string tricky_texts = R"(model: {path: synthetic:tiny, tokenizer: tok.json}
prompts:
  source: inline
  texts: ["", "null", "yes", "12", "two\nlines", " padded ", "Problem: {x}", "é"]
decoding: {temperature: 0.1, top_p: 0.3333333333333333, top_k: 3}
quantizers:
  - {name: a, method: kivi, params: {residual_length: 128, clip: "0.95", note: "null"}}
  - {name: b, method: none}
lanes: [teacher_forced]
output: {path: out.h5, flush_seconds: 0.25}
)";
  const std::string jsonl = R"(model: {path: m.bin, device: cuda}
prompts: {source: jsonl, path: d.jsonl, template: "Q: {q}\nA:", answer_field: a, offset: 2}
quantizers: [{name: q, method: none}]
output: {path: out.h5}
)";
  const std::string text_file = R"(model: {path: m.bin}
prompts: {source: text_file, path: d.txt, separator: "\n\n", add_bos: false}
quantizers: [{name: q, method: none}]
output: {path: out.h5}
)";
  for (const std::string& yaml : {kMinimal, tricky_texts, jsonl, text_file}) {
    const RunConfig first = load(yaml);
    // Written elsewhere (as into an output file) and read back: paths are absolute, so nothing moves.
    const std::string elsewhere = test::scratch_dir() + "/recorded";
    fs::create_directories(elsewhere);
    const RunConfig second = load_run_config(write_config(elsewhere, first.resolved_yaml()), {});
    EXPECT_TRUE(first == second) << first.resolved_yaml() << "\n---\n" << second.resolved_yaml();
    EXPECT_EQ(first.resolved_yaml(), second.resolved_yaml());
  }
}

TEST(RunConfig, ResolvedYamlListsEverySettingInSchemaOrder) {
  const RunConfig config = load(kMinimal);
  EXPECT_EQ(config.resolved_yaml(), R"(model:
  path: synthetic:tiny
  device: cpu
  dtype: float32
  seed: 0
prompts:
  source: token_ids
  ids: [[1, 2, 3]]
  offset: 0
  limit: 0
decoding:
  max_new_tokens: 256
  stop_at_eos: true
  temperature: 0
  top_p: 1
  top_k: 0
  seed: 0
  batch_prompts: 1
  prefill: full
  prefill_chunk: 128
  share_until_onset: true
quantizers:
  - name: kivi-2bit
    method: kivi
    params: {}
lanes: [static, teacher_forced, free_running]
metrics:
  layer_stride: 1
  token_scale: true
  attention_error: true
analysis:
  onset_margin: 16
  min_post_onset_steps: 64
output:
  path: )" + cwd_path("out.h5") + R"(
  flush_seconds: 5
)");
}

TEST(RunConfig, UnknownTopLevelKeyNamesLineAndKnownKeys) {
  EXPECT_EQ(load_error(kMinimal + "metric:\n  layer_stride: 2\n"),
            "demo.yaml:11: unknown key 'metric' (known: model, prompts, decoding, quantizers, lanes, metrics, analysis, output)");
}

// Nine levels of nine aliases (9^9 values in ~300 bytes) are refused before anything walks them.
TEST(RunConfig, AliasBombIsRefusedAtOnce) {
  std::string bomb = "bomb:\n  - &l1 [0, 0, 0, 0, 0, 0, 0, 0, 0]\n";
  for (int level = 2; level <= 9; ++level)
    bomb += fmt::format("  - &l{} [{}]\n", level, fmt::join(std::vector<std::string>(9, fmt::format("*l{}", level - 1)), ", "));
  EXPECT_EQ(load_error(kMinimal + bomb),
            "demo.yaml: expands to more than 100000 YAML nodes (aliases that repeat aliases?); write the values out");
}

TEST(RunConfig, UnknownNestedKeyNamesDottedPath) {
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  max_new_tokens: 8\n  temprature: 0.5\n"),
            "demo.yaml:13: unknown key 'decoding.temprature' (known: max_new_tokens, stop_at_eos, temperature, "
            "top_p, top_k, seed, batch_prompts, prefill, prefill_chunk, "
            "share_until_onset)");
  EXPECT_EQ(load_error(kMinimal + "metrics: {layer_strid: 2}\n"),
            "demo.yaml:11: unknown key 'metrics.layer_strid' (known: layer_stride, token_scale, attention_error)");
  EXPECT_EQ(load_error(R"(model: {path: synthetic:tiny}
prompts:
  source: token_ids
  ids: [[1]]
quantizers:
  - name: a
    method: kivi
    parms: {k_bits: 2}
output: {path: out.h5}
)"),
            "demo.yaml:8: unknown key 'quantizers[0].parms' (known: name, method, params)");
}

TEST(RunConfig, WrongTypeForIntegerFloatBoolStringList) {
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  max_new_tokens: many\n"),
            "demo.yaml:12: decoding.max_new_tokens: expected an integer, got 'many'");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  max_new_tokens: 2.5\n"),
            "demo.yaml:12: decoding.max_new_tokens: expected an integer, got '2.5'");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  max_new_tokens: \"12\"\n"),
            "demo.yaml:12: decoding.max_new_tokens: expected an integer, got the quoted string '12'");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  temperature: warm\n"),
            "demo.yaml:12: decoding.temperature: expected a number, got 'warm'");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  stop_at_eos: yes\n"),
            "demo.yaml:12: decoding.stop_at_eos: expected true or false, got 'yes'");
  EXPECT_EQ(load_error(kMinimal + "metrics:\n  token_scale: [true]\n"),
            "demo.yaml:12: metrics.token_scale: expected true or false, got a list");
  EXPECT_EQ(load_error(kMinimal + "lanes: static\n"), "demo.yaml:11: lanes: expected a list, got 'static'");
  EXPECT_EQ(load_error(kMinimal + "decoding: 5\n"), "demo.yaml:11: decoding: expected a mapping, got '5'");
  EXPECT_EQ(load_error(R"(model:
  path: [a.bin, b.bin]
)"),
            "demo.yaml:2: model.path: expected a string, got a list");
  EXPECT_EQ(load_error(R"(model: {path: synthetic:tiny}
prompts:
  source: token_ids
  ids: [[1, 2], [3, x]]
)"),
            "demo.yaml:4: prompts.ids[1][1]: expected an integer, got 'x'");
}

TEST(RunConfig, ValuesOutOfRangeNameTheirBounds) {
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  max_new_tokens: 0\n"),
            "demo.yaml:12: decoding.max_new_tokens must be >= 1");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  temperature: 0.8\n  top_p: 0\n"),
            "demo.yaml:13: decoding.top_p must be in (0, 1]");
  EXPECT_EQ(load_error(kMinimal + "metrics: {layer_stride: -2}\n"), "demo.yaml:11: metrics.layer_stride must be >= 1");
  EXPECT_EQ(load_error(kMinimal, {"output.flush_seconds=0"}),
            "--set output.flush_seconds=0: output.flush_seconds must be > 0");
  EXPECT_EQ(load_error(kMinimal, {"prompts.ids=[[1, -1]]"}),
            "--set prompts.ids=[[1, -1]]: prompts.ids[0][1] must be >= 0");
  EXPECT_EQ(load_error(kMinimal, {"model.device=gpu"}),
            "--set model.device=gpu: model.device: expected cpu, cuda or cuda:N, got 'gpu'");
  EXPECT_EQ(load_error(kMinimal, {"model.dtype=fp16"}),
            "--set model.dtype=fp16: model.dtype: unknown dtype 'fp16' (known: float32, float16, bfloat16)");
}

TEST(RunConfig, MissingRequiredKeyNamesTheFile) {
  EXPECT_EQ(load_error("prompts: {source: token_ids, ids: [[1]]}\n"), "demo.yaml: missing required key 'model.path'");
  EXPECT_EQ(load_error("model:\n  path: synthetic:tiny\n"), "demo.yaml: missing required key 'prompts.source'");
  EXPECT_EQ(load_error(R"(model: {path: synthetic:tiny}
prompts: {source: token_ids, ids: [[1]]}
quantizers:
  - name: a
)"),
            "demo.yaml: missing required key 'quantizers[0].method'");
  EXPECT_EQ(load_error(R"(model: {path: synthetic:tiny}
prompts: {source: token_ids, ids: [[1]]}
quantizers: [{name: a, method: none}]
)"),
            "demo.yaml: missing required key 'output.path'");
  EXPECT_EQ(load_error(kMinimal, {"model.path="}), "--set model.path=: missing required key 'model.path'");
}

TEST(RunConfig, DuplicateQuantizerName) {
  EXPECT_EQ(load_error(R"(model: {path: synthetic:tiny}
prompts: {source: token_ids, ids: [[1]]}
quantizers:
  - name: kivi
    method: kivi
  - name: kivi
    method: kivi
    params: {k_bits: 4}
output: {path: out.h5}
)"),
            "demo.yaml:6: quantizers[1].name 'kivi' is used twice");
  EXPECT_EQ(load_error(kMinimal, {"quantizers.0.name=kivi 2bit"}),
            "--set quantizers.0.name=kivi 2bit: quantizers[0].name 'kivi 2bit' may only hold letters, digits, '.', '_' "
            "and '-'");
}

TEST(RunConfig, LanesMustBeKnownDistinctAndSome) {
  EXPECT_EQ(load_error(kMinimal + "lanes: []\n"), "demo.yaml:11: lanes: empty list names no lane");
  EXPECT_EQ(load_error(kMinimal + "lanes:\n  - static\n  - free-running\n"),
            "demo.yaml:13: lanes[1]: unknown lane 'free-running' (known: static, teacher_forced, one_step, free_running)");
  EXPECT_EQ(load_error(kMinimal + "lanes: [static, teacher_forced, static]\n"),
            "demo.yaml:11: lanes[2]: lane 'static' is listed twice");
  EXPECT_EQ(load_error(kMinimal, {"quantizers=[]"}), "--set quantizers=[]: quantizers: empty list names no quantizer");
}

TEST(RunConfig, OptionForAnotherPromptSource) {
  EXPECT_EQ(load_error(R"(model: {path: m.bin}
prompts:
  source: jsonl
  path: math.jsonl
  field: problem
  texts: [hello]
)"),
            "demo.yaml:6: prompts.texts is only valid with source inline");
  EXPECT_EQ(load_error(kMinimal, {"prompts.separator=;"}),
            "--set prompts.separator=;: prompts.separator is only valid with source text_file");
  EXPECT_EQ(load_error(kMinimal, {"prompts.add_bos=false"}),
            "--set prompts.add_bos=false: prompts.add_bos is only valid with source inline, text_file or jsonl");
  EXPECT_EQ(load_error(kMinimal, {"model.path=m.bin", "model.seed=3"}),
            "--set model.seed=3: model.seed is only valid with a synthetic:NAME model (it seeds random weights)");
}

TEST(RunConfig, ImpossibleCombinations) {
  EXPECT_EQ(load_error(R"(model: {path: m.bin}
prompts: {source: jsonl, path: math.jsonl}
)"),
            "demo.yaml: missing required key 'prompts.field'");
  EXPECT_EQ(load_error(R"(model: {path: m.bin}
prompts:
  source: jsonl
  path: math.jsonl
  field: problem
  template: "Problem: {problem}"
)"),
            "demo.yaml:6: give prompts.field or prompts.template, not both");
  EXPECT_EQ(load_error(kMinimal + "decoding:\n  top_k: 40\n"),
            "demo.yaml:12: decoding.top_k only applies when sampling (decoding.temperature > 0)");
  EXPECT_EQ(load_error(kMinimal, {"prompts.source=inline", "prompts.ids=", "prompts.texts=[hi]"}),
            "--set prompts.source=inline: prompts.source inline needs a tokenizer, and a synthetic model has none "
            "(set model.tokenizer, or use source token_ids)");
}

TEST(RunConfig, SetToUnknownKeyNamesIt) {
  EXPECT_EQ(load_error(kMinimal, {"decoding.max_tokens=5"}),
            "--set decoding.max_tokens=5: unknown key 'decoding.max_tokens' (known: max_new_tokens, stop_at_eos, "
            "temperature, top_p, top_k, seed, batch_prompts, prefill, prefill_chunk, "
            "share_until_onset)");
  EXPECT_EQ(load_error(kMinimal, {"decodng.max_new_tokens=5"}),
            "--set decodng.max_new_tokens=5: unknown key 'decodng' (known: model, prompts, decoding, quantizers, "
            "lanes, metrics, analysis, output)");
  EXPECT_EQ(load_error(kMinimal, {"max_new_tokens"}),
            "--set max_new_tokens: expected KEY=VALUE, e.g. decoding.max_new_tokens=64");
  EXPECT_EQ(load_error(kMinimal, {"decoding..seed=1"}),
            "--set decoding..seed=1: 'decoding..seed' is not a dotted key such as decoding.max_new_tokens");
  EXPECT_EQ(load_error(kMinimal, {"model.path.name=x"}),
            "--set model.path.name=x: model.path holds a single value, not a mapping with key 'name'");
}

TEST(RunConfig, SetWithWrongTypeNamesTheArgument) {
  EXPECT_EQ(load_error(kMinimal, {"decoding.max_new_tokens=many"}),
            "--set decoding.max_new_tokens=many: decoding.max_new_tokens: expected an integer, got 'many'");
  // Seeds are unsigned 64-bit: 2^64 - 1 is one; 2^64 and -1 are refused naming the range.
  EXPECT_EQ(load_run_config(write_config(test::scratch_dir(), kMinimal), {"decoding.seed=18446744073709551615"})
                .decoding.seed,
            uint64_t{18446744073709551615u});
  EXPECT_EQ(load_error(kMinimal, {"decoding.seed=18446744073709551616"}),
            "--set decoding.seed=18446744073709551616: decoding.seed must be an integer from 0 to 18446744073709551615, "
            "got 18446744073709551616");
  EXPECT_EQ(load_error(kMinimal, {"decoding.seed=-1"}),
            "--set decoding.seed=-1: decoding.seed: expected a non-negative integer, got '-1'");
  EXPECT_EQ(load_error(kMinimal, {"decoding.max_new_tokens=99999999999999999999"}),
            "--set decoding.max_new_tokens=99999999999999999999: decoding.max_new_tokens must be an integer from "
            "-9223372036854775808 to 9223372036854775807, got 99999999999999999999");
  EXPECT_EQ(load_error(kMinimal, {"decoding.temperature=0.5", "decoding.top_p=2"}),
            "--set decoding.top_p=2: decoding.top_p must be in (0, 1]");
  EXPECT_EQ(load_error(kMinimal, {"lanes=[static"}).rfind("--set lanes=[static: the value is not valid YAML: ", 0), 0u);
}

TEST(RunConfig, SetOnQuantizerEntries) {
  const std::string two_quantizers = R"(model: {path: synthetic:tiny}
prompts: {source: token_ids, ids: [[1]]}
quantizers:
  - name: kivi-2bit
    method: kivi
  - name: kvarn-k2v2
    method: kvarn
    params: {preset: k2v2}
output: {path: out.h5}
)";
  const RunConfig config = load(two_quantizers, {"quantizers.1.params.iters=0", "quantizers.0.params.k_bits=4"});
  EXPECT_EQ(config.quantizers[1].params, (std::map<std::string, std::string>{{"preset", "k2v2"}, {"iters", "0"}}));
  EXPECT_EQ(config.quantizers[0].params, (std::map<std::string, std::string>{{"k_bits", "4"}}));

  EXPECT_EQ(load_error(two_quantizers, {"quantizers.2.method=rtn"}),
            "--set quantizers.2.method=rtn: quantizers has 2 entries, so '2' names none (entries are numbered from 0)");
  EXPECT_EQ(load_error(two_quantizers, {"quantizers.kivi-2bit.method=rtn"}),
            "--set quantizers.kivi-2bit.method=rtn: quantizers has 2 entries, so 'kivi-2bit' names none (entries are "
            "numbered from 0)");
  EXPECT_EQ(load_error(two_quantizers, {"quantizers.0.params.k_bits=[2, 4]"}),
            "--set quantizers.0.params.k_bits=[2, 4]: quantizers[0].params.k_bits: expected a string, got a list");
  EXPECT_EQ(load_error(two_quantizers, {"quantizers.0.methd=rtn"}),
            "--set quantizers.0.methd=rtn: unknown key 'quantizers[0].methd' (known: name, method, params)");
}

TEST(RunConfig, YamlSyntaxErrorNamesLine) {
  const std::string message = load_error(kMinimal + "decoding:\n  max_new_tokens: [8\n  top_k: 3\n");
  EXPECT_EQ(message.rfind("demo.yaml:13: YAML syntax error: ", 0), 0u) << message;
  EXPECT_EQ(load_error(kMinimal + "---\nmodel: {path: x}\n"),
            "demo.yaml:12: a config is one YAML document, but a second one starts here");
  EXPECT_EQ(load_error("- model\n- prompts\n"),
            "demo.yaml: the config must be a mapping of sections (model, prompts, decoding, quantizers, lanes, "
            "metrics, analysis, output)");
}

TEST(RunConfig, KeyGivenTwice) {
  EXPECT_EQ(load_error(kMinimal + "output:\n  flush_seconds: 1\n"),
            "demo.yaml:11: key 'output' is given twice (first on line 9)");
}

TEST(RunConfig, MissingConfigFile) {
  const std::string path = test::scratch_dir() + "/absent.yaml";
  EXPECT_EQ(test::error_message([&] { load_run_config(path, {}); }), "config file not found: " + path);
  for (const std::string& not_a_file : {std::string("/dev/zero"), test::scratch_dir()})
    EXPECT_EQ(test::error_message([&] { load_run_config(not_a_file, {}); }),
              "config " + not_a_file + " is not a regular file (a device, a FIFO or a folder)");
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

const std::string kChat = R"(model: {path: m.bin}
quantizers: [{name: none, method: none}]
output: {path: out.h5}
prompts:
  source: inline
  texts: [hello]
  chat_template: true
)";

TEST(RunConfig, ChatTemplateSettings) {
  const RunConfig chat = load(kChat);
  EXPECT_TRUE(chat.prompts.chat_template);
  EXPECT_FALSE(chat.prompts.add_bos);  // the template writes the model's own special tokens
  EXPECT_FALSE(chat.prompts.system_prompt.has_value());
  const RunConfig system = load(kChat + "  system_prompt: Be brief.\n");
  EXPECT_EQ(system.prompts.system_prompt, std::optional<std::string>("Be brief."));
  // The resolved YAML reloads to the same settings (resume compares them).
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/resolved.yaml", system.resolved_yaml());
  EXPECT_TRUE(load_run_config(dir + "/resolved.yaml", {}) == system);
  EXPECT_FALSE(load(kChat) == system);

  EXPECT_EQ(load_error(kChat + "  add_bos: true\n"),
            "demo.yaml:8: prompts.add_bos: true cannot be used with prompts.chat_template: true (the template writes "
            "the model's own special tokens)");
  EXPECT_EQ(load_error(kChat, {"prompts.chat_template=false", "prompts.system_prompt=hi"}),
            "--set prompts.system_prompt=hi: prompts.system_prompt needs prompts.chat_template: true");
  EXPECT_EQ(load_error(kMinimal, {"prompts.chat_template=true"}),
            "--set prompts.chat_template=true: prompts.chat_template is only valid with source inline, text_file or "
            "jsonl");
}

}  // namespace
}  // namespace kvdrift
