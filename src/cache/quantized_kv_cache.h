#pragma once
// A KV cache that stores what a quantization method would store. Per role it keeps what the lane
// wrote (full precision) and what attention reads: full precision where the method's policy keeps it
// (sink, tail, residual window), dequantized values where a block has been flushed. A block is
// quantized once, when its policy makes it due, and its dequantized values are written into the read
// buffer, so a decode step costs one attention pass, as for the reference.
#include <array>
#include <memory>
#include <utility>
#include <vector>

#include "cache/kv_cache.h"
#include "quant/quantizer.h"

namespace kvdrift {

enum class StorageMode {
  Simulated,  // codes and parameters are dequantized at flush and dropped
  Packed,     // codes are bit-packed and parameters kept in their storage dtype; reads go through them
};

// Each batch row may have its own quantizer (the engine's lanes share one batch): rows are grouped by
// quantizer, and a group's blocks are quantized together.
//
// Rows may sit at different positions (prompts of different lengths in one batch, RowSpans): each
// row has its own length, and its blocks fall due at its own positions.
//
// Rows can be retired (a lane that has ended): they leave the batch that update() takes and returns,
// so they stop costing compute, and keep their contents and accounting as of then. The batch that
// update() sees is the active rows in their original order; retired rows sit behind them.
class QuantizedKVCache final : public KVCache {
 public:
  QuantizedKVCache(std::vector<std::shared_ptr<const Quantizer>> row_quantizers, int64_t n_layers, int64_t n_kv_heads,
                   int64_t capacity, int64_t head_dim, torch::ScalarType dtype, torch::Device device,
                   StorageMode mode = StorageMode::Simulated);
  // Every one of `batch` rows with the same quantizer.
  QuantizedKVCache(std::shared_ptr<const Quantizer> quantizer, int64_t n_layers, int64_t batch, int64_t n_kv_heads,
                   int64_t capacity, int64_t head_dim, torch::ScalarType dtype, torch::Device device,
                   StorageMode mode = StorageMode::Simulated);

  // keys and values hold the active rows, in order. A decode step (one position) first quantizes
  // every block due at each row's position (the blocks of one quantizer in one call), so attention
  // reads them quantized. A prefill reads its own positions in full precision; a prefill chunk after
  // the first (decoding.prefill: chunked) first quantizes the blocks due at its start, so it reads the
  // earlier chunks as a decode step there would.
  using KVCache::update;
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, const RowSpans& spans, const torch::Tensor& keys,
                                                 const torch::Tensor& values) override;
  int64_t capacity() const override { return written_[0].size(3); }
  int64_t layers() const { return written_[0].size(0); }

