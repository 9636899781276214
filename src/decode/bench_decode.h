#pragma once
// Reference decode speed: the baseline every side-by-side overhead is measured against.
#include <cstdint>
#include <string>
#include <vector>

#include "model/llama.h"

namespace kvdrift {

struct DecodeBenchRow {
  int64_t batch;
  int64_t context;       // positions in the cache when timing starts
  int64_t steps;         // timed decode steps
  double ms_per_step;
  double tokens_per_s;   // batch * steps / time
  double bytes_per_step; // weights + average KV read per step
  double achieved_gbps;  // bytes_per_step / step time
};

// Prefills `context` random tokens per sequence, runs `warmup` untimed decode steps, then times
// `steps` decode steps with greedy feedback kept on the device (one sync at the end).
DecodeBenchRow bench_decode(const LlamaModel& model, int64_t batch, int64_t context, int64_t steps, int64_t warmup);

// The model's weight GEMMs alone (every Linear of a forward, once each, on random inputs of `rows` rows)
// through the given path, best of `repeats` passes: the arithmetic a decode step of `rows` rows cannot
// do without. Packed packs one matrix at a time (beside the model's own weights, never all at once).
struct GemmBenchRow {
  int64_t rows;
  double ms;      // one pass over every weight matrix
  double gflops;  // 2 * rows * weights / ms
};
GemmBenchRow bench_weight_gemms(const LlamaModel& model, int64_t rows, GemmPath path, int repeats);

// Device-to-device copy bandwidth in GB/s (bytes read + written), the practical roofline peak.
double measure_copy_bandwidth(const torch::Device& device);

}  // namespace kvdrift
