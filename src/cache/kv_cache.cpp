#include "cache/kv_cache.h"

#include "core/error.h"

namespace kvdrift {

StaticKVCache::StaticKVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t capacity,
                             int64_t head_dim, torch::ScalarType dtype, torch::Device device) {
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  keys_ = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
  values_ = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
}

std::pair<torch::Tensor, torch::Tensor> StaticKVCache::update(int64_t layer, int64_t pos, const torch::Tensor& keys,
                                                              const torch::Tensor& values) {
  const int64_t length = keys.size(2);
  if (pos + length > capacity())
    fail("KV cache capacity of {} positions exceeded (writing positions {}..{})", capacity(), pos, pos + length - 1);
  auto layer_keys = keys_[layer];
  auto layer_values = values_[layer];
  layer_keys.narrow(2, pos, length).copy_(keys);
  layer_values.narrow(2, pos, length).copy_(values);
  return {layer_keys.narrow(2, 0, pos + length), layer_values.narrow(2, 0, pos + length)};
}

}  // namespace kvdrift
