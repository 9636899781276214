#pragma once
// What a quantizer's cache stores per element at a given sequence length (SPEC §2's accounting):
// quantized positions at the cost of their codes and parameters, the positions its policy keeps in
// full precision (sink, residual, window) at 16 bits. The same arithmetic as the cache's own
// accounting, from the policy alone, so methods can be matched at equal bits before a run.
#include <cstdint>

#include "quant/quantizer.h"

namespace kvdrift {

struct StorageCost {
  double codes = 0;           // bits per quantized element: the packed code width
  double parameters = 0;      // bits per quantized element: scales, zero points, token scales
  double quantized_fraction = 0;  // of the positions held, over both roles
  double bits_per_element = 16;   // everything held, over both roles, at `length` positions
};

// After decoding up to `length` positions (the last decode step at position length - 1), keys and
// values averaged. `length` >= 1.
StorageCost storage_cost(const Quantizer& quantizer, int64_t head_dim, int64_t length);

}  // namespace kvdrift
