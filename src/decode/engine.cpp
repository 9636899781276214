#include "decode/engine.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <optional>

#include "cache/quantized_kv_cache.h"
#include "core/device.h"
#include "core/error.h"
#include "decode/config_checks.h"
#include "decode/generate.h"
#include "decode/sampler.h"
#include "metrics/metric_table.h"
#include "metrics/token_scale.h"
#include "model/checkpoint.h"

namespace kvdrift {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

HostArray to_host(const torch::Tensor& t) {
  auto flat = t.to(torch::kCPU, torch::kFloat32).contiguous();
  return {std::vector<float>(flat.data_ptr<float>(), flat.data_ptr<float>() + flat.numel()), flat.sizes().vec()};
}

// Appends `rows` [count, ...] (on any device) to `array` along its first axis.
void append_rows(HostArray& array, const torch::Tensor& rows) {
  const HostArray more = to_host(rows);
  array.values.insert(array.values.end(), more.values.begin(), more.values.end());
  array.shape[0] += more.shape[0];
}

// Relative L2 error and cosine of attention outputs [rows, heads, 1, head_dim] against their
// reference outputs (same shape), one value per row.
std::pair<torch::Tensor, torch::Tensor> attention_error(const torch::Tensor& outputs, const torch::Tensor& reference) {
  auto a = outputs.to(torch::kFloat32).flatten(1);
  auto r = reference.to(torch::kFloat32).flatten(1);
  auto rel_l2 = (a - r).norm(2, 1) / r.norm(2, 1).clamp_min(1e-30);
  auto cosine = (a * r).sum(1) / (a.norm(2, 1) * r.norm(2, 1)).clamp_min(1e-30);
  return {rel_l2, cosine};
}

HostArray layer_array(const std::vector<double>& per_layer) {
  return {std::vector<float>(per_layer.begin(), per_layer.end()), {static_cast<int64_t>(per_layer.size())}};
}

// Which rows [layers, kv_heads, positions] `row` reads quantized: positions [sink, end) of each layer.
torch::Tensor quantized_rows(const QuantizedKVCache& cache, Role role, int64_t row, int64_t kv_heads,
                             int64_t positions) {
  const int64_t layers = cache.layers();
  auto selected = torch::zeros({layers, kv_heads, positions}, torch::kBool);
  for (int64_t layer = 0; layer < layers; ++layer) {
    const auto [first, end] = cache.quantized_range(role, layer, row);
    const int64_t last = std::min(end, positions);
    if (last > first) selected[layer].narrow(1, first, last - first).fill_(true);
  }
  return selected;
}

// Token-scale error of rows `x` against `x_hat` [layers, kv_heads, positions, head_dim], mean over kv
// heads: [positions, layers] per component; the worst-5% magnitude share over every row, and over the
// `quantized` rows per layer by relative error; with `norms`, the norms of the quantized rows per layer.
void log_token_scale(LaneResult& lane, const std::string& group, const torch::Tensor& x, const torch::Tensor& x_hat,
                     const torch::Tensor& quantized, bool norms) {
  const auto error = metrics::token_scale_error(x, x_hat);  // [layers, kv_heads, positions]
  const torch::Tensor components[] = {error.magnitude, error.direction, error.total, error.norm_ratio};
  for (size_t i = 0; i < std::size(components); ++i)  // in the table's order: E_M, E_D, E_T, norm_ratio
    lane.arrays[group + "/" + metric::token_scale_components[i]] = to_host(components[i].mean(1).transpose(0, 1));
  const auto worst = metrics::worst_rows_magnitude_share(error);
  lane.scalars[group + "/" + metric::worst5_shares[0]] = worst.of_sums;
  lane.scalars[group + "/" + metric::worst5_shares[1]] = worst.mean_of_ratios;
  const auto selected = quantized.to(error.total.device());
  const auto relative = metrics::worst_rows_relative_share(error, selected);
  lane.arrays[group + "/" + metric::worst5_relative_per_layer] = layer_array(relative.per_layer);
  lane.scalars[group + "/" + metric::worst5_relative_pooled] = relative.pooled;
  if (!norms) return;
  std::vector<double> mean, max;
  for (int64_t layer = 0; layer < error.norm.size(0); ++layer) {
    const auto held = error.norm[layer].masked_select(selected[layer]);
    const bool any = held.numel() > 0;
    mean.push_back(any ? held.mean().item<double>() : std::numeric_limits<double>::quiet_NaN());
    max.push_back(any ? held.max().item<double>() : std::numeric_limits<double>::quiet_NaN());
  }
  lane.arrays[group + "/" + metric::norm_mean_per_layer] = layer_array(mean);
  lane.arrays[group + "/" + metric::norm_max_per_layer] = layer_array(max);
}

// Longest common prefix and outcome class of a free-running lane against the reference.
void classify(LaneResult& lane, const std::vector<int64_t>& reference, bool reference_stopped, bool lane_stopped) {
  const auto& tokens = lane.tokens;
  const size_t common = std::min(reference.size(), tokens.size());
  size_t prefix = 0;
  while (prefix < common && reference[prefix] == tokens[prefix]) ++prefix;
  lane.first_divergence = static_cast<int64_t>(prefix);
  if (prefix < common)
    lane.outcome = Outcome::TokenMismatch;
  else if (reference.size() != tokens.size())
    lane.outcome = Outcome::LengthOnly;
  else if (reference_stopped && lane_stopped)
    lane.outcome = Outcome::Identical;
  else
    lane.outcome = Outcome::Censored;  // no difference before the step limit
}

// Where the lanes that compare with a reference sit in the batch, on the device, so that indexing
// them costs no copy from the host at every step; rebuilt when lanes end. Entries of one list pair
// up: the i-th teacher-forced or one-step row compares with the reference at teacher_reference_slots[i].
struct BatchIndex {
  torch::Tensor teacher_slots, teacher_reference_slots;
  std::vector<int64_t> teacher_slot_list, teacher_reference_slot_list;  // the same on the host
  // Per active row of the static cache, in its order: the batch slot of the reference it copies.
  std::vector<int64_t> static_reference_slot_list;
  torch::Tensor static_reference_slots;
};

// Per-layer work inside the forward pass: the static lanes' attention over the quantized copy of
// their reference's cache, and the attention-output error of the teacher-forced rows. Only in
// forwards where some reference is still in the batch.
class StepObserver final : public AttentionObserver {
 public:
  StepObserver(QuantizedKVCache* static_cache, const BatchIndex* index, int64_t layers)
      : static_cache_(static_cache), index_(index), layers_(layers) {}

