// The quantizer interface's shared definitions: role names, the cache policy's quantized prefix and
// the storage accounting every method's tiles are measured by.
#include "quant/quantizer.h"

#include <algorithm>

#include "quant/affine.h"

namespace kvdrift {

const char* role_name(Role role) { return role == Role::Key ? "key" : "value"; }

int64_t RolePolicy::quantized_prefix(int64_t t) const {
  if (!quantizes()) return std::min(sink, t + 1);
  // Blocks are counted from the end of the sink.
  const int64_t shifted = t + lag - sink;
  const int64_t prefix = shifted <= 0 ? sink : sink + shifted / block * block;
  return std::min(prefix, t + 1);
}

int64_t packed_code_bits(int64_t bits) { return 8 / (8 / bits); }

int64_t code_storage_bits(const QuantizedTiles& tiles) {
  return tiles.stored_code_bits > 0 ? tiles.stored_code_bits : packed_code_bits(tiles.bits);
}

double stored_bits_per_element(const QuantizedTiles& tiles, int64_t elements) {
  double bits = static_cast<double>(tiles.codes.numel()) * code_storage_bits(tiles);
  for (const auto& [name, param] : tiles.params) bits += static_cast<double>(param.values.numel()) * quant::storage_bits(param.dtype);
  return bits / static_cast<double>(elements);
}

}  // namespace kvdrift
