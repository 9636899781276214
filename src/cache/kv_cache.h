#pragma once
// The KV cache seam. The model writes each layer's new keys/values through update() and attends
// over what it returns; a quantizing cache stores what its method would store and returns what the
// method's attention would read, without the model knowing which method it is.
#include <torch/types.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace kvdrift {

// The positions one forward writes, per batch row: row r's `width` new tokens sit at positions
// [start[r], start[r] + width), and the first length[r] of them are real. The others pad a shorter
// prompt to the batch's width: they are written, lie after every real query of the row (so no real
// query reads them), and are overwritten by the row's later steps. Rows differ only when prompts of
// different lengths share a batch (decoding.batch_prompts).
//
// A write is a prefill (the prompt, or one chunk of it: its own attention reads it in full precision)
// or a decode step (one token per row, which a quantizing cache may quantize before attention reads
// it). The phase is said, never guessed from the width alone: a one-token prompt is a prefill too.
enum class Phase { Prefill, Decode };
// The phase of a write at `start` in a sequential decode (the convenience overloads below): the write
// at position 0 is the prefill whatever its width, a later one-token write a decode step, a later
// wider one a prefill chunk.
inline Phase sequential_phase(int64_t start, int64_t width) {
  return start > 0 && width == 1 ? Phase::Decode : Phase::Prefill;
}

class RowSpans {
 public:
  // Every row at `start`, all `width` tokens real.
  static RowSpans aligned(int64_t rows, int64_t start, int64_t width, Phase phase);
  // Rows at their own starts, with `lengths` real tokens each (0 for a row with nothing to write in
  // this chunk of a chunked prefill); the starts are copied to `device` once here (when they
  // differ), for every layer's writes and masks.
  RowSpans(std::vector<int64_t> starts, std::vector<int64_t> lengths, int64_t width, torch::Device device, Phase phase);

  int64_t rows() const { return static_cast<int64_t>(starts_.size()); }
  int64_t width() const { return width_; }
  Phase phase() const { return phase_; }
  int64_t start(int64_t row) const { return starts_[row]; }
  int64_t length(int64_t row) const { return lengths_[row]; }
  bool is_aligned() const { return !device_starts_.defined(); }
  int64_t end() const { return end_; }  // one past the last position any row writes
  // Positions of the new tokens [rows, width], or [1, width] when aligned, on `device`.
  torch::Tensor positions(torch::Device device) const;
  // The spans of some rows, in the order given: host indices and the same on the device.
  RowSpans select(const std::vector<int64_t>& rows, const torch::Tensor& device_rows) const;

 private:
  RowSpans() = default;
  bool set_end();  // end_ from the starts; true when every row starts alike
  std::vector<int64_t> starts_, lengths_;
  int64_t width_ = 0, end_ = 0;
  Phase phase_ = Phase::Prefill;
  torch::Tensor device_starts_;  // [rows] int64 on the device; undefined when every row starts alike
};

// Writes `source` [rows, kv_heads, width, head_dim] into `buffer` [rows+, kv_heads, capacity,
// head_dim] at each row's positions (one copy when the rows are aligned, one indexed write otherwise).
void write_rows(torch::Tensor buffer, const RowSpans& spans, const torch::Tensor& source);

class KVCache {
 public:
  virtual ~KVCache() = default;
  // Stores keys and values [batch, kv_heads, T, head_dim] (post-RoPE) at the positions `spans` gives
  // each row in `layer`, and returns the keys and values attention reads for positions
  // [0, spans.end()) (a row's positions past its own are for the mask to hide).
  virtual std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, const RowSpans& spans,
                                                         const torch::Tensor& keys, const torch::Tensor& values) = 0;
  // Every row at positions [pos, pos+T), in the phase sequential_phase gives.
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, int64_t pos, const torch::Tensor& keys,
                                                 const torch::Tensor& values) {
    return update(layer, RowSpans::aligned(keys.size(0), pos, keys.size(2), sequential_phase(pos, keys.size(2))), keys,
                  values);
  }
  virtual int64_t capacity() const = 0;
};

// Full-precision cache preallocated for `capacity` positions (gpt-fast's static cache): a step writes
// its T positions in place and reads a view; nothing is reallocated or concatenated per step.
class StaticKVCache final : public KVCache {
 public:
  StaticKVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t capacity, int64_t head_dim,
                torch::ScalarType dtype, torch::Device device);
  using KVCache::update;
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, const RowSpans& spans, const torch::Tensor& keys,
                                                 const torch::Tensor& values) override;
  int64_t capacity() const override { return keys_.size(3); }
  int64_t bytes() const { return 2 * keys_.numel() * keys_.element_size(); }

 private:
  torch::Tensor keys_;    // [n_layers, batch, kv_heads, capacity, head_dim]
  torch::Tensor values_;  // same
};

}  // namespace kvdrift
