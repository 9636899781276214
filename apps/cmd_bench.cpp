#include <spdlog/spdlog.h>

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "decode/bench_decode.h"
#include "decode/engine.h"
#include "run/run_inputs.h"
#include "decode/generate.h"
#include "decode/sampler.h"
#include "io/prompts.h"
#include "io/run_config.h"
#include "model/checkpoint.h"
#include "model/linear.h"
#include "quant/bench_quant.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift::cli {

namespace {

struct BenchDecodeOptions {
  std::string model = "synthetic:tiny";
  std::vector<int64_t> batches = {1};
  int64_t context = 512;
  int64_t steps = 32;
  int64_t warmup = 4;
  std::string device = "cpu";
  std::string dtype = "float32";
  double peak_gbps = 0;  // 0: measure
};

void run_bench_decode(const BenchDecodeOptions& options) {
  if (!std::isfinite(options.peak_gbps) || options.peak_gbps < 0)
    fail("--peak-gbps {} must be a positive bandwidth in GB/s (leave it out to measure it)", options.peak_gbps);
  const auto device = parse_device(options.device);
  const auto dtype = parse_dtype(options.dtype);
  auto model = load_model(options.model, device, dtype);
  const double peak = options.peak_gbps > 0 ? options.peak_gbps : measure_copy_bandwidth(device);
  std::cout << fmt::format("reference decode: {} ({} parameters, {:.1f} MB of weights) on {}, {}\n", options.model,
                           parameter_count(model.config()), model.weight_bytes() / 1e6, describe_device(device),
                           dtype_name(dtype));
  std::cout << fmt::format("roofline peak: {:.1f} GB/s ({})\n", peak,
                           options.peak_gbps > 0 ? "given by --peak-gbps" : "measured device copy bandwidth");
  std::cout << fmt::format("{:>6} {:>8} {:>6} {:>10} {:>10} {:>12} {:>10} {:>9}\n", "batch", "context", "steps",
                           "ms/step", "tokens/s", "MB/step", "GB/s", "roofline");
  for (int64_t batch : options.batches) {
    const auto row = bench_decode(model, batch, options.context, options.steps, options.warmup);
    std::cout << fmt::format("{:>6} {:>8} {:>6} {:>10.3f} {:>10.1f} {:>12.2f} {:>10.2f} {:>8.1f}%\n", row.batch,
                             row.context, row.steps, row.ms_per_step, row.tokens_per_s, row.bytes_per_step / 1e6,
                             row.achieved_gbps, 100.0 * row.achieved_gbps / peak);
  }
}

struct BenchQuantOptions {
  int64_t heads = 8;
  int64_t tokens = 4096;
  std::vector<int64_t> head_dims = {64, 128};
  std::string device = "cpu";
  double min_seconds = 0.2;
};

void run_bench_quant(const BenchQuantOptions& options) {
  // The cases include 128-token KVarN tiles; sizes of 0 would divide by zero deep inside.
  if (options.heads < 1) fail("--heads {} must be at least 1", options.heads);
  if (options.tokens < 128 || options.tokens % 128 != 0)
    fail("--tokens {} must be a positive multiple of 128 (the largest tile of the benchmarked methods)",
         options.tokens);
  for (int64_t head_dim : options.head_dims)
    if (head_dim < 1 || head_dim > 4096) fail("--head-dims {}: a head dim must be in [1, 4096]", head_dim);
  if (!std::isfinite(options.min_seconds) || options.min_seconds <= 0 || options.min_seconds > 600)
    fail("--min-seconds {} must be a number of seconds in (0, 600]", options.min_seconds);
  const auto device = parse_device(options.device);
  std::cout << fmt::format("quantize + dequantize of K and V tile sets [{}, {}, head_dim] on {}\n", options.heads,
                           options.tokens, describe_device(device));
  std::cout << fmt::format("{:<22} {:>8} {:>12} {:>14} {:>12} {:>10} {:>12}\n", "method", "head_dim", "quant ms",
                           "dequant ms", "Melem/s", "bits/elem", "cost vs rtn");
  for (int64_t head_dim : options.head_dims) {
    std::map<std::string, double> rtn_ms;  // bits -> rtn's quantize + dequantize time, the baseline
    for (const auto& bench_case : default_quant_bench_cases()) {
      const auto row =
          bench_quantizer(bench_case, options.heads, options.tokens, head_dim, device, options.min_seconds);
      const double total_ms = row.quantize_ms + row.dequantize_ms;
      if (bench_case.method == "rtn") rtn_ms[bench_case.bits] = total_ms;
      std::cout << fmt::format("{:<22} {:>8} {:>12.3f} {:>14.3f} {:>12.1f} {:>10.3f} {:>11.2f}x\n", bench_case.label,
                               head_dim, row.quantize_ms, row.dequantize_ms, row.melements_per_s, row.bits_per_element,
                               total_ms / rtn_ms.at(bench_case.bits));
    }
  }
  if (!device.is_cpu()) return;
  // The transform every per-token Hadamard method runs per layer, role and step: one decode step of one
  // sequence (a vector per head), and the tile set above.
  std::cout << fmt::format("\n{:<34} {:>8} {:>16} {:>13} {:>9}\n", "walsh-hadamard transform [rows, d]", "head_dim",
                           "torch passes ms", "cpu kernel ms", "speed-up");
  for (int64_t head_dim : options.head_dims) {
    if (head_dim < 2 || (head_dim & (head_dim - 1)) != 0) continue;  // powers of two only
    for (int64_t rows : {options.heads, options.heads * options.tokens}) {
      const auto row = bench_walsh_hadamard(rows, head_dim, options.min_seconds);
      std::cout << fmt::format("{:<34} {:>8} {:>16.4f} {:>13.4f} {:>8.1f}x\n", fmt::format("rows {}", rows), head_dim,
                               row.reference_ms, row.kernel_ms, row.reference_ms / row.kernel_ms);
    }
  }
}

struct BenchRunOptions {
  std::string config;
  std::vector<std::string> overrides;
};

// The decode forwards of a batch: the most any of its lanes took.
int64_t decode_forwards(const std::vector<SampleResult>& results) {
  int64_t forwards = 1;
  for (const auto& sample : results) {
    forwards = std::max(forwards, static_cast<int64_t>(sample.reference_tokens.size()) - 1);
    for (const auto& lane : sample.lanes) forwards = std::max(forwards, static_cast<int64_t>(lane.tokens.size()) - 1);
  }
  return forwards;
}

// How far two runs of the same prompts are apart: whether every token is the same, and over the metric
// arrays how many differ in any bit and which differs most relative to its own largest magnitude. An
// array whose values all lie below 1e-6 (the `none` quantizer's error energies: rounding residue of
// zero, where any difference is relatively large) counts as differing but is not ranked.
struct RunDifference {
  bool same_tokens = true;
  int64_t arrays = 0, differing = 0;
  double max_relative = 0;  // max |a - b| / max |a| of the array where that is largest
  std::string worst_array;  // "QUANTIZER LANE/ARRAY"
};
RunDifference compare_runs(const std::vector<SampleResult>& a, const std::vector<SampleResult>& b) {
  RunDifference difference;
  for (size_t p = 0; p < a.size(); ++p) {
    difference.same_tokens = difference.same_tokens && a[p].reference_tokens == b[p].reference_tokens;
    for (size_t l = 0; l < a[p].lanes.size(); ++l) {
      const LaneResult &x = a[p].lanes[l], &y = b[p].lanes[l];
      difference.same_tokens = difference.same_tokens && x.tokens == y.tokens;
      for (const auto& [name, array] : x.arrays) {
        const auto& other = y.arrays.at(name).values;
        ++difference.arrays;
        bool differs = array.values.size() != other.size();
        double largest = 0, apart = 0;
        for (size_t i = 0; i < std::min(other.size(), array.values.size()); ++i) {
          const float u = array.values[i], v = other[i];
          if (std::isnan(u) && std::isnan(v)) continue;
          differs = differs || u != v;
          largest = std::max(largest, std::abs(static_cast<double>(u)));
          apart = std::max(apart, std::abs(static_cast<double>(u) - v));
        }
        difference.differing += differs ? 1 : 0;
        const double relative = largest >= 1e-6 ? apart / largest : 0;
        if (relative > difference.max_relative) {
          difference.max_relative = relative;
          difference.worst_array = fmt::format("{} {}/{}", x.quantizer, lane_name(x.lane), name);
        }
      }
    }
  }
  return difference;
}

// The side-by-side step of `prompts` in one batch with plain and with packed weight GEMMs, in the
// order plain, packed, packed, plain after a warm-up of each, so that a machine speeding up or
// slowing down during the measurement favours neither.
struct PathTimes {
  double plain_ms = 0, packed_ms = 0;
  int64_t forwards = 1;  // decode forwards of the packed warm-up run
  double rows = 0;       // its mean batch rows per decode forward
  double metric_ms = 0;
  RunDifference difference;  // packed against plain
};
PathTimes time_both_paths(LlamaModel& model, const Engine& engine, const std::vector<Prompt>& prompts) {
  std::map<GemmPath, std::vector<SampleResult>> first;
  std::map<GemmPath, double> ms;
  for (GemmPath path : {GemmPath::Plain, GemmPath::Packed, GemmPath::Plain, GemmPath::Packed, GemmPath::Packed,
                        GemmPath::Plain}) {
    model.set_gemm_path(path);
    auto results = engine.run(prompts);
    if (!first.count(path)) {
      first[path] = std::move(results);  // the warm-up: its results, not its time
      continue;
    }
    ms[path] += 500.0 * results.front().decode_seconds / static_cast<double>(decode_forwards(results));
  }
  PathTimes times;
  times.plain_ms = ms[GemmPath::Plain];
  times.packed_ms = ms[GemmPath::Packed];
  const auto& packed = first[GemmPath::Packed];
  times.forwards = decode_forwards(packed);
  int64_t row_steps = 0;
  for (const auto& sample : packed) row_steps += sample.decode_row_steps;
  times.rows = static_cast<double>(row_steps) / static_cast<double>(times.forwards);
  times.metric_ms = 1000.0 * packed.front().metric_seconds / static_cast<double>(times.forwards);
  times.difference = compare_runs(first[GemmPath::Plain], packed);
  return times;
}

// Side-by-side cost, measured in one process on the config's first prompt: reference-only decoding
// (batch 1, full-precision cache) against the engine's full step (all lanes, metrics included), with
// plain and with pre-packed weight GEMMs; with decoding.batch_prompts > 1, also that many prompts in
// one batch; and the weight GEMMs alone at the batch's rows, the arithmetic a step cannot avoid.
void run_bench_run(const BenchRunOptions& options) {
  const RunConfig config = load_run_config(options.config, options.overrides);
  const auto inputs = load_run_inputs(config);
  LlamaModel& model = *inputs.model;
  const Engine engine(model, config, inputs.tokenizer.get());
  const auto& prompt = inputs.prompts.front();
  std::vector<Prompt> batch_prompts;  // the config's prompts, repeated when it has fewer
  for (int64_t i = 0; i < config.decoding.batch_prompts; ++i)
    batch_prompts.push_back(inputs.prompts[i % inputs.prompts.size()]);
  const PathTimes one = time_both_paths(model, engine, {prompt});
  const PathTimes batch = batch_prompts.size() > 1 ? time_both_paths(model, engine, batch_prompts) : one;
  // Reference-only decoding of the one-prompt run's length from the same context, timed the same way.
  const double reference_ms =
      bench_decode(model, 1, static_cast<int64_t>(prompt.tokens.size()), one.forwards, 2).ms_per_step;
  const bool packable = packed_gemm_available(model.linears().front()->weight());
  const int64_t gemm_rows = std::max<int64_t>(std::llround(batch.rows), 1);  // 0 when every lane ended at once
  const GemmBenchRow gemm = bench_weight_gemms(model, gemm_rows, packable ? GemmPath::Packed : GemmPath::Plain, 5);
  std::cout << fmt::format(
      "side-by-side cost: {} on {} in {}, prompt of {} tokens, {} steps, {} quantizers, lanes {}\n", config.model.path,
      describe_device(model.device()), dtype_name(model.dtype()), prompt.tokens.size(),
      config.decoding.max_new_tokens, config.quantizers.size(), fmt::join(lane_names(config.lanes), ","));
  if (!packable) std::cout << "(no pre-packed GEMM for this device and dtype: both columns are the plain path)\n";
  std::cout << fmt::format("{:<44} {:>11} {:>12} {:>9}\n", "ms per decode step", "plain GEMM", "packed GEMM",
                           "speed-up");
  std::cout << fmt::format("{:<44} {:>11.3f}\n", "reference only (batch 1)", reference_ms);
  const auto row = [](const std::string& label, const PathTimes& t) {
    std::cout << fmt::format("{:<44} {:>11.3f} {:>12.3f} {:>8.2f}x\n", label, t.plain_ms, t.packed_ms,
                             t.plain_ms / t.packed_ms);
  };
  row(fmt::format("side by side, 1 prompt ({:.1f} rows)", one.rows), one);
  std::cout << fmt::format("{:<44} {:>11.2f}x {:>11.2f}x\n", "  cost relative to reference only",
                           one.plain_ms / reference_ms, one.packed_ms / reference_ms);
  if (batch_prompts.size() > 1) {
    row(fmt::format("side by side, {} prompts ({:.1f} rows)", batch_prompts.size(), batch.rows), batch);
    const double prompts = static_cast<double>(batch_prompts.size());
    std::cout << fmt::format("{:<44} {:>11.2f}x {:>11.2f}x\n", "  speed-up vs one prompt at a time",
                             one.plain_ms * prompts / batch.plain_ms, one.packed_ms * prompts / batch.packed_ms);
  }
  std::cout << fmt::format("{:<44} {:>11.3f}\n", "metrics after decoding (packed)", batch.metric_ms);
  std::cout << fmt::format("weight GEMMs alone at {} rows ({}): {:.3f} ms, {:.1f} GFLOP/s = {:.0f}% of the {}-prompt "
                           "packed step\n", gemm.rows, packable ? "pre-packed" : "plain", gemm.ms, gemm.gflops,
                           100.0 * gemm.ms / batch.packed_ms, batch_prompts.size() > 1 ? batch_prompts.size() : 1);
  for (const auto* t : {&one, &batch}) {
    std::cout << fmt::format("packed vs plain run ({} prompt(s)): tokens {}, metric arrays bit-identical {} of {}",
                             t == &one ? 1 : batch_prompts.size(), t->difference.same_tokens ? "the same" : "DIFFER",
                             t->difference.arrays - t->difference.differing, t->difference.arrays);
    std::cout << (t->difference.differing ? fmt::format(" (largest difference {:.3g} of the array's largest value, "
                                                        "{})\n", t->difference.max_relative, t->difference.worst_array)
                                          : "\n");
    if (batch_prompts.size() < 2) break;
  }
}

struct BenchTransformersOptions {
  std::string model;
  std::string prompt = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                       "How many clips did Natalia sell altogether in April and May?";
  int64_t steps = 256;
  int64_t repeats = 3;
};

// The command's output, parsed: one JSON line from scripts/bench_transformers.py.
nlohmann::json run_transformers_side(const BenchTransformersOptions& options, const std::vector<int64_t>& prompt) {
  const std::string python = project_python();
  std::string ids;
  for (int64_t id : prompt) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const std::string command = fmt::format("'{}' '{}/bench_transformers.py' --model '{}' --ids {} --steps {} --repeats {} "
                                          "--threads {}",
                                          python, KVDRIFT_SCRIPTS_DIR, options.model, ids, options.steps,
                                          options.repeats, at::get_num_threads());
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) fail("cannot start {}", python);
  std::string output;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = ::pclose(pipe);
  if (status != 0) fail("the transformers side failed (exit status {}): {}", status, command);
  const auto result = nlohmann::json::parse(output, nullptr, /*allow_exceptions=*/false);
  if (result.is_discarded()) fail("the transformers side printed no JSON: {}", output);
  return result;
}

