#include "decode/bench_decode.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>

#include "core/device.h"
#include "core/error.h"

namespace kvdrift {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

DecodeBenchRow bench_decode(const LlamaModel& model, int64_t batch, int64_t context, int64_t steps, int64_t warmup) {
  if (batch < 1 || context < 1 || steps < 1 || warmup < 0)
    fail("bench decode: batch ({}), context ({}) and steps ({}) must be >= 1, warmup ({}) >= 0", batch, context, steps,
         warmup);
  const ModelConfig& c = model.config();
  auto cache = model.make_cache(batch, context + warmup + steps);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  auto prompt = torch::randint(c.vocab_size, {batch, context}, generator, torch::kInt64).to(model.device());
  auto logits = model.forward(prompt, 0, cache, /*last_only=*/true);
  int64_t position = context;
  auto decode = [&](int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      auto next = logits.argmax(-1);  // [batch, 1], stays on the device
      logits = model.forward(next, position++, cache, /*last_only=*/true);
    }
  };
  decode(warmup);
  synchronize(model.device());
  const auto start = std::chrono::steady_clock::now();
  decode(steps);
  synchronize(model.device());
  const double elapsed = seconds_since(start);

  const double kv_bytes_per_position =
      2.0 * c.n_layers * c.n_kv_heads * c.head_dim * c10::elementSize(model.dtype()) * batch;
  const double mean_positions = context + warmup + (steps + 1) / 2.0;
  DecodeBenchRow row;
  row.batch = batch;
  row.context = context;
  row.steps = steps;
  row.ms_per_step = 1000.0 * elapsed / steps;
  row.tokens_per_s = batch * steps / elapsed;
  row.bytes_per_step = model.weight_bytes() + kv_bytes_per_position * mean_positions;
  row.achieved_gbps = row.bytes_per_step / (elapsed / steps) / 1e9;
  return row;
}

GemmBenchRow bench_weight_gemms(const LlamaModel& model, int64_t rows, GemmPath path, int repeats) {
  if (rows < 1 || repeats < 1) fail("bench: GEMM rows ({}) and repeats ({}) must be >= 1", rows, repeats);
  const bool packed = path == GemmPath::Packed && packed_gemm_available(model.linears().front()->weight());
  std::vector<double> best;  // per matrix, over the passes
  double flops = 0;
  for (const Linear* weights : model.linears()) {
    Linear linear(weights->weight(), weights->bias());
    if (packed) linear.pack(rows);
    const auto x = torch::randn({rows, linear.weight().size(1)}, linear.weight().options());
    linear(x);  // warm-up
    double fastest = 1e30;
    for (int r = 0; r < repeats; ++r) {
      synchronize(model.device());
      const auto start = std::chrono::steady_clock::now();
      linear(x);
      synchronize(model.device());
      fastest = std::min(fastest, seconds_since(start));
    }
    best.push_back(fastest);
    flops += 2.0 * static_cast<double>(rows) * static_cast<double>(linear.weight().numel());
  }
  double seconds = 0;
  for (double b : best) seconds += b;
  return {rows, 1000.0 * seconds, flops / seconds / 1e9};
}

double measure_copy_bandwidth(const torch::Device& device) {
  const int64_t elements = device.is_cuda() ? (int64_t{1} << 28) : (int64_t{1} << 25);  // 1 GiB / 128 MiB of fp32
  auto source = torch::ones({elements}, torch::TensorOptions().device(device));
  auto target = torch::empty_like(source);
  target.copy_(source);  // warm-up
  synchronize(device);
  const int repeats = 10;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i) target.copy_(source);
  synchronize(device);
  return 2.0 * elements * 4 * repeats / seconds_since(start) / 1e9;
}

}  // namespace kvdrift