  // Decode steps whose per-layer errors are recorded (the metrics' layer stride).
  bool recording = false;
  std::vector<torch::Tensor> static_rel_l2, static_cos, teacher_rel_l2, teacher_cos;  // per logged step: [rows, layers]

  void observe(const LayerAttention& a) override {
    const bool decode = a.spans.phase() == Phase::Decode;
    const bool record = decode && recording;
    if (a.layer == 0 && record) {
      static_layers_.clear();
      teacher_layers_.clear();
    }
    if (static_cache_ && static_cache_->active_rows() > 0) {
      const auto& slots = index_->static_reference_slots;
      if (a.layer == 0) {  // the static rows' positions: the same for every layer of this forward
        static_spans_ = a.spans.select(index_->static_reference_slot_list, slots);
        static_query_positions_ = a.query_positions;
        if (a.query_positions.defined() && a.query_positions.size(0) > 1)
          static_query_positions_ = a.query_positions.index_select(0, slots);
      }
      auto [cached_keys, cached_values] = static_cache_->update(a.layer, *static_spans_, a.keys.index_select(0, slots),
                                                                a.values.index_select(0, slots));
      if (record) {
        auto static_output =
            ops::attention(a.q.index_select(0, slots), cached_keys, cached_values, static_query_positions_);
        static_layers_.push_back(attention_error(static_output, a.output.index_select(0, slots)));
      }
    }
    if (record && index_->teacher_slots.numel() > 0)
      teacher_layers_.push_back(attention_error(a.output.index_select(0, index_->teacher_slots),
                                                a.output.index_select(0, index_->teacher_reference_slots)));
    if (a.layer == layers_ - 1 && record) {
      auto stack = [](const std::vector<std::pair<torch::Tensor, torch::Tensor>>& per_layer, bool second) {
        std::vector<torch::Tensor> parts;
        for (const auto& p : per_layer) parts.push_back(second ? p.second : p.first);
        return torch::stack(parts, 1);  // [rows, layers]
      };
      if (!static_layers_.empty()) {
        static_rel_l2.push_back(stack(static_layers_, false));
        static_cos.push_back(stack(static_layers_, true));
      }
      if (!teacher_layers_.empty()) {
        teacher_rel_l2.push_back(stack(teacher_layers_, false));
        teacher_cos.push_back(stack(teacher_layers_, true));
      }
    }
  }

 private:
  QuantizedKVCache* static_cache_;
  const BatchIndex* index_;
  int64_t layers_;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> static_layers_, teacher_layers_;
  std::optional<RowSpans> static_spans_;  // set at layer 0 of each forward
  torch::Tensor static_query_positions_;
};

// One quantizer's lanes of one prompt: their rows (-1 where the lane does not run) and their places
// in the prompt's result.
struct QuantizerLanes {
  int64_t teacher_row = -1, one_step_row = -1, free_row = -1;  // in the main cache
  int64_t static_row = -1;                                     // in the static cache
  size_t teacher_lane = 0, one_step_lane = 0, free_lane = 0, static_lane = 0;  // index into SampleResult::lanes
  bool free_stopped = false;
};

// One prompt of a batch: its reference's row, whether it still decodes, and its quantizers' lanes.
struct BatchSample {
  int64_t reference_row = 0;  // in the main cache
  bool reference_active = true;
  std::vector<QuantizerLanes> quantizers;  // in config order
};

// Where a lane first read quantized positions: the step, overall and per layer (-1: not yet).
struct Onset {
  int64_t step = -1;
  std::vector<float> per_layer;
};

// A lane whose metrics are computed in the batch: which prompt, quantizer and lane it is.
struct LaneKey {
  size_t prompt, quantizer;
  size_t QuantizerLanes::*lane;  // its index in the prompt's SampleResult::lanes
};

}  // namespace

void check_prompt_fits(const Prompt& prompt, const ModelConfig& mc, int64_t max_new_tokens) {
  const auto length = static_cast<int64_t>(prompt.tokens.size());
  if (length == 0) fail("prompt '{}' has no tokens", prompt.id);
  for (int64_t i = 0; i < length; ++i) {
    if (prompt.tokens[i] < 0 || prompt.tokens[i] >= mc.vocab_size)
      fail("prompt {} has token id {} at position {}, outside the model's vocabulary of {} ids", prompt.id,
           prompt.tokens[i], i, mc.vocab_size);
  }
  if (length + max_new_tokens > mc.max_seq_len)
    fail("prompt '{}' ({} tokens) + decoding.max_new_tokens ({}) exceed the model's context of {} positions",
         prompt.id, length, max_new_tokens, mc.max_seq_len);
}

Engine::Engine(const LlamaModel& model, const RunConfig& config, const Tokenizer* tokenizer)
    : model_(model), config_(config), tokenizer_(tokenizer) {
  check_prefill_fits(config_, model_.config());
  quantizers_ = make_config_quantizers(config_, model_.config());
  for (Lane lane : config_.lanes) {
    static_lane_ = static_lane_ || lane == Lane::Static;
    teacher_forced_ = teacher_forced_ || lane == Lane::TeacherForced;
    one_step_ = one_step_ || lane == Lane::OneStep;
    free_running_ = free_running_ || lane == Lane::FreeRunning;
  }
  end_ids_ = stop_tokens(model_, tokenizer_);
}