  // Positions held by the longest row.
  int64_t length() const;
  // From now on `row` holds `source`'s keys and values at every position before the one it is
  // writing (the engine's one_step lane: the reference's rows, quantized by the row's own method);
  // only what it writes in the current forward is its own, and the next update replaces that too.
  // Both rows must be active, and `row` must be retired no later than `source`.
  void mirror(int64_t row, int64_t source);
  // Removes `row` from the batch update() works on. Moves the rows behind it forward by one (a copy of
  // their contents, once per retirement, never per step; none while no row holds a position).
  void retire(int64_t row);
  // Brings retired `rows`, which never held a position, into the batch at their places in row order,
  // each holding what sources[i] wrote (its keys and values up to its length, read in full precision:
  // the joining row has quantized nothing yet). The engine's lanes that follow their reference until
  // their first quantized read (docs/engine.md). One permutation of the held positions for all of them.
  void join(const std::vector<int64_t>& rows, const std::vector<int64_t>& sources);
  // Whether a forward writing `length` positions of `row` from `start` in `phase` would quantize some of
  // its positions (update()'s rule): for a row that has quantized nothing, its first quantized read.
  bool would_flush(int64_t row, int64_t start, int64_t length, Phase phase) const;
  int64_t active_rows() const { return active_rows_; }
  // Where `row` sits in update()'s batch; -1 once retired.
  int64_t slot(int64_t row) const;
  // Positions `row` holds (its real tokens written so far; kept as of its retirement).
  int64_t row_length(int64_t row) const;
  // Positions of `role` in `layer` that `row` currently reads quantized: how many, and which ([first, end)).
  int64_t quantized_positions(Role role, int64_t layer, int64_t row = 0) const;
  std::pair<int64_t, int64_t> quantized_range(Role role, int64_t layer, int64_t row) const;
  // Stored parameters of `row`'s blocks of `role` that their storage dtype could not hold (StoredParam),
  // over all layers, shared among the rows quantized together like the bits.
  double saturated_params(Role role, int64_t row) const;
  double flushed_to_zero_params(Role role, int64_t row) const;
  // [batch, kv_heads, length, head_dim] views of a cache whose rows are all active and equally long:
  // what the lanes wrote, and what their attention reads.
  torch::Tensor written(Role role, int64_t layer) const;
  torch::Tensor read(Role role, int64_t layer) const;
  // [layers, kv_heads, row_length(row), head_dim] view of one row, retired or not.
  torch::Tensor row_contents(Role role, int64_t row, bool read) const;
  // Storage `row` actually holds, over both roles and all layers: quantized blocks at their stored
  // cost, full-precision positions at 16 bits per element.
  double bits_per_element(int64_t row = 0) const;
  double fraction_quantized(int64_t row = 0) const;
  // Wall time spent quantizing and dequantizing the blocks of `row`'s quantizer, shared equally among
  // the rows quantized together. Host time: on CUDA it counts kernel launches, not kernel runs, as
  // the cache does not synchronize the device for it.
  double quantize_seconds(int64_t row = 0) const;

 private:
  // What one row holds and what it cost.
  struct RowAccount {
    std::array<std::vector<int64_t>, 2> flushed_end;  // per layer: positions [sink, end) are quantized
    std::array<std::vector<double>, 2> stored_bits;   // per layer: bits held by the quantized blocks
    double seconds = 0;                               // its share of flush() time
    std::array<double, 2> saturated{}, flushed_to_zero{};  // its share of the stored parameters' overflows
    int64_t length = 0;                               // positions held
    bool active = true;                               // false once retired
    int64_t source = -1;                              // mirror(): the row whose keys and values it holds
    std::vector<int64_t> own_from;                    // mirror(), per layer: its own positions start here
  };
  // Rows sharing one quantizer, consecutive in the batch; their active ones are flushed together.
  struct RowGroup {
    std::shared_ptr<const Quantizer> quantizer;
    std::vector<int64_t> rows;  // in batch order
    int64_t active = 0;         // rows not retired
    std::array<RolePolicy, 2> policies;
    std::array<std::vector<QuantizedTiles>, 2> packed;  // Packed mode: every flushed block's storage
  };
  void flush(RowGroup& group, Role role, int64_t layer, const RowSpans& spans);
  // Each mirroring row's own positions before `spans` (its previous forward's) become its source's,
  // quantized by its own method where its policy already reads them quantized.
  void restore_mirrors(int64_t layer, const RowSpans& spans);
  void check_mirrors() const;
  const RowGroup& group_of(int64_t row) const;
  torch::Tensor whole_batch(const std::array<torch::Tensor, 2>& buffers, Role role, int64_t layer) const;

  std::vector<RowGroup> groups_;
  std::vector<RowAccount> accounts_;  // per row
  std::vector<int64_t> slots_;        // per row: its slot in the batch (retired rows: behind the active)
  int64_t active_rows_ = 0;
  StorageMode mode_;
  std::array<torch::Tensor, 2> written_;  // [n_layers, slots, kv_heads, capacity, head_dim]
  std::array<torch::Tensor, 2> read_;
};

}  // namespace kvdrift
