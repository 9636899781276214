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

// Device-to-device copy bandwidth in GB/s (bytes read + written), the practical roofline peak.
double measure_copy_bandwidth(const torch::Device& device);

}  // namespace kvdrift