// One call of Engine::run: the batch's layout (which row is which prompt × quantizer × lane), its
// caches, the lanes still compared with a reference, and the results it fills.
class Engine::Batch {
 public:
  Batch(const Engine& engine, const std::vector<Prompt>& prompts);
  // Every row's prompt (but those that follow their reference), shorter ones padded to the longest
  // (no real query reads the padding), in one forward (decoding.prefill: full) or in chunks of
  // decoding.prefill_chunk positions, each reading the earlier ones through the row's cache (chunked).
  // Returns [rows in the batch, 1, vocab] at each row's last token.
  torch::Tensor prefill();
  // Each active row's next token from its logits [active rows, vocab] (float32, in batch order):
  // greedy, or its own sampler; 0 for ended rows.
  std::vector<int64_t> next_tokens(const torch::Tensor& step_logits);
  // The teacher-forced lanes' KL, top-1 agreement and log-prob delta at this step, kept on the device.
  void measure(const torch::Tensor& step_logits, const std::vector<int64_t>& next);
  // Appends each lane's token; lanes that end leave the batch.
  void record(const std::vector<int64_t>& next);
  bool decoding() const { return cache_.active_rows() > 0; }
  // The forward of decode step `step` + 1: teacher-forced rows read their reference's token,
  // free-running rows their own. Returns the next logits.
  torch::Tensor decode_one_token(const std::vector<int64_t>& next, int64_t step);
  // The samples so far, their device metrics moved to the host.
  const std::vector<SampleResult>& results_so_far() {
    drain_metrics();
    return results_;
  }
  // Token-scale errors and accounting from the caches, outcomes and texts: the finished samples.
  std::vector<SampleResult> finish();

 private:
  void declare_lanes();
  // Lane rows whose prefill reads nothing quantized decode as their reference until they fork.
  void share_until_onset();
  // Before the forward of decode step `step`: the lanes that would read a quantized position in it
  // fork from their reference (a copy of its cache).
  void fork_lanes(int64_t step);
  void locate_lanes();
  // The row whose tokens, logits and cache are `row`'s: its reference while it follows it, else itself.
  int64_t held_by(int64_t row) const { return follows_[row] >= 0 ? follows_[row] : row; }
  // Where `row`'s logits sit in the step's batch; -1 once it has ended.
  int64_t logits_slot(int64_t row) const { return cache_.slot(held_by(row)); }
  // The prefill's chunks: [begin, begin + width) of the padded prompts.
  std::vector<std::pair<int64_t, int64_t>> prefill_chunks() const;
  // After the forward that gives step `step`'s logits: what each lane's attention read quantized.
  void note_reads(int64_t step);
  void drain_metrics();
  void drain_attention(std::vector<torch::Tensor>& rel_l2, std::vector<torch::Tensor>& cosine,
                       const std::vector<LaneKey>& order);
  // `held`: the row whose keys and values `row` holds (held_by; `row` itself in the static cache).
  void account(LaneResult& lane, const QuantizedKVCache& cache, int64_t row, int64_t held, int64_t reference_row,
               bool drift) const;
  std::string decode_text(const std::vector<int64_t>& tokens, bool stopped) const;
  std::string reply_text(const std::vector<int64_t>& tokens) const;
  bool is_stop(int64_t token) const;
  torch::Tensor to_device(const std::vector<int64_t>& values) const {
    return torch::tensor(values, torch::TensorOptions().dtype(torch::kInt64)).to(device_);
  }
  // The caches' rows: the references first, then per quantizer, per prompt, its teacher-forced,
  // one-step and free-running rows (a quantizer's rows are consecutive: its blocks are quantized in
  // one call).
  // Static cache rows: per quantizer, per prompt.
  static std::vector<std::shared_ptr<const Quantizer>> row_quantizers(const Engine& engine,
                                                                      std::vector<BatchSample>& samples,
                                                                      std::vector<size_t>& row_prompt);
  static std::unique_ptr<QuantizedKVCache> static_cache(const Engine& engine, size_t prompts, int64_t capacity);

  const Engine& engine_;
  const std::vector<Prompt>& prompts_;
  const torch::Device device_;
  const int64_t max_new_;
  const int64_t longest_prompt_;  // shorter prompts are padded to it in the prefill
  const SamplingConfig sampling_;
  const bool kl_sampled_;
  // The per-step metrics of the teacher-forced and one-step lanes, by name: measure computes each,
  // drain_metrics moves each into the lane array of that name.
  const std::vector<std::string> teacher_columns_;
  std::vector<BatchSample> samples_;
  std::vector<SampleResult> results_;  // in prompt order
  std::vector<std::vector<Onset>> onsets_;  // per prompt, per lane of its result (moved into it at the end)
  std::vector<size_t> row_prompt_;     // per row: its prompt
  QuantizedKVCache cache_;
  std::unique_ptr<QuantizedKVCache> static_cache_;
  const int64_t rows_;
  std::vector<int64_t> prompt_lengths_;  // per row
  // Per row: the reference row it decodes as until it forks (no row of its own in the batch until
  // then: its tokens, logits and cache are its reference's); -1 for a row of its own.
  std::vector<int64_t> follows_;
  std::vector<Sampler> samplers_;        // per row
  // The lanes compared with a reference, as index_ holds them, in its order: rebuilt when lanes end.
  // teacher_order_ holds the teacher-forced and one-step lanes: fed the reference's tokens.
  BatchIndex index_;
  std::vector<LaneKey> teacher_order_, static_order_;
  StepObserver observer_;
  std::vector<torch::Tensor> teacher_step_metrics_;  // per step: [teacher_order_ rows, teacher_columns_]
};

std::vector<std::shared_ptr<const Quantizer>> Engine::Batch::row_quantizers(const Engine& engine,
                                                                          std::vector<BatchSample>& samples,
                                                                          std::vector<size_t>& row_prompt) {
  std::vector<std::shared_ptr<const Quantizer>> quantizers(
      samples.size(), make_quantizer("none", {}, engine.model_.config().head_dim));
  for (size_t p = 0; p < samples.size(); ++p) {
    row_prompt.push_back(p);
    samples[p].reference_row = static_cast<int64_t>(p);
    samples[p].quantizers.resize(engine.quantizers_.size());
  }
  auto add_row = [&](size_t q, size_t p) {
    quantizers.push_back(engine.quantizers_[q]);
    row_prompt.push_back(p);
    return static_cast<int64_t>(quantizers.size()) - 1;
  };
  for (size_t q = 0; q < engine.quantizers_.size(); ++q) {
    for (size_t p = 0; p < samples.size(); ++p) {
      QuantizerLanes& lanes = samples[p].quantizers[q];
      if (engine.teacher_forced_) lanes.teacher_row = add_row(q, p);
      if (engine.one_step_) lanes.one_step_row = add_row(q, p);
      if (engine.free_running_) lanes.free_row = add_row(q, p);
      if (engine.static_lane_) lanes.static_row = static_cast<int64_t>(q * samples.size() + p);
    }
  }
  return quantizers;
}