void run_bench_transformers(const BenchTransformersOptions& options) {
  if (options.steps < 1 || options.repeats < 1) fail("--steps and --repeats must be at least 1");
  const torch::Device cpu(torch::kCPU);
  auto tokenizer = tokenizer_for_model("", options.model);
  if (!tokenizer) fail("{} has no tokenizer.json (a Hugging Face model directory is needed)", options.model);
  const auto prompt = tokenizer->encode(
      chat_template_for_model("", options.model).render(options.prompt, std::nullopt), /*add_bos=*/false);
  const auto model = load_model(options.model, cpu, torch::kFloat32);
  SamplingConfig greedy;
  std::vector<double> kvdrift_seconds;
  GenerateResult result;
  {
    Sampler sampler(greedy);
    generate(model, prompt, 8, sampler, {});  // warm-up, as on the transformers side
  }
  for (int64_t r = 0; r < options.repeats; ++r) {
    Sampler sampler(greedy);
    const auto start = std::chrono::steady_clock::now();
    result = generate(model, prompt, options.steps, sampler, /*stop_ids=*/{});  // all steps, like min_new_tokens
    kvdrift_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const auto theirs = run_transformers_side(options, prompt);
  const auto their_seconds = theirs.at("seconds").get<std::vector<double>>();
  const std::vector<int64_t> ours(result.tokens.end() - result.generated, result.tokens.end());
  const double best_ours = *std::min_element(kvdrift_seconds.begin(), kvdrift_seconds.end());
  const double best_theirs = *std::min_element(their_seconds.begin(), their_seconds.end());
  const auto steps = static_cast<double>(options.steps);
  std::cout << fmt::format("greedy generate, {}, batch 1, float32 on {}, {}-token prompt + {} new tokens, best of {}\n",
                           options.model, describe_device(cpu), prompt.size(), options.steps, options.repeats);
  std::cout << fmt::format("{:<34} {:>10} {:>10}\n", "", "seconds", "tokens/s");
  std::cout << fmt::format("{:<34} {:>10.3f} {:>10.1f}\n", fmt::format("kvdrift (LibTorch {})", TORCH_VERSION),
                           best_ours, steps / best_ours);
  std::cout << fmt::format("{:<34} {:>10.3f} {:>10.1f}\n",
                           fmt::format("transformers {} eager", theirs.at("transformers").get<std::string>()),
                           best_theirs, steps / best_theirs);
  std::cout << fmt::format("{:<34} {:>9.2f}x\n", "kvdrift speed / transformers speed", best_theirs / best_ours);
  std::cout << fmt::format("same tokens: {}\n", theirs.at("ids").get<std::vector<int64_t>>() == ours ? "yes" : "no");
}

}  // namespace

