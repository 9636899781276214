#pragma once
// The causal wrappers of src/quant/wrappers.cpp: any method's quantizer with its token norms
// (true_scale) or its token directions (true_direction) restored after dequantization, or with its
// error energy moved entirely into magnitude (equal_error_scale) or direction (equal_error_direction). Configs ask
// for one with the parameter `wrap` on any method (make_quantizer handles it).
#include <memory>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace kvdrift {

const std::vector<std::string>& wrapper_names();  // true_scale, true_direction, equal_error_*
// Throws Error naming `wrapper` when it is not one of wrapper_names().
std::unique_ptr<Quantizer> wrap_quantizer(std::unique_ptr<Quantizer> inner, const std::string& wrapper);

}  // namespace kvdrift