std::unique_ptr<QuantizedKVCache> Engine::Batch::static_cache(const Engine& engine, size_t prompts, int64_t capacity) {
  const ModelConfig& mc = engine.model_.config();
  std::vector<std::shared_ptr<const Quantizer>> quantizers;
  for (const auto& q : engine.quantizers_) quantizers.insert(quantizers.end(), prompts, q);
  return std::make_unique<QuantizedKVCache>(quantizers, mc.n_layers, mc.n_kv_heads, capacity, mc.head_dim,
                                            engine.model_.dtype(), engine.model_.device());
}

Engine::Batch::Batch(const Engine& engine, const std::vector<Prompt>& prompts)
    : engine_(engine),
      prompts_(prompts),
      device_(engine.model_.device()),
      max_new_(engine.config_.decoding.max_new_tokens),
      longest_prompt_(longest_prompt_tokens(prompts)),
      // Every sampled lane draws from its own generator with the run's seed: equal logits, equal tokens.
      sampling_{engine.config_.decoding.temperature, engine.config_.decoding.top_p, engine.config_.decoding.top_k,
                engine.config_.decoding.seed},
      kl_sampled_(sampling_.reshapes_distribution()),
      teacher_columns_(kl_sampled_ ? std::vector<std::string>{metric::kl, metric::top1_agree, metric::logp_delta,
                                                              metric::kl_sampled}
                                   : std::vector<std::string>{metric::kl, metric::top1_agree, metric::logp_delta}),
      samples_(prompts.size()),
      results_(prompts.size()),
      onsets_(prompts.size()),
      cache_(row_quantizers(engine, samples_, row_prompt_), engine.model_.config().n_layers,
             engine.model_.config().n_kv_heads, longest_prompt_ + max_new_, engine.model_.config().head_dim,
             engine.model_.dtype(), device_),
      static_cache_(engine.static_lane_ ? static_cache(engine, prompts.size(), longest_prompt_ + max_new_) : nullptr),
      rows_(static_cast<int64_t>(row_prompt_.size())),
      follows_(rows_, -1),
      samplers_(rows_, Sampler(sampling_)),
      observer_(static_cache_.get(), &index_, engine.model_.config().n_layers) {
  for (size_t p = 0; p < prompts.size(); ++p) {
    results_[p].prompt = prompts[p];
    results_[p].batch_prompts = static_cast<int64_t>(prompts.size());
  }
  for (int64_t row = 0; row < rows_; ++row)
    prompt_lengths_.push_back(static_cast<int64_t>(prompts[row_prompt_[row]].tokens.size()));
  if (engine.config_.decoding.share_until_onset) share_until_onset();
  // A one-step row's cache holds its reference's keys and values, never its own (docs/engine.md).
  for (const BatchSample& sample : samples_)
    for (const QuantizerLanes& lanes : sample.quantizers)
      if (lanes.one_step_row >= 0 && follows_[lanes.one_step_row] < 0)
        cache_.mirror(lanes.one_step_row, sample.reference_row);
  declare_lanes();
  locate_lanes();
}

// Every sample's lanes in log order (per quantizer: static, teacher-forced, free-running), with their
// per-step arrays declared empty so that a partial sample already names every array it will hold.
void Engine::Batch::declare_lanes() {
  const int64_t layers = engine_.model_.config().n_layers;
  for (size_t p = 0; p < samples_.size(); ++p) {
    auto add_lane = [&](size_t q, Lane kind, const std::vector<std::string>& step_arrays, bool attention) {
      LaneResult lane;
      lane.quantizer = engine_.config_.quantizers[q].name;
      lane.lane = kind;
      for (const std::string& name : step_arrays) lane.arrays[name] = {{}, {0}};
      if (attention && engine_.config_.metrics.attention_error)
        for (const char* name : {metric::attn_rel_l2, metric::attn_cos}) lane.arrays[name] = {{}, {0, layers}};
      lane.arrays[metric::fraction_read_quantized] = {{}, {0}};
      results_[p].lanes.push_back(std::move(lane));
      onsets_[p].push_back({-1, std::vector<float>(layers, -1.0f)});
      return results_[p].lanes.size() - 1;
    };
    for (size_t q = 0; q < samples_[p].quantizers.size(); ++q) {
      QuantizerLanes& lanes = samples_[p].quantizers[q];
      if (engine_.static_lane_) lanes.static_lane = add_lane(q, Lane::Static, {}, true);
      if (engine_.teacher_forced_) lanes.teacher_lane = add_lane(q, Lane::TeacherForced, teacher_columns_, true);
      if (engine_.one_step_) lanes.one_step_lane = add_lane(q, Lane::OneStep, teacher_columns_, true);
      if (engine_.free_running_) lanes.free_lane = add_lane(q, Lane::FreeRunning, {metric::match}, false);
    }
  }
}

std::vector<std::pair<int64_t, int64_t>> Engine::Batch::prefill_chunks() const {
  const DecodingSettings& decoding = engine_.config_.decoding;
  const int64_t chunk = decoding.prefill == PrefillMode::Chunked ? decoding.prefill_chunk : longest_prompt_;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t begin = 0; begin < longest_prompt_; begin += chunk)
    chunks.emplace_back(begin, std::min(chunk, longest_prompt_ - begin));
  return chunks;
}

// Until its first quantized read a lane's inputs are its reference's, and so are its tokens, logits
// and cache; computing them again in a row of its own only adds rounding noise (a GEMM rounds a row
// by its place in the batch) and cost. Such rows leave the batch before anything is written.
void Engine::Batch::share_until_onset() {
  const auto chunks = prefill_chunks();
  for (const BatchSample& sample : samples_) {
    for (const QuantizerLanes& lanes : sample.quantizers) {
      for (int64_t row : {lanes.teacher_row, lanes.one_step_row, lanes.free_row}) {
        if (row < 0) continue;
        const int64_t length = prompt_lengths_[row];
        bool reads_quantized = false;
        for (const auto& [begin, width] : chunks)
          reads_quantized = reads_quantized || cache_.would_flush(row, std::min(begin, length),
                                                                  std::clamp<int64_t>(length - begin, 0, width),
                                                                  Phase::Prefill);
        if (reads_quantized) continue;
        cache_.retire(row);
        follows_[row] = sample.reference_row;
      }
    }
  }
}

