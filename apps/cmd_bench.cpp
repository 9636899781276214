#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "core/device.h"
#include "decode/bench_decode.h"
#include "model/checkpoint.h"

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

}  // namespace

void register_bench(CLI::App& app, std::function<void()>& command) {
  auto* bench = app.add_subcommand("bench", "benchmarks that print one table");
  bench->require_subcommand(1);
  auto options = std::make_shared<BenchDecodeOptions>();
  auto* decode = bench->add_subcommand("decode", "reference decode speed and memory-bandwidth roofline fraction");
  decode->add_option("--model", options->model, "llama2.c .bin, HF directory, or synthetic:NAME")->capture_default_str();
  decode->add_option("--batch", options->batches, "batch sizes (comma-separated)")->delimiter(',')->capture_default_str();
  decode->add_option("--context", options->context, "positions in the cache before timing")->capture_default_str();
  decode->add_option("--steps", options->steps, "timed decode steps")->capture_default_str();
  decode->add_option("--warmup", options->warmup, "untimed decode steps first")->capture_default_str();
  decode->add_option("--device", options->device, "cpu, cuda or cuda:N")->capture_default_str();
  decode->add_option("--dtype", options->dtype, "float32, float16 or bfloat16")->capture_default_str();
  decode->add_option("--peak-gbps", options->peak_gbps, "memory bandwidth peak (default: measured copy bandwidth)");
  decode->callback([options, &command] { command = [options] { run_bench_decode(*options); }; });
}

}  // namespace kvdrift::cli
