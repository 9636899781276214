#pragma once
// Quantize/dequantize throughput of each method on a [heads, tokens, head_dim] tile set, both roles.
#include <string>
#include <vector>

#include <torch/types.h>

#include "quant/quantizer.h"

namespace kvdrift {

struct QuantBenchCase {
  std::string label;   // e.g. "kivi 2-bit"
  std::string method;
  ParamMap params;
  std::string bits;    // "k2v2": the rtn case with the same bits is its baseline
};

struct QuantBenchRow {
  QuantBenchCase bench_case;
  int64_t head_dim;
  double quantize_ms;    // keys + values of the whole tile set
  double dequantize_ms;
  double melements_per_s;  // (quantize + dequantize) throughput over K and V elements
  double bits_per_element;
};

// The cases `kvdrift bench quant` runs by default: rtn, kivi, quarot and kvarn at k2v2, k4v4, k4v2.
std::vector<QuantBenchCase> default_quant_bench_cases();

QuantBenchRow bench_quantizer(const QuantBenchCase& bench_case, int64_t heads, int64_t tokens, int64_t head_dim,
                              torch::Device device, double min_seconds);

// The Walsh-Hadamard transform of a [rows, head_dim] float32 CPU tensor, ms per call: the reference's
// torch operations and the CPU kernel beside it, timed in the same process.
struct HadamardBenchRow {
  int64_t rows, head_dim;
  double reference_ms, kernel_ms;
};
HadamardBenchRow bench_walsh_hadamard(int64_t rows, int64_t head_dim, double min_seconds);

}  // namespace kvdrift