void Engine::Batch::fork_lanes(int64_t step) {
  std::vector<int64_t> forking, references;
  for (int64_t row = 0; row < rows_; ++row) {
    const int64_t reference = follows_[row];
    if (reference < 0 || cache_.slot(reference) < 0) continue;
    if (!cache_.would_flush(row, prompt_lengths_[row] + step, 1, Phase::Decode)) continue;
    forking.push_back(row);
    references.push_back(reference);
  }
  if (forking.empty()) return;
  // The device metrics are kept in teacher_order_ / static_order_, which a fork does not change.
  cache_.join(forking, references);
  for (size_t i = 0; i < forking.size(); ++i) follows_[forking[i]] = -1;
  for (const BatchSample& sample : samples_)
    for (const QuantizerLanes& lanes : sample.quantizers)
      if (std::find(forking.begin(), forking.end(), lanes.one_step_row) != forking.end())
        cache_.mirror(lanes.one_step_row, sample.reference_row);
  locate_lanes();
}

void Engine::Batch::locate_lanes() {
  std::vector<int64_t> teacher_slots, teacher_reference_slots;
  teacher_order_.clear();
  static_order_.clear();
  index_.static_reference_slot_list.clear();
  for (size_t q = 0; q < engine_.quantizers_.size(); ++q) {  // in row order: static entries follow its cache's slots
    for (size_t p = 0; p < samples_.size(); ++p) {
      const BatchSample& sample = samples_[p];
      if (!sample.reference_active) continue;
      const int64_t reference_slot = cache_.slot(sample.reference_row);
      const QuantizerLanes& lanes = sample.quantizers[q];
      for (const auto& [row, lane] : {std::pair{lanes.teacher_row, &QuantizerLanes::teacher_lane},
                                      std::pair{lanes.one_step_row, &QuantizerLanes::one_step_lane}}) {
        if (row < 0) continue;
        teacher_slots.push_back(logits_slot(row));
        teacher_reference_slots.push_back(reference_slot);
        teacher_order_.push_back({p, q, lane});
      }
      if (engine_.static_lane_) {
        index_.static_reference_slot_list.push_back(reference_slot);
        static_order_.push_back({p, q, &QuantizerLanes::static_lane});
      }
    }
  }
  index_.teacher_slots = to_device(teacher_slots);
  index_.teacher_reference_slots = to_device(teacher_reference_slots);
  index_.teacher_slot_list = teacher_slots;
  index_.teacher_reference_slot_list = teacher_reference_slots;
  index_.static_reference_slots = to_device(index_.static_reference_slot_list);
}

torch::Tensor Engine::Batch::prefill() {
  const int64_t active = cache_.active_rows();
  auto prompt_tokens = torch::zeros({active, longest_prompt_}, torch::kInt64);
  for (int64_t row = 0; row < rows_; ++row) {
    if (cache_.slot(row) < 0) continue;  // follows its reference
    const Prompt& prompt = prompts_[row_prompt_[row]];
    prompt_tokens[cache_.slot(row)].narrow(0, 0, prompt_lengths_[row])
        .copy_(torch::tensor(prompt.tokens, torch::kInt64));
  }
  prompt_tokens = prompt_tokens.to(device_);
  torch::Tensor logits;
  for (const auto& [begin, width] : prefill_chunks()) {
    std::vector<int64_t> starts(active), lengths(active), ending;
    for (int64_t row = 0; row < rows_; ++row) {
      const int64_t slot = cache_.slot(row);
      if (slot < 0) continue;
      starts[slot] = std::min(begin, prompt_lengths_[row]);
      lengths[slot] = std::clamp<int64_t>(prompt_lengths_[row] - begin, 0, width);
      if (prompt_lengths_[row] > begin && prompt_lengths_[row] <= begin + width) ending.push_back(slot);
    }
    auto chunk_logits = engine_.model_.forward(prompt_tokens.narrow(1, begin, width),
                                               RowSpans(starts, lengths, width, device_, Phase::Prefill), cache_,
                                               /*last_only=*/true, &observer_);
    if (!logits.defined()) {
      logits = chunk_logits;  // rows ending in a later chunk are overwritten there
    } else if (!ending.empty()) {
      const auto ended = to_device(ending);
      logits = logits.index_copy(0, ended, chunk_logits.index_select(0, ended));
    }
  }
  note_reads(0);
  return logits;
}

std::vector<int64_t> Engine::Batch::next_tokens(const torch::Tensor& step_logits) {
  // One host read per step: the tokens decide what every lane feeds next and when it stops.
  std::vector<int64_t> next(rows_, 0);
  if (sampling_.temperature == 0.0) {
    auto host = step_logits.argmax(-1).to(torch::kCPU);
    for (int64_t r = 0; r < rows_; ++r)
      if (logits_slot(r) >= 0) next[r] = host[logits_slot(r)].item<int64_t>();
  } else {
    // A row that follows its reference draws from its own generator, from the same logits.
    for (int64_t r = 0; r < rows_; ++r)
      if (logits_slot(r) >= 0) next[r] = samplers_[r].next(step_logits[logits_slot(r)]);
  }
  return next;
}

