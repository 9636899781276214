#include <spdlog/spdlog.h>

#include <chrono>
#include <iostream>

#include "commands.h"
#include "core/device.h"
#include "decode/bench_decode.h"
#include "decode/engine.h"
#include "io/prompts.h"
#include "io/run_config.h"
#include "model/checkpoint.h"
#include "quant/bench_quant.h"

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
}

struct BenchRunOptions {
  std::string config;
  std::vector<std::string> overrides;
};

// Side-by-side cost, measured in one process on the config's first prompt: reference-only decoding
// (batch 1, full-precision cache) against the engine's full step (all lanes, metrics included); with
// decoding.batch_prompts > 1, also that many prompts in one batch.
void run_bench_run(const BenchRunOptions& options) {
  const RunConfig config = load_run_config(options.config, options.overrides);
  const auto inputs = load_run_inputs(config);
  const LlamaModel& model = *inputs.model;
  const Engine engine(model, config, inputs.tokenizer.get());
  const auto& prompt = inputs.prompts.front();
  const int64_t steps = config.decoding.max_new_tokens;
  engine.run(prompt);  // warm-up
  const auto side_by_side = engine.run(prompt);
  const int64_t forwards = static_cast<int64_t>(side_by_side.reference_tokens.size()) - 1;
  // Reference-only decoding of the same length from the same context, timed the same way.
  const double reference_ms =
      bench_decode(model, 1, static_cast<int64_t>(prompt.tokens.size()), std::max<int64_t>(forwards, 1), 2).ms_per_step;
  const double full_ms = 1000.0 * side_by_side.decode_seconds / static_cast<double>(std::max<int64_t>(forwards, 1));
  std::cout << fmt::format(
      "side-by-side cost: {} on {} in {}, prompt of {} tokens, {} steps, {} quantizers, lanes {}\n", config.model.path,
      describe_device(model.device()), dtype_name(model.dtype()), prompt.tokens.size(), steps, config.quantizers.size(),
      fmt::join(config.lanes, ","));
  std::cout << fmt::format("{:<36} {:>10}\n", "", "ms/step");
  std::cout << fmt::format("{:<36} {:>10.3f}\n", "reference only (batch 1)", reference_ms);
  std::cout << fmt::format("{:<36} {:>10.3f}\n", "side by side (all lanes + metrics)", full_ms);
  std::cout << fmt::format("{:<36} {:>9.2f}x\n", "ratio", full_ms / reference_ms);
  std::cout << fmt::format("{:<36} {:>10.3f}\n", "metrics after decoding (ms/step)",
                           1000.0 * side_by_side.metric_seconds / static_cast<double>(std::max<int64_t>(forwards, 1)));
  // decoding.batch_prompts > 1: the same side-by-side step for that many prompts in one batch (the
  // config's prompts, repeated when it has fewer), per prompt, against one prompt at a time.
  const int64_t batch = config.decoding.batch_prompts;
  if (batch < 2) return;
  std::vector<Prompt> prompts;
  for (int64_t i = 0; i < batch; ++i) prompts.push_back(inputs.prompts[i % inputs.prompts.size()]);
  engine.run(prompts);  // warm-up
  const auto together = engine.run(prompts);
  int64_t batch_forwards = 1;
  for (const auto& sample : together) {
    batch_forwards = std::max(batch_forwards, static_cast<int64_t>(sample.reference_tokens.size()) - 1);
    for (const auto& lane : sample.lanes)
      batch_forwards = std::max(batch_forwards, static_cast<int64_t>(lane.tokens.size()) - 1);
  }
  const double batch_ms = 1000.0 * together.front().decode_seconds / static_cast<double>(batch_forwards);
  std::cout << fmt::format("{:<36} {:>10.3f}\n", fmt::format("side by side, {} prompts in one batch", batch), batch_ms);
  std::cout << fmt::format("{:<36} {:>10.3f}\n", "  per prompt", batch_ms / static_cast<double>(batch));
  std::cout << fmt::format("{:<36} {:>9.2f}x\n", "  speed-up vs one prompt at a time",
                           full_ms / (batch_ms / static_cast<double>(batch)));
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
}

}  // namespace kvdrift::cli
