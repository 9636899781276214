#include "quant/storage.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace kvdrift {

namespace {

constexpr double kFullPrecisionBits = 16.0;  // as the cache counts its full-precision regions

}  // namespace

StorageCost storage_cost(const Quantizer& quantizer, int64_t head_dim, int64_t length) {
  if (length < 1) fail("a sequence length must be at least 1, got {}", length);
  StorageCost cost;
  double bits = 0, quantized = 0;
  for (Role role : {Role::Key, Role::Value}) {
    const RolePolicy policy = quantizer.policy(role);
    const int64_t end = std::min(policy.quantized_prefix(length - 1), length);
    const int64_t held_quantized = std::max<int64_t>(0, end - policy.sink);
    // One block of data stands for every block: a method stores the same for each.
    const auto tile = torch::randn({1, policy.block, head_dim}, torch::kFloat32);
    const QuantizedTiles stored = quantizer.quantize(tile, role, 0);
    const double elements = static_cast<double>(tile.numel());
    const double code_bits = static_cast<double>(stored.codes.numel() * code_storage_bits(stored)) / elements;
    const double tile_bits = stored_bits_per_element(stored, tile.numel());
    // A method that never quantizes (none) stores no codes or parameters.
    if (policy.quantizes()) {
      cost.codes += code_bits / 2;
      cost.parameters += (tile_bits - code_bits) / 2;
    }
    bits += static_cast<double>(held_quantized) * tile_bits +
            static_cast<double>(length - held_quantized) * kFullPrecisionBits;
    quantized += static_cast<double>(held_quantized);
  }
  cost.quantized_fraction = quantized / (2.0 * static_cast<double>(length));
  cost.bits_per_element = bits / (2.0 * static_cast<double>(length));
  return cost;
}

}  // namespace kvdrift