void register_bench(CLI::App& app, std::function<void()>& command) {
  auto* bench = app.add_subcommand("bench", "benchmarks that print one table");
  bench->require_subcommand(1);
  auto options = std::make_shared<BenchDecodeOptions>();
  auto* decode = bench->add_subcommand("decode", "reference decode speed and memory-bandwidth roofline fraction");
  decode->add_option("--model", options->model, "llama2.c .bin, HF directory, or synthetic:NAME")
      ->capture_default_str();
  decode->add_option("--batch", options->batches, "batch sizes (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  decode->add_option("--context", options->context, "positions in the cache before timing")->capture_default_str();
  decode->add_option("--steps", options->steps, "timed decode steps")->capture_default_str();
  decode->add_option("--warmup", options->warmup, "untimed decode steps first")->capture_default_str();
  decode->add_option("--device", options->device, "cpu, cuda or cuda:N")->capture_default_str();
  decode->add_option("--dtype", options->dtype, "float32, float16 or bfloat16")->capture_default_str();
  decode->add_option("--peak-gbps", options->peak_gbps, "memory bandwidth peak (default: measured copy bandwidth)");
  decode->callback([options, &command] { command = [options] { run_bench_decode(*options); }; });

  auto quant_options = std::make_shared<BenchQuantOptions>();
  auto* quant = bench->add_subcommand("quant", "quantize/dequantize throughput per method and bit width");
  quant->add_option("--heads", quant_options->heads, "tiles' kv heads")->capture_default_str();
  quant->add_option("--tokens", quant_options->tokens, "tokens per head")->capture_default_str();
  quant->add_option("--head-dims", quant_options->head_dims, "head dims (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  quant->add_option("--device", quant_options->device, "cpu, cuda or cuda:N")->capture_default_str();
  quant->add_option("--min-seconds", quant_options->min_seconds, "minimum timed duration per measurement")
      ->capture_default_str();
  quant->callback([quant_options, &command] { command = [quant_options] { run_bench_quant(*quant_options); }; });

  auto run_options = std::make_shared<BenchRunOptions>();
  auto* run = bench->add_subcommand("run", "side-by-side cost relative to reference-only decoding");
  run->add_option("config", run_options->config, "YAML run config")->required();
  run->add_option("--set", run_options->overrides, "override a config key: a.b=value (repeatable)");
  run->callback([run_options, &command] { command = [run_options] { run_bench_run(*run_options); }; });

  auto hf_options = std::make_shared<BenchTransformersOptions>();
  auto* hf = bench->add_subcommand(
      "transformers", "reference decode tokens/s of kvdrift vs transformers' eager generate, side by side (CPU)");
  hf->add_option("--model", hf_options->model, "Hugging Face model directory (with tokenizer and chat template)")
      ->required();
  hf->add_option("--prompt", hf_options->prompt, "user turn, wrapped in the chat template")->capture_default_str();
  hf->add_option("--steps", hf_options->steps, "new tokens per generation (end tokens do not stop it)")
      ->capture_default_str();
  hf->add_option("--repeats", hf_options->repeats, "timed generations per side; the best counts")
      ->capture_default_str();
  hf->callback([hf_options, &command] { command = [hf_options] { run_bench_transformers(*hf_options); }; });
}

}  // namespace kvdrift::cli
