#pragma once
// `kvdrift quantize`: one tensor [heads, tokens, head_dim] through one quantizer, with everything it
// stored and the per-row token-scale error, for inspection.
#include <string>

#include <torch/types.h>

#include "quant/quantizer.h"

namespace kvdrift {

enum class InspectPolicy {
  Tiles,  // every token quantized, in complete tiles of the method's block (no sink, no tail)
  Cache,  // the method's sink/tail/residual policy, as a cache holds it after a prefill of `tokens`
};

struct Inspection {
  torch::Tensor dequantized;   // [heads, tokens, head_dim] float32, model frame; full precision where kept
  QuantizedTiles stored;       // the quantized region's tiles, ordered head-major
  int64_t first_quantized = 0; // quantized positions are [first_quantized, end_quantized) of every head
  int64_t end_quantized = 0;
  double bits_per_element = 0;            // whole tensor, full-precision positions at 16 bits
  double quantized_bits_per_element = 0;  // the quantized region alone
};

// Throws Error when the shape does not fit the method (a token count that is not a multiple of
// its block under InspectPolicy::Tiles).
Inspection inspect_quantizer(const Quantizer& quantizer, const torch::Tensor& x, Role role, InspectPolicy policy);

}  // namespace kvdrift
