#pragma once
// The causal wrappers of src/quant/wrappers.cpp: any method's quantizer with its token norms
// (true_scale) or its token directions (true_direction) restored after dequantization, with its
// error energy moved entirely into magnitude (equal_error_scale) or direction (equal_error_direction),
// or with the worst rows of each quantized block repaired (repair_worst). Configs ask for one with the
// parameter `wrap` on any method (make_quantizer handles it).
#include <memory>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace kvdrift {

const std::vector<std::string>& wrapper_names();  // true_scale, true_direction, equal_error_*, repair_worst
// The wrapper's own parameters (repair_worst: fraction, repair, rank_by), which make_quantizer takes out
// of a method's parameters before the method reads them.
const std::vector<std::string>& wrapper_parameter_names();
// Throws Error naming `wrapper` when it is not one of wrapper_names(), and for wrapper parameters that
// are out of range or that the wrapper does not take.
std::unique_ptr<Quantizer> wrap_quantizer(std::unique_ptr<Quantizer> inner, const std::string& wrapper,
                                          const ParamMap& wrapper_params = {});

}  // namespace kvdrift
