#include "quant/inspect.h"

#include "core/error.h"

namespace kvdrift {

Inspection inspect_quantizer(const Quantizer& quantizer, const torch::Tensor& x, Role role, InspectPolicy policy) {
  const int64_t heads = x.size(0), tokens = x.size(1), head_dim = x.size(2);
  const RolePolicy rule = quantizer.policy(role);
  Inspection result;
  if (policy == InspectPolicy::Tiles) {
    if (tokens % rule.block != 0)
      fail("quantizer '{}': {} tokens are not a multiple of its {} block of {} tokens", quantizer.method(), tokens,
           role_name(role), rule.block);
    result.first_quantized = 0;
    result.end_quantized = tokens;
  } else {
    // The state at the first decode step after a prefill of `tokens`, without that step's own token.
    result.first_quantized = std::min(rule.sink, tokens);
    result.end_quantized = std::max(result.first_quantized, std::min(rule.quantized_prefix(tokens), tokens));
  }
  const int64_t count = result.end_quantized - result.first_quantized;
  result.dequantized = x.to(torch::kFloat32).clone();
  double quantized_bits = 0;
  if (count > 0) {
    auto region = result.dequantized.narrow(1, result.first_quantized, count);
    auto tiles = region.reshape({-1, rule.block, head_dim});  // head-major: tile = head * blocks + block
    result.stored = quantizer.quantize(tiles, role, 0);
    region.copy_(quantizer.dequantize(result.stored, role, 0).reshape({heads, count, head_dim}));
    result.quantized_bits_per_element = stored_bits_per_element(result.stored, tiles.numel());
    quantized_bits = result.quantized_bits_per_element * static_cast<double>(tiles.numel());
  }
  const double full_precision_elements = static_cast<double>(heads * (tokens - count) * head_dim);
  result.bits_per_element = (quantized_bits + 16.0 * full_precision_elements) / static_cast<double>(x.numel());
  return result;
}

}  // namespace kvdrift
