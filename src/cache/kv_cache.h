#pragma once
// The KV cache seam. The model writes each layer's new keys/values through update() and attends
// over what it returns; a quantizing cache stores what its method would store and returns what the
// method's attention would read, without the model knowing which method it is.
#include <torch/types.h>

#include <cstdint>
#include <utility>

namespace kvdrift {

class KVCache {
 public:
  virtual ~KVCache() = default;
  // Stores keys and values [batch, kv_heads, T, head_dim] (post-RoPE) for positions [pos, pos+T) of
  // `layer` and returns the keys and values attention reads for positions [0, pos+T).
  virtual std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, int64_t pos, const torch::Tensor& keys,
                                                         const torch::Tensor& values) = 0;
  virtual int64_t capacity() const = 0;
};

// Full-precision cache preallocated for `capacity` positions (gpt-fast's static cache): a step writes
// its T positions in place and reads a view; nothing is reallocated or concatenated per step.
class StaticKVCache final : public KVCache {
 public:
  StaticKVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t capacity, int64_t head_dim,
                torch::ScalarType dtype, torch::Device device);
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, int64_t pos, const torch::Tensor& keys,
                                                 const torch::Tensor& values) override;
  int64_t capacity() const override { return keys_.size(3); }
  int64_t bytes() const { return 2 * keys_.numel() * keys_.element_size(); }

 private:
  torch::Tensor keys_;    // [n_layers, batch, kv_heads, capacity, head_dim]
  torch::Tensor values_;  // same
};

}  // namespace kvdrift