void Engine::Batch::measure(const torch::Tensor& step_logits, const std::vector<int64_t>& next) {
  if (teacher_order_.empty()) return;
  // In float64: KL of nearly equal distributions must not come out negative from rounding.
  std::vector<int64_t> reference_tokens;
  for (const LaneKey& key : teacher_order_) reference_tokens.push_back(next[samples_[key.prompt].reference_row]);
  const auto reference_token = to_device(reference_tokens).unsqueeze(1);
  auto reference_logits = step_logits.index_select(0, index_.teacher_reference_slots);
  auto lane_logits = step_logits.index_select(0, index_.teacher_slots);
  auto log_ref = torch::log_softmax(reference_logits.to(torch::kFloat64), -1);
  auto log_lane = torch::log_softmax(lane_logits.to(torch::kFloat64), -1);
  auto kl = (log_ref.exp() * (log_ref - log_lane)).sum(-1);
  auto agree = (lane_logits.argmax(-1) == reference_logits.argmax(-1)).to(torch::kFloat32);
  auto delta = (log_ref.gather(1, reference_token) - log_lane.gather(1, reference_token)).squeeze(1);
  std::map<std::string, torch::Tensor> columns = {
      {metric::kl, kl.to(torch::kFloat32)}, {metric::top1_agree, agree}, {metric::logp_delta, delta.to(torch::kFloat32)}};
  if (kl_sampled_) {
    // Between the distributions the lanes sample from, on the host in float64 (the samplers' own
    // definition); +inf where the reference keeps a token the lane cuts.
    const auto host_logits = step_logits.to(torch::kCPU);
    std::map<int64_t, SamplingDistribution> references;  // by batch slot
    std::vector<float> divergences;
    for (size_t i = 0; i < index_.teacher_slot_list.size(); ++i) {
      const int64_t slot = index_.teacher_reference_slot_list[i];
      auto reference = references.find(slot);
      if (reference == references.end())
        reference = references.emplace(slot, sampling_distribution(host_logits[slot], sampling_)).first;
      const auto lane = sampling_distribution(host_logits[index_.teacher_slot_list[i]], sampling_);
      divergences.push_back(static_cast<float>(kl_divergence(reference->second, lane, host_logits.size(1))));
    }
    columns[metric::kl_sampled] = torch::tensor(divergences).to(device_);
  }
  std::vector<torch::Tensor> in_order;
  for (const std::string& name : teacher_columns_) in_order.push_back(columns.at(name));
  teacher_step_metrics_.push_back(torch::stack(in_order, 1));
}

// A lane stops at an end token only with decoding.stop_at_eos; otherwise it decodes every step.
bool Engine::Batch::is_stop(int64_t token) const {
  const auto& end_ids = engine_.end_ids_;
  return engine_.config_.decoding.stop_at_eos && std::find(end_ids.begin(), end_ids.end(), token) != end_ids.end();
}

void Engine::Batch::record(const std::vector<int64_t>& next) {
  // Lanes that end leave the batch: a reference with its teacher-forced rows (and static lanes), a
  // free-running row alone.
  std::vector<int64_t> ended_rows, ended_static_rows;
  for (size_t p = 0; p < samples_.size(); ++p) {
    BatchSample& sample = samples_[p];
    SampleResult& result = results_[p];
    if (sample.reference_active) {
      const int64_t token = next[sample.reference_row];
      result.reference_tokens.push_back(token);
      if (is_stop(token)) {
        result.reference_stopped = true;
        sample.reference_active = false;
        for (const QuantizerLanes& lanes : sample.quantizers) {
          for (int64_t row : {lanes.teacher_row, lanes.one_step_row})
            if (row >= 0) ended_rows.push_back(row);
          if (lanes.static_row >= 0) ended_static_rows.push_back(lanes.static_row);
        }
        ended_rows.push_back(sample.reference_row);  // after the one-step rows that mirror it
      }
    }
    for (QuantizerLanes& lanes : sample.quantizers) {
      if (lanes.free_row < 0 || lanes.free_stopped) continue;
      const int64_t token = next[lanes.free_row];
      result.lanes[lanes.free_lane].tokens.push_back(token);
      if (is_stop(token)) {
        lanes.free_stopped = true;
        ended_rows.push_back(lanes.free_row);
      }
    }
  }
  if (ended_rows.empty()) return;
  drain_metrics();  // the device metrics hold the rows of the current order
  for (int64_t row : ended_rows)
    if (cache_.slot(row) >= 0) cache_.retire(row);  // a row that follows its reference has none
  for (int64_t row : ended_static_rows) static_cache_->retire(row);
  locate_lanes();
}

torch::Tensor Engine::Batch::decode_one_token(const std::vector<int64_t>& next, int64_t step) {
  fork_lanes(step);
  // Each row writes the position after its prompt's last one.
  std::vector<int64_t> inputs(cache_.active_rows()), starts(cache_.active_rows());
  for (int64_t r = 0; r < rows_; ++r) {
    const int64_t slot = cache_.slot(r);
    if (slot < 0) continue;
    inputs[slot] = next[r];
    starts[slot] = prompt_lengths_[r] + step;
  }
  for (const BatchSample& sample : samples_)
    for (const QuantizerLanes& lanes : sample.quantizers)
      for (int64_t row : {lanes.teacher_row, lanes.one_step_row})
        if (row >= 0 && cache_.slot(row) >= 0) inputs[cache_.slot(row)] = next[sample.reference_row];
  const bool references =
      std::any_of(samples_.begin(), samples_.end(), [](const BatchSample& s) { return s.reference_active; });
  const bool logged = step % engine_.config_.metrics.layer_stride == 0 && references;
  observer_.recording = logged && engine_.config_.metrics.attention_error;
  for (size_t p = 0; p < samples_.size(); ++p)
    if (logged && samples_[p].reference_active) results_[p].logged_steps.push_back(step + 1);
  for (int64_t r = 0; r < rows_; ++r)
    if (cache_.slot(r) >= 0) ++results_[row_prompt_[r]].decode_row_steps;
  // The observer needs some reference in the batch; the static lanes end with theirs.
  auto logits = engine_.model_.forward(
      torch::tensor(inputs, torch::kInt64).unsqueeze(1).to(device_),
      RowSpans(starts, std::vector<int64_t>(starts.size(), 1), 1, device_, Phase::Decode), cache_,
      /*last_only=*/true, references ? &observer_ : nullptr);
  note_reads(step + 1);
  return logits;
}

