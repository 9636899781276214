#include "cache/quantized_kv_cache.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "quant/affine.h"

namespace kvdrift {

namespace {

constexpr double kFullPrecisionBits = 16.0;  // fp16/bf16, the dtype a deployment keeps these regions in

size_t index(Role role) { return role == Role::Key ? 0 : 1; }

// The stored form as it would sit in memory: packed codes, parameters in their storage dtype.
QuantizedTiles pack(const QuantizedTiles& tiles) {
  QuantizedTiles packed{quant::pack_codes(tiles.codes, tiles.bits), tiles.bits, {}, tiles.stored_code_bits};
  for (const auto& [name, param] : tiles.params) {
    torch::Tensor stored = param.values;
    if (param.dtype == StoredDtype::Float16) stored = param.values.to(torch::kFloat16);
    if (param.dtype == StoredDtype::UInt8) stored = param.values.to(torch::kUInt8);
    // float8_e4m3 stays in float32 containers holding e4m3-exact values, so one dequantize path serves every scale dtype.
    packed.params[name] = {stored, param.dtype};
  }
  return packed;
}

QuantizedTiles unpack(const QuantizedTiles& packed, int64_t row_length) {
  QuantizedTiles tiles{quant::unpack_codes(packed.codes, packed.bits, row_length), packed.bits, {}, packed.stored_code_bits};
  for (const auto& [name, param] : packed.params) tiles.params[name] = {param.values.to(torch::kFloat32), param.dtype};
  return tiles;
}

// The end of the positions a forward writing [start, start + length) makes due: a decode step what is
// due at its token (QuaRot's own token included); a prefill chunk what is due at its first token
// among the positions before it, never its own, unless the policy has the prefill read its own
// positions quantized (then: what is due at its last token). Nothing (the sink) for an empty chunk.
int64_t due_end(const RolePolicy& policy, int64_t start, int64_t length, Phase phase) {
  if (phase == Phase::Decode) return policy.quantized_prefix(start);
  if (length == 0) return policy.sink;
  return policy.prefill_reads_quantized ? policy.quantized_prefix(start + length - 1)
                                        : std::min(policy.quantized_prefix(start), start);
}

}  // namespace

QuantizedKVCache::QuantizedKVCache(std::vector<std::shared_ptr<const Quantizer>> row_quantizers, int64_t n_layers,
                                   int64_t n_kv_heads, int64_t capacity, int64_t head_dim, torch::ScalarType dtype,
                                   torch::Device device, StorageMode mode)
    : active_rows_(static_cast<int64_t>(row_quantizers.size())), mode_(mode) {
  const int64_t batch = active_rows_;
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  for (size_t r = 0; r < 2; ++r) {
    written_[r] = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
    read_[r] = torch::zeros({n_layers, batch, n_kv_heads, capacity, head_dim}, options);
  }
  for (int64_t row = 0; row < batch; ++row) {
    slots_.push_back(row);
    if (groups_.empty() || groups_.back().quantizer != row_quantizers[row]) {
      RowGroup group;
      group.quantizer = row_quantizers[row];
      group.policies = {group.quantizer->policy(Role::Key), group.quantizer->policy(Role::Value)};
      groups_.push_back(std::move(group));
    }
    RowGroup& group = groups_.back();
    group.rows.push_back(row);
    ++group.active;
    RowAccount account;
    for (size_t r = 0; r < 2; ++r) {
      account.flushed_end[r].assign(n_layers, group.policies[r].sink);
      account.stored_bits[r].assign(n_layers, 0.0);
    }
    accounts_.push_back(std::move(account));
  }
}

QuantizedKVCache::QuantizedKVCache(std::shared_ptr<const Quantizer> quantizer, int64_t n_layers, int64_t batch,
                                   int64_t n_kv_heads, int64_t capacity, int64_t head_dim, torch::ScalarType dtype,
                                   torch::Device device, StorageMode mode)
    : QuantizedKVCache(std::vector<std::shared_ptr<const Quantizer>>(batch, std::move(quantizer)), n_layers, n_kv_heads,
                       capacity, head_dim, dtype, device, mode) {}

std::pair<torch::Tensor, torch::Tensor> QuantizedKVCache::update(int64_t layer, const RowSpans& spans,
                                                                 const torch::Tensor& keys,
                                                                 const torch::Tensor& values) {
  if (spans.end() > capacity())
    fail("KV cache capacity of {} positions exceeded (writing positions up to {})", capacity(), spans.end() - 1);
  if (keys.size(0) != active_rows_ || spans.rows() != active_rows_)
    fail("KV cache update of {} rows; the cache has {} active rows", keys.size(0), active_rows_);
  restore_mirrors(layer, spans);
  for (const auto& [role, source] : {std::pair{Role::Key, &keys}, std::pair{Role::Value, &values}}) {
    write_rows(written_[index(role)][layer], spans, *source);
    write_rows(read_[index(role)][layer], spans, *source);
    for (auto& group : groups_)
      if (group.active > 0) flush(group, role, layer, spans);
  }
  for (size_t row = 0; row < accounts_.size(); ++row) {
    RowAccount& account = accounts_[row];
    if (account.active) account.length = std::max(account.length, spans.start(slots_[row]) + spans.length(slots_[row]));
  }
  return {read_[0][layer].narrow(0, 0, active_rows_).narrow(2, 0, spans.end()),
          read_[1][layer].narrow(0, 0, active_rows_).narrow(2, 0, spans.end())};
}

void QuantizedKVCache::mirror(int64_t row, int64_t source) {
  if (slot(row) < 0 || slot(source) < 0 || row == source)
    fail("KV cache row {} cannot mirror row {}: both must be active and different", row, source);
  accounts_[row].source = source;
  accounts_[row].own_from.assign(written_[0].size(0), 0);
}

void QuantizedKVCache::check_mirrors() const {
  for (size_t row = 0; row < accounts_.size(); ++row) {
    const RowAccount& account = accounts_[row];
    if (account.active && account.source >= 0 && !accounts_[account.source].active)
      fail("KV cache row {} mirrors row {}, which was retired before it", row, account.source);
  }
}

void QuantizedKVCache::restore_mirrors(int64_t layer, const RowSpans& spans) {
  for (size_t row = 0; row < accounts_.size(); ++row) {
    RowAccount& account = accounts_[row];
    if (!account.active || account.source < 0) continue;
    const int64_t slot = slots_[row], begin = account.own_from[layer], end = spans.start(slot);
    account.own_from[layer] = std::max(begin, end);
    if (end <= begin) continue;
    const RowGroup& group = group_of(static_cast<int64_t>(row));
    for (Role role : {Role::Key, Role::Value}) {
      const size_t r = index(role);
      const auto source = written_[r][layer].select(0, slots_[account.source]).narrow(1, begin, end - begin);
      written_[r][layer].select(0, slot).narrow(1, begin, end - begin).copy_(source);
      read_[r][layer].select(0, slot).narrow(1, begin, end - begin).copy_(source);
      // Positions its policy has already quantized ([sink, flushed_end)) are read as its method
      // stores the source's rows. Only a per-token policy quantizes a token at its own step, so these
      // are single-token tiles.
      const int64_t from = std::max(begin, group.policies[r].sink), to = std::min(end, account.flushed_end[r][layer]);
      if (to <= from) continue;
      KVDRIFT_CHECK(group.policies[r].block == 1);
      const int64_t head_dim = written_[r].size(4);
      const auto tiles = written_[r][layer].select(0, slot).narrow(1, from, to - from).to(torch::kFloat32);
      const auto restored =
          group.quantizer->dequantize(group.quantizer->quantize(tiles.reshape({-1, 1, head_dim}), role, layer), role, layer);
      read_[r][layer].select(0, slot).narrow(1, from, to - from).copy_(restored.reshape(tiles.sizes()));
    }
  }
}

void QuantizedKVCache::flush(RowGroup& group, Role role, int64_t layer, const RowSpans& spans) {
  const size_t r = index(role);
  const RolePolicy& policy = group.policies[r];
  // The group's active rows whose blocks are due, in runs of consecutive slots due over the same
  // positions (one prompt's rows; every row when the batch holds one prompt): a run is one region.
  struct Run {
    int64_t first_slot, slots, begin, end;
    std::vector<RowAccount*> accounts;
  };
  std::vector<Run> runs;
  for (int64_t row : group.rows) {
    RowAccount& account = accounts_[row];
    if (!account.active) continue;
    const int64_t slot = slots_[row];
    const int64_t end = due_end(policy, spans.start(slot), spans.length(slot), spans.phase());
    const int64_t begin = account.flushed_end[r][layer];
    if (end <= begin) continue;
    if (runs.empty() || runs.back().first_slot + runs.back().slots != slot || runs.back().begin != begin ||
        runs.back().end != end)
      runs.push_back({slot, 0, begin, end, {}});
    ++runs.back().slots;
    runs.back().accounts.push_back(&account);
  }
  if (runs.empty()) return;
  const auto start_time = std::chrono::steady_clock::now();
  const int64_t head_dim = written_[r].size(4);
  auto region = [&](const torch::Tensor& buffer, const Run& run) {  // [slots, kv_heads, end - begin, head_dim]
    return buffer[layer].narrow(0, run.first_slot, run.slots).narrow(2, run.begin, run.end - run.begin);
  };
  // Every (row, kv-head, block) is an independent tile; the group's due tiles are quantized together.
  std::vector<torch::Tensor> parts;
  for (const Run& run : runs)
    parts.push_back(region(written_[r], run).to(torch::kFloat32).reshape({-1, policy.block, head_dim}));
  const auto tiles = parts.size() == 1 ? parts[0] : torch::cat(parts);
  auto stored = group.quantizer->quantize(tiles, role, layer);
  const double total_tiles = static_cast<double>(tiles.size(0));
  const double total_bits = stored_bits_per_element(stored, tiles.numel()) * static_cast<double>(tiles.numel());
  double saturated = 0, flushed_to_zero = 0;
  for (const auto& [name, param] : stored.params) {
    saturated += static_cast<double>(param.saturated);
    flushed_to_zero += static_cast<double>(param.flushed_to_zero);
  }
  torch::Tensor restored;
  if (mode_ == StorageMode::Packed) {
    group.packed[r].push_back(pack(stored));
    restored = group.quantizer->dequantize(unpack(group.packed[r].back(), head_dim), role, layer);
  } else {
    restored = group.quantizer->dequantize(stored, role, layer);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  int64_t offset = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    auto target = region(read_[r], run);
    const int64_t run_tiles = parts[i].size(0);
    target.copy_(restored.narrow(0, offset, run_tiles).reshape(target.sizes()));
    offset += run_tiles;
    // Bits and time are shared by tiles: every tile of a method costs the same.
    const double share = static_cast<double>(run_tiles) / static_cast<double>(run.slots) / total_tiles;
    for (RowAccount* account : run.accounts) {
      account->flushed_end[r][layer] = run.end;
      account->stored_bits[r][layer] += total_bits * share;
      account->seconds += seconds * share;
      account->saturated[r] += saturated * share;
      account->flushed_to_zero[r] += flushed_to_zero * share;
    }
  }
}

void QuantizedKVCache::retire(int64_t row) {
  const int64_t from = slot(row);
  if (from < 0) fail("KV cache row {} is already retired", row);
  // Rotate slots [from, active) left by one: the rows behind move forward, `row` goes last (their
  // contents too, unless nothing was written yet).
  for (auto* buffers : {&written_, &read_}) {
    for (auto& buffer : *buffers) {
      if (length() == 0) break;
      const auto retired = buffer.select(1, from).clone();
      for (int64_t s = from; s + 1 < active_rows_; ++s) buffer.select(1, s).copy_(buffer.select(1, s + 1));
      buffer.select(1, active_rows_ - 1).copy_(retired);
    }
  }
  for (int64_t& s : slots_)
    if (s > from && s < active_rows_) --s;
  slots_[row] = active_rows_ - 1;
  --active_rows_;
  accounts_[row].active = false;
  for (auto& group : groups_) {
    if (std::find(group.rows.begin(), group.rows.end(), row) != group.rows.end()) --group.active;
  }
  check_mirrors();
}

void QuantizedKVCache::join(const std::vector<int64_t>& rows, const std::vector<int64_t>& sources) {
  if (rows.size() != sources.size()) fail("KV cache join: {} rows but {} sources", rows.size(), sources.size());
  std::vector<bool> active;
  for (const RowAccount& account : accounts_) active.push_back(account.active);
  for (size_t i = 0; i < rows.size(); ++i) {
    slot(rows[i]);  // checks the row exists
    slot(sources[i]);
    const RowAccount& account = accounts_[rows[i]];
    if (account.active || account.length > 0 || account.source >= 0 || rows[i] == sources[i])
      fail("KV cache row {} cannot join as a copy of row {}: it must be retired, hold no position and mirror none",
           rows[i], sources[i]);
    active[rows[i]] = true;
  }
  // The new order: active rows by row, then the retired ones as they sat.
  std::vector<int64_t> order;  // per new slot: its row
  for (size_t row = 0; row < accounts_.size(); ++row)
    if (active[row]) order.push_back(static_cast<int64_t>(row));
  const auto active_count = static_cast<int64_t>(order.size());
  std::vector<int64_t> retired;
  for (size_t row = 0; row < accounts_.size(); ++row)
    if (!active[row]) retired.push_back(static_cast<int64_t>(row));
  std::sort(retired.begin(), retired.end(), [&](int64_t a, int64_t b) { return slots_[a] < slots_[b]; });
  order.insert(order.end(), retired.begin(), retired.end());
  const int64_t held = length();
  if (held > 0) {
    std::vector<int64_t> old_slots;
    for (int64_t row : order) old_slots.push_back(slots_[row]);
    const auto from = torch::tensor(old_slots, torch::kInt64).to(written_[0].device());
    for (auto* buffers : {&written_, &read_})
      for (auto& buffer : *buffers) {
        auto positions = buffer.narrow(3, 0, held);
        positions.copy_(positions.index_select(1, from));
      }
  }
  for (size_t s = 0; s < order.size(); ++s) slots_[order[s]] = static_cast<int64_t>(s);
  active_rows_ = active_count;
  for (size_t i = 0; i < rows.size(); ++i) {
    RowAccount& account = accounts_[rows[i]];
    account.active = true;
    for (auto& group : groups_)
      if (std::find(group.rows.begin(), group.rows.end(), rows[i]) != group.rows.end()) ++group.active;
    const int64_t length = accounts_[sources[i]].length;
    account.length = length;
    if (length == 0) continue;
    for (size_t r = 0; r < 2; ++r) {
      const auto source = written_[r].select(1, slots_[sources[i]]).narrow(2, 0, length);
      written_[r].select(1, slots_[rows[i]]).narrow(2, 0, length).copy_(source);
      read_[r].select(1, slots_[rows[i]]).narrow(2, 0, length).copy_(source);
    }
  }
  check_mirrors();
}

bool QuantizedKVCache::would_flush(int64_t row, int64_t start, int64_t length, Phase phase) const {
  const RowGroup& group = group_of(row);
  for (size_t r = 0; r < 2; ++r)
    if (due_end(group.policies[r], start, length, phase) > accounts_[row].flushed_end[r][0]) return true;
  return false;
}

int64_t QuantizedKVCache::slot(int64_t row) const {
  if (row < 0 || row >= static_cast<int64_t>(slots_.size())) fail("KV cache has no row {}", row);
  return accounts_[row].active ? slots_[row] : -1;
}

int64_t QuantizedKVCache::row_length(int64_t row) const {
  slot(row);  // checks the row exists
  return accounts_[row].length;
}

int64_t QuantizedKVCache::length() const {
  int64_t longest = 0;
  for (const RowAccount& account : accounts_) longest = std::max(longest, account.length);
  return longest;
}

const QuantizedKVCache::RowGroup& QuantizedKVCache::group_of(int64_t row) const {
  for (const auto& group : groups_)
    if (std::find(group.rows.begin(), group.rows.end(), row) != group.rows.end()) return group;
  fail("KV cache has no row {}", row);
}

int64_t QuantizedKVCache::quantized_positions(Role role, int64_t layer, int64_t row) const {
  const auto [first, end] = quantized_range(role, layer, row);
  return end - first;
}

std::pair<int64_t, int64_t> QuantizedKVCache::quantized_range(Role role, int64_t layer, int64_t row) const {
  return {group_of(row).policies[index(role)].sink, accounts_.at(row).flushed_end[index(role)][layer]};
}

double QuantizedKVCache::saturated_params(Role role, int64_t row) const {
  return accounts_.at(row).saturated[index(role)];
}

double QuantizedKVCache::flushed_to_zero_params(Role role, int64_t row) const {
  return accounts_.at(row).flushed_to_zero[index(role)];
}

torch::Tensor QuantizedKVCache::whole_batch(const std::array<torch::Tensor, 2>& buffers, Role role,
                                            int64_t layer) const {
  if (active_rows_ != static_cast<int64_t>(slots_.size())) fail("KV cache rows were retired; read them by row");
  for (const RowAccount& account : accounts_)
    if (account.length != accounts_[0].length) fail("KV cache rows hold different lengths; read them by row");
  return buffers[index(role)][layer].narrow(2, 0, length());
}

torch::Tensor QuantizedKVCache::written(Role role, int64_t layer) const { return whole_batch(written_, role, layer); }

torch::Tensor QuantizedKVCache::read(Role role, int64_t layer) const { return whole_batch(read_, role, layer); }

torch::Tensor QuantizedKVCache::row_contents(Role role, int64_t row, bool read) const {
  const int64_t length = row_length(row);
  return (read ? read_ : written_)[index(role)].select(1, slots_[row]).narrow(2, 0, length);
}

double QuantizedKVCache::bits_per_element(int64_t row) const {
  const int64_t length = row_length(row);
  if (length == 0) return kFullPrecisionBits;
  const auto& shape = written_[0].sizes();  // [layers, slots, kv_heads, capacity, head_dim]
  const double elements_per_position = static_cast<double>(shape[2] * shape[4]);
  const RowAccount& account = accounts_[row];
  double bits = 0, elements = 0;
  for (Role role : {Role::Key, Role::Value}) {
    for (int64_t layer = 0; layer < shape[0]; ++layer) {
      const double quantized = static_cast<double>(quantized_positions(role, layer, row));
      bits += account.stored_bits[index(role)][layer] +
              (static_cast<double>(length) - quantized) * elements_per_position * kFullPrecisionBits;
      elements += static_cast<double>(length) * elements_per_position;
    }
  }
  return bits / elements;
}

double QuantizedKVCache::quantize_seconds(int64_t row) const { return accounts_.at(row).seconds; }

double QuantizedKVCache::fraction_quantized(int64_t row) const {
  const int64_t length = row_length(row);
  if (length == 0) return 0.0;
  const int64_t layers = written_[0].size(0);
  double quantized = 0;
  for (Role role : {Role::Key, Role::Value})
    for (int64_t layer = 0; layer < layers; ++layer)
      quantized += static_cast<double>(quantized_positions(role, layer, row));
  return quantized / (2.0 * static_cast<double>(length) * static_cast<double>(layers));
}

}  // namespace kvdrift
