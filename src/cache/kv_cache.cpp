#include "cache/kv_cache.h"

#include <algorithm>

#include "core/error.h"

namespace kvdrift {

RowSpans RowSpans::aligned(int64_t rows, int64_t start, int64_t width, Phase phase) {
  RowSpans spans;
  spans.phase_ = phase;
  spans.starts_.assign(rows, start);
  spans.lengths_.assign(rows, width);
  spans.width_ = width;
  spans.end_ = start + width;  // also for zero rows
  return spans;
}

RowSpans::RowSpans(std::vector<int64_t> starts, std::vector<int64_t> lengths, int64_t width, torch::Device device,
                   Phase phase)
    : starts_(std::move(starts)), lengths_(std::move(lengths)), width_(width), phase_(phase) {
  if (starts_.empty() || starts_.size() != lengths_.size())
    fail("row spans: {} starts and {} lengths (need one of each per row)", starts_.size(), lengths_.size());
  for (size_t r = 0; r < starts_.size(); ++r)
    if (starts_[r] < 0 || lengths_[r] < 0 || lengths_[r] > width_ || (phase_ == Phase::Decode && width_ != 1))
      fail("row spans: row {} starts at {} with {} real tokens of {}", r, starts_[r], lengths_[r], width_);
  if (!set_end()) device_starts_ = torch::tensor(starts_, torch::kInt64).to(device);
}

bool RowSpans::set_end() {
  const auto [lowest, highest] = std::minmax_element(starts_.begin(), starts_.end());
  end_ = *highest + width_;
  return *lowest == *highest;
}

torch::Tensor RowSpans::positions(torch::Device device) const {
  auto offsets = torch::arange(width_, torch::TensorOptions().dtype(torch::kInt64).device(device));
  if (is_aligned()) return (offsets + starts_[0]).unsqueeze(0);
  return device_starts_.unsqueeze(1) + offsets.unsqueeze(0);
}

RowSpans RowSpans::select(const std::vector<int64_t>& rows, const torch::Tensor& device_rows) const {
  RowSpans spans;
  for (int64_t row : rows) {
    spans.starts_.push_back(starts_.at(row));
    spans.lengths_.push_back(lengths_.at(row));
  }
  spans.width_ = width_;
  spans.phase_ = phase_;
  if (!spans.set_end()) spans.device_starts_ = device_starts_.index_select(0, device_rows);
  return spans;
}

void write_rows(torch::Tensor buffer, const RowSpans& spans, const torch::Tensor& source) {
  const int64_t rows = spans.rows(), width = spans.width();
  if (spans.is_aligned()) {
    buffer.narrow(0, 0, rows).narrow(2, spans.start(0), width).copy_(source);
    return;
  }
  using torch::indexing::Slice;
  const auto positions = spans.positions(buffer.device());  // [rows, width]
  const auto row_index = torch::arange(rows, positions.options()).unsqueeze(1);
  // Advanced indices on dims 0 and 2 put [rows, width] first: the source as [rows, width, kv_heads, head_dim].
  buffer.index_put_({row_index, Slice(), positions}, source.permute({0, 2, 1, 3}));
}

StaticKVCache::StaticKVCache(int64_t n_layers, int64_t batch, int64_t n_kv_heads, int64_t capacity, int64_t head_dim,
                             torch::ScalarType dtype, torch::Device device) {
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  keys_ = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
  values_ = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
}

std::pair<torch::Tensor, torch::Tensor> StaticKVCache::update(int64_t layer, const RowSpans& spans,
                                                              const torch::Tensor& keys, const torch::Tensor& values) {
  if (spans.end() > capacity())
    fail("KV cache capacity of {} positions exceeded (writing positions up to {})", capacity(), spans.end() - 1);
  auto layer_keys = keys_[layer];
  auto layer_values = values_[layer];
  write_rows(layer_keys, spans, keys);
  write_rows(layer_values, spans, values);
  return {layer_keys.narrow(2, 0, spans.end()), layer_values.narrow(2, 0, spans.end())};
}

}  // namespace kvdrift