void Engine::Batch::note_reads(int64_t step) {
  // `decoding`: whether the row took part in this forward (itself, or as the reference it follows, whose
  // reads are its own: nothing quantized, as its cache has flushed nothing).
  const auto note = [step](LaneResult& lane, Onset& onset, const QuantizedKVCache& cache, int64_t row, bool decoding) {
    if (row < 0 || !decoding) return;
    int64_t quantized = 0;
    for (int64_t layer = 0; layer < cache.layers(); ++layer) {
      const int64_t in_layer =
          cache.quantized_positions(Role::Key, layer, row) + cache.quantized_positions(Role::Value, layer, row);
      if (in_layer > 0 && onset.per_layer[layer] < 0) onset.per_layer[layer] = static_cast<float>(step);
      quantized += in_layer;
    }
    if (quantized > 0 && onset.step < 0) onset.step = step;
    const double read = 2.0 * static_cast<double>(cache.layers() * cache.row_length(row));
    HostArray& fraction = lane.arrays[metric::fraction_read_quantized];
    fraction.values.push_back(read > 0 ? static_cast<float>(static_cast<double>(quantized) / read) : 0.0f);
    ++fraction.shape[0];
  };
  const auto in_batch = [this](int64_t row) { return row >= 0 && logits_slot(row) >= 0; };
  for (size_t p = 0; p < samples_.size(); ++p) {
    std::vector<LaneResult>& lanes = results_[p].lanes;
    std::vector<Onset>& onsets = onsets_[p];
    for (const QuantizerLanes& q : samples_[p].quantizers) {
      note(lanes[q.teacher_lane], onsets[q.teacher_lane], cache_, q.teacher_row, in_batch(q.teacher_row));
      note(lanes[q.one_step_lane], onsets[q.one_step_lane], cache_, q.one_step_row, in_batch(q.one_step_row));
      note(lanes[q.free_lane], onsets[q.free_lane], cache_, q.free_row, in_batch(q.free_row));
      if (q.static_row >= 0)
        note(lanes[q.static_lane], onsets[q.static_lane], *static_cache_, q.static_row,
             static_cache_->slot(q.static_row) >= 0);
    }
  }
}

// Moves the metrics computed on the device since the last call into the lanes' host arrays, one copy
// per kind of metric, and extends the free-running match flags. The device arrays hold the rows of
// teacher_order_ / static_order_: called before those change.
void Engine::Batch::drain_metrics() {
  if (!teacher_step_metrics_.empty()) {
    const auto metrics = torch::stack(teacher_step_metrics_, 0).to(torch::kCPU);  // [steps, rows, columns]
    teacher_step_metrics_.clear();
    for (size_t i = 0; i < teacher_order_.size(); ++i) {
      const LaneKey& key = teacher_order_[i];
      auto& arrays = results_[key.prompt].lanes[samples_[key.prompt].quantizers[key.quantizer].*key.lane].arrays;
      const auto own = metrics.select(1, static_cast<int64_t>(i));
      for (size_t c = 0; c < teacher_columns_.size(); ++c)
        append_rows(arrays[teacher_columns_[c]], own.select(1, static_cast<int64_t>(c)));
    }
  }
  drain_attention(observer_.static_rel_l2, observer_.static_cos, static_order_);
  drain_attention(observer_.teacher_rel_l2, observer_.teacher_cos, teacher_order_);
  for (size_t p = 0; p < samples_.size(); ++p) {
    for (const QuantizerLanes& lanes : samples_[p].quantizers) {
      if (lanes.free_row < 0) continue;
      LaneResult& lane = results_[p].lanes[lanes.free_lane];
      HostArray& match = lane.arrays[metric::match];
      const auto& reference = results_[p].reference_tokens;
      const size_t steps = std::min(lane.tokens.size(), reference.size());
      for (size_t s = match.values.size(); s < steps; ++s)
        match.values.push_back(lane.tokens[s] == reference[s] ? 1.0f : 0.0f);
      match.shape[0] = static_cast<int64_t>(match.values.size());
    }
  }
}

void Engine::Batch::drain_attention(std::vector<torch::Tensor>& rel_l2, std::vector<torch::Tensor>& cosine,
                                    const std::vector<LaneKey>& order) {
  if (rel_l2.empty()) return;
  const auto rel_l2_host = torch::stack(rel_l2, 0).to(torch::kCPU);  // [logged steps, rows, layers]
  const auto cosine_host = torch::stack(cosine, 0).to(torch::kCPU);
  rel_l2.clear();
  cosine.clear();
  for (size_t i = 0; i < order.size(); ++i) {
    const LaneKey& key = order[i];
    auto& arrays = results_[key.prompt].lanes[samples_[key.prompt].quantizers[key.quantizer].*key.lane].arrays;
    append_rows(arrays[metric::attn_rel_l2], rel_l2_host.select(1, static_cast<int64_t>(i)));
    append_rows(arrays[metric::attn_cos], cosine_host.select(1, static_cast<int64_t>(i)));
  }
}

// Token-scale errors from a cache: the row over the positions it holds (a lane that ended holds those
// up to its end; one that never forked its reference's, none of them quantized); drift against the
// reference over the positions both hold.
void Engine::Batch::account(LaneResult& lane, const QuantizedKVCache& cache, int64_t row, int64_t held,
                            int64_t reference_row, bool drift) const {
  if (engine_.config_.metrics.token_scale) {
    for (Role role : {Role::Key, Role::Value}) {
      const std::string name = role_name(role);
      const auto written = cache.row_contents(role, held, /*read=*/false);  // [layers, kv_heads, positions, head_dim]
      const auto read = cache.row_contents(role, held, /*read=*/true);
      const auto quantized = quantized_rows(cache, role, row, written.size(1), written.size(2));
      const std::string quant = metric::token_scale_group(name, "quant");
      log_token_scale(lane, quant, written, read, quantized, /*norms=*/true);
      lane.scalars[quant + "/" + metric::saturated_params] = cache.saturated_params(role, row);
      lane.scalars[quant + "/" + metric::flushed_to_zero_params] = cache.flushed_to_zero_params(role, row);
      if (drift) {
        const auto reference = cache_.row_contents(role, reference_row, /*read=*/false);
        const int64_t common = std::min(reference.size(2), written.size(2));
        log_token_scale(lane, metric::token_scale_group(name, "drift"), reference.narrow(2, 0, common),
                        written.narrow(2, 0, common), quantized.narrow(2, 0, common), /*norms=*/false);
      }
    }
  }
  lane.scalars[metric::bits_per_element] = cache.bits_per_element(row);
  lane.scalars[metric::fraction_quantized] = cache.fraction_quantized(row);
  lane.scalars[metric::quantize_seconds] = cache.quantize_seconds(row);
}

// Decoded texts leave the end token out; a reply ends at the first one.
std::string Engine::Batch::decode_text(const std::vector<int64_t>& tokens, bool stopped) const {
  return engine_.tokenizer_->decode({tokens.begin(), tokens.end() - (stopped ? 1 : 0)});
}

std::string Engine::Batch::reply_text(const std::vector<int64_t>& tokens) const {
  const auto& end_ids = engine_.end_ids_;
  const auto end = std::find_first_of(tokens.begin(), tokens.end(), end_ids.begin(), end_ids.end());
  return engine_.tokenizer_->decode({tokens.begin(), end});
}

std::vector<SampleResult> Engine::Batch::finish() {
  drain_metrics();
  const bool texts = engine_.tokenizer_ != nullptr;
  for (size_t p = 0; p < samples_.size(); ++p) {
    const BatchSample& sample = samples_[p];
    SampleResult& result = results_[p];
    for (size_t l = 0; l < result.lanes.size(); ++l) {
      const Onset& onset = onsets_[p][l];
      result.lanes[l].scalars[metric::onset_step] = static_cast<double>(onset.step);
      result.lanes[l].arrays[metric::onset_step_per_layer] = {onset.per_layer,
                                                               {static_cast<int64_t>(onset.per_layer.size())}};
    }
    for (const QuantizerLanes& lanes : sample.quantizers) {
      if (lanes.static_row >= 0)
        account(result.lanes[lanes.static_lane], *static_cache_, lanes.static_row, lanes.static_row,
                sample.reference_row, false);
      if (lanes.teacher_row >= 0)
        account(result.lanes[lanes.teacher_lane], cache_, lanes.teacher_row, held_by(lanes.teacher_row),
                sample.reference_row, true);
      // A one-step cache holds the reference's rows: it has quantization error, but no drift.
      if (lanes.one_step_row >= 0)
        account(result.lanes[lanes.one_step_lane], cache_, lanes.one_step_row, held_by(lanes.one_step_row),
                sample.reference_row, false);
      if (lanes.free_row >= 0) {
        LaneResult& lane = result.lanes[lanes.free_lane];
        classify(lane, result.reference_tokens, result.reference_stopped, lanes.free_stopped);
        account(lane, cache_, lanes.free_row, held_by(lanes.free_row), sample.reference_row, true);
        if (texts) {
          lane.text = decode_text(lane.tokens, lanes.free_stopped);
          lane.reply = reply_text(lane.tokens);
        }
      }
    }
    if (texts) {
      result.reference_continuation = decode_text(result.reference_tokens, result.reference_stopped);
      result.reference_reply = reply_text(result.reference_tokens);
      std::vector<int64_t> all = result.prompt.tokens;
      all.insert(all.end(), result.reference_tokens.begin(), result.reference_tokens.end());
      result.reference_text = decode_text(all, result.reference_stopped);
    }
  }
  return std::move(results_);
}

void Engine::check_cache_memory(int64_t batch, int64_t longest) const {
  if (!model_.device().is_cpu()) return;
  const std::optional<int64_t> available = available_memory_bytes();
  if (!available) return;
  const auto count = static_cast<int64_t>(quantizers_.size());
  const int64_t lanes = int64_t{teacher_forced_} + one_step_ + free_running_;
  const int64_t rows = batch * (1 + count * lanes) + (static_lane_ ? batch * count : 0);
  const int64_t positions = longest + config_.decoding.max_new_tokens;
  const ModelConfig& mc = model_.config();
  // Each row holds its written and its read keys and values (QuantizedKVCache), in the model's dtype.
  const double bytes = 4.0 * static_cast<double>(rows) * static_cast<double>(positions) *
                       static_cast<double>(mc.n_layers * mc.n_kv_heads * mc.head_dim) *
                       static_cast<double>(c10::elementSize(model_.dtype()));
  if (bytes <= static_cast<double>(*available)) return;
  fail("{}: the KV caches of one batch need {:.1f} GB but this machine has {:.1f} GB available: {} rows ({} prompts "
       "per batch (decoding.batch_prompts) x (1 reference + {} quantizers x {} lanes{})) x {} positions (the longest "
       "prompt's {} tokens + decoding.max_new_tokens {}) x {} layers x {} KV heads x head_dim {} x 4 (keys and "
       "values, written and read) x {} bytes; lower decoding.batch_prompts or decoding.max_new_tokens, or run "
       "fewer quantizers or lanes",
       config_.source_path, bytes / 1e9, static_cast<double>(*available) / 1e9, rows, batch, count, lanes,
       static_lane_ ? ", + 1 static lane each" : "", positions, longest, config_.decoding.max_new_tokens, mc.n_layers,
       mc.n_kv_heads, mc.head_dim, c10::elementSize(model_.dtype()));
}

// gpt-fast's shape: prefill, then decode one token at a time until every lane has ended.
std::vector<SampleResult> Engine::run(const std::vector<Prompt>& prompts, const Progress& progress) const {
  if (prompts.empty()) fail("no prompts to run");
  for (const Prompt& prompt : prompts) check_prompt_fits(prompt, model_.config(), config_.decoding.max_new_tokens);
  check_cache_memory(static_cast<int64_t>(prompts.size()), longest_prompt_tokens(prompts));
  const torch::Device device = model_.device();
  Batch batch(*this, prompts);

  auto start_time = std::chrono::steady_clock::now();
  torch::Tensor logits = batch.prefill();
  synchronize(device);
  const double prefill_seconds = seconds_since(start_time);

  start_time = std::chrono::steady_clock::now();
  const std::chrono::duration<double> report_every(config_.output.flush_seconds);
  auto last_report = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < config_.decoding.max_new_tokens; ++step) {
    const torch::Tensor step_logits = logits.select(1, 0).to(torch::kFloat32);  // [active rows, vocab]
    const std::vector<int64_t> next = batch.next_tokens(step_logits);
    batch.measure(step_logits, next);
    batch.record(next);
    if (progress && std::chrono::steady_clock::now() - last_report >= report_every) {
      progress(batch.results_so_far());
      last_report = std::chrono::steady_clock::now();
    }
    if (!batch.decoding() || step + 1 == config_.decoding.max_new_tokens) break;
    logits = batch.decode_one_token(next, step);
  }
  synchronize(device);
  const double decode_seconds = seconds_since(start_time);

  start_time = std::chrono::steady_clock::now();
  std::vector<SampleResult> results = batch.finish();
  const double metric_seconds = seconds_since(start_time);
  for (SampleResult& result : results) {
    result.prefill_seconds = prefill_seconds;
    result.decode_seconds = decode_seconds;
    result.metric_seconds = metric_seconds;
  }
  return results;
}

}  // namespace kvdrift
