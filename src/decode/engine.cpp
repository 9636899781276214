#include "decode/engine.h"

#include <algorithm>
#include <chrono>
#include <optional>

#include "cache/quantized_kv_cache.h"
#include "core/device.h"
#include "core/error.h"
#include "decode/generate.h"
#include "decode/sampler.h"
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

// Token-scale error of rows `x` against `x_hat` [layers, kv_heads, positions, head_dim], mean over kv
// heads: [positions, layers] per component, and the worst-5% magnitude share over every row.
void log_token_scale(LaneResult& lane, const std::string& prefix, const torch::Tensor& x, const torch::Tensor& x_hat) {
  const auto error = metrics::token_scale_error(x, x_hat);  // [layers, kv_heads, positions]
  auto per_position = [](const torch::Tensor& t) { return to_host(t.mean(1).transpose(0, 1)); };
  lane.arrays[prefix + "/E_M"] = per_position(error.magnitude);
  lane.arrays[prefix + "/E_D"] = per_position(error.direction);
  lane.arrays[prefix + "/E_T"] = per_position(error.total);
  lane.arrays[prefix + "/norm_ratio"] = per_position(error.norm_ratio);
  const auto worst = metrics::worst_rows_magnitude_share(error);
  lane.scalars[prefix + "/worst5_magnitude_share"] = worst.of_sums;
  lane.scalars[prefix + "/worst5_magnitude_share_mean_of_ratios"] = worst.mean_of_ratios;
}

// Longest common prefix and outcome class of a free-running lane against the reference.
void classify(LaneResult& lane, const std::vector<int64_t>& reference, bool reference_stopped, bool lane_stopped) {
  const auto& tokens = lane.tokens;
  const size_t common = std::min(reference.size(), tokens.size());
  size_t prefix = 0;
  while (prefix < common && reference[prefix] == tokens[prefix]) ++prefix;
  lane.first_divergence = static_cast<int64_t>(prefix);
  if (prefix < common)
    lane.outcome = "token_mismatch";
  else if (reference.size() != tokens.size())
    lane.outcome = "length_only";
  else if (reference_stopped && lane_stopped)
    lane.outcome = "identical";
  else
    lane.outcome = "censored";  // no difference before the step limit
}

// Where the lanes that compare with a reference sit in the batch, on the device, so that indexing
// them costs no copy from the host at every step; rebuilt when lanes end. Entries of one list pair
// up: the i-th teacher-forced row compares with the reference at teacher_reference_slots[i].
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

// One prompt of a batch: its rows in the caches, its lanes' places in its result, and whether they
// are still decoding.
struct BatchSample {
  int64_t reference_row = 0;                                 // in the main cache
  std::vector<int64_t> teacher_rows, free_rows;              // main cache, per quantizer (when the lane runs)
  std::vector<int64_t> static_rows;                          // static cache, per quantizer
  std::vector<size_t> static_lane, teacher_lane, free_lane;  // per quantizer: index into result.lanes
  std::vector<bool> free_stopped;
  bool reference_active = true;
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

std::vector<std::shared_ptr<const Quantizer>> make_config_quantizers(const RunConfig& config,
                                                                    const ModelConfig& model) {
  std::vector<std::shared_ptr<const Quantizer>> quantizers;
  for (const auto& q : config.quantizers) {
    try {
      quantizers.push_back(make_quantizer(q.method, q.params, model.head_dim));
      // A sink the context cannot hold would leave the method unmeasured: nothing is ever quantized.
      const int64_t sink = quantizers.back()->policy(Role::Key).sink;
      if (sink > model.max_seq_len)
        fail("its full-precision sink of {} tokens is larger than the model's context of {} positions", sink,
             model.max_seq_len);
    } catch (const Error& e) {
      fail("{}{}: quantizers '{}': {}", config.source_path, q.line > 0 ? fmt::format(":{}", q.line) : "", q.name,
           e.what());
    }
  }
  return quantizers;
}

Engine::Engine(const LlamaModel& model, const RunConfig& config, const Tokenizer* tokenizer)
    : model_(model), config_(config), tokenizer_(tokenizer) {
  if (config_.decoding.prefill == "chunked" && config_.decoding.prefill_chunk > model_.config().max_seq_len)
    fail("{}: decoding.prefill_chunk = {} is larger than the model's context of {} positions", config_.source_path,
         config_.decoding.prefill_chunk, model_.config().max_seq_len);
  quantizers_ = make_config_quantizers(config_, model_.config());
  for (const auto& lane : config_.lanes) {
    static_lane_ = static_lane_ || lane == "static";
    teacher_forced_ = teacher_forced_ || lane == "teacher_forced";
    free_running_ = free_running_ || lane == "free_running";
  }
  end_ids_ = stop_tokens(model_, tokenizer_);
}

std::vector<SampleResult> Engine::run(const std::vector<Prompt>& prompts, const Progress& progress) const {
  const ModelConfig& mc = model_.config();
  const int64_t max_new = config_.decoding.max_new_tokens;
  if (prompts.empty()) fail("no prompts to run");
  int64_t longest = 0;
  for (const Prompt& prompt : prompts) {
    check_prompt_fits(prompt, mc, max_new);
    longest = std::max(longest, static_cast<int64_t>(prompt.tokens.size()));
  }
  const torch::Device device = model_.device();
  const int64_t layers = mc.n_layers;
  const size_t quantizer_count = quantizers_.size();
  const int64_t prompt_count = static_cast<int64_t>(prompts.size());
  std::vector<BatchSample> samples(prompts.size());
  std::vector<SampleResult> results(prompts.size());  // in the same order

  // Batch rows: the references first, then per quantizer, per prompt, its teacher-forced and
  // free-running rows (a quantizer's rows are consecutive: its blocks are quantized in one call).
  // Static cache rows: per quantizer, per prompt.
  std::vector<std::shared_ptr<const Quantizer>> row_quantizers(prompts.size(), make_quantizer("none", {}, mc.head_dim));
  std::vector<size_t> row_prompt(prompts.size());  // per row: its prompt
  for (int64_t p = 0; p < prompt_count; ++p) {
    row_prompt[p] = static_cast<size_t>(p);
    results[p].prompt = prompts[p];
    results[p].batch_prompts = prompt_count;
    samples[p].reference_row = p;
    samples[p].free_stopped.assign(quantizer_count, false);
  }
  auto add_row = [&](size_t q, size_t p) {
    row_quantizers.push_back(quantizers_[q]);
    row_prompt.push_back(p);
    return static_cast<int64_t>(row_quantizers.size()) - 1;
  };
  for (size_t q = 0; q < quantizer_count; ++q) {
    for (size_t p = 0; p < samples.size(); ++p) {
      if (teacher_forced_) samples[p].teacher_rows.push_back(add_row(q, p));
      if (free_running_) samples[p].free_rows.push_back(add_row(q, p));
      if (static_lane_) samples[p].static_rows.push_back(static_cast<int64_t>(q * samples.size() + p));
    }
  }
  const int64_t rows = static_cast<int64_t>(row_quantizers.size());
  QuantizedKVCache cache(row_quantizers, layers, mc.n_kv_heads, longest + max_new, mc.head_dim, model_.dtype(), device);
  std::unique_ptr<QuantizedKVCache> static_cache;
  if (static_lane_) {
    std::vector<std::shared_ptr<const Quantizer>> static_quantizers;
    for (const auto& q : quantizers_) static_quantizers.insert(static_quantizers.end(), prompts.size(), q);
    static_cache = std::make_unique<QuantizedKVCache>(static_quantizers, layers, mc.n_kv_heads, longest + max_new,
                                                      mc.head_dim, model_.dtype(), device);
  }
  // The lanes compared with a reference, as BatchIndex holds them, and which (prompt, quantizer) each
  // entry is: rebuilt when lanes end.
  BatchIndex index;
  std::vector<std::pair<size_t, size_t>> teacher_order, static_order;
  auto to_device = [&](const std::vector<int64_t>& values) {
    return torch::tensor(values, torch::TensorOptions().dtype(torch::kInt64)).to(device);
  };
  auto locate_lanes = [&] {
    std::vector<int64_t> teacher_slots, teacher_reference_slots;
    teacher_order.clear();
    static_order.clear();
    index.static_reference_slot_list.clear();
    for (size_t q = 0; q < quantizer_count; ++q) {  // in row order, so static entries follow its cache's slots
      for (size_t p = 0; p < samples.size(); ++p) {
        const BatchSample& sample = samples[p];
        if (!sample.reference_active) continue;
        const int64_t reference_slot = cache.slot(sample.reference_row);
        if (teacher_forced_) {
          teacher_slots.push_back(cache.slot(sample.teacher_rows[q]));
          teacher_reference_slots.push_back(reference_slot);
          teacher_order.emplace_back(p, q);
        }
        if (static_lane_) {
          index.static_reference_slot_list.push_back(reference_slot);
          static_order.emplace_back(p, q);
        }
      }
    }
    index.teacher_slots = to_device(teacher_slots);
    index.teacher_reference_slots = to_device(teacher_reference_slots);
    index.teacher_slot_list = teacher_slots;
    index.teacher_reference_slot_list = teacher_reference_slots;
    index.static_reference_slots = to_device(index.static_reference_slot_list);
  };
  locate_lanes();
  StepObserver observer(static_cache.get(), &index, layers);

  // Every sample's lanes in log order (per quantizer: static, teacher-forced, free-running), with their
  // per-step arrays declared empty so that a partial sample already names every array it will hold.
  const bool attention_error = config_.metrics.attention_error;
  // Every sampled lane draws from its own generator with the run's seed: equal logits, equal tokens.
  SamplingConfig sampling{config_.decoding.temperature, config_.decoding.top_p, config_.decoding.top_k,
                          config_.decoding.seed};
  const bool kl_sampled = sampling.reshapes_distribution();
  std::vector<std::string> teacher_arrays = {"kl", "top1_agree", "logp_delta"};
  if (kl_sampled) teacher_arrays.push_back("kl_sampled");
  for (size_t p = 0; p < samples.size(); ++p) {
    BatchSample& sample = samples[p];
    auto add_lane = [&](size_t q, const char* kind, std::vector<std::string> step_arrays, bool attention) {
      LaneResult lane;
      lane.quantizer = config_.quantizers[q].name;
      lane.lane = kind;
      for (const auto& name : step_arrays) lane.arrays[name] = {{}, {0}};
      if (attention && attention_error)
        for (const char* name : {"attn_rel_l2", "attn_cos"}) lane.arrays[name] = {{}, {0, layers}};
      results[p].lanes.push_back(std::move(lane));
      return results[p].lanes.size() - 1;
    };
    for (size_t q = 0; q < quantizer_count; ++q) {
      if (static_lane_) sample.static_lane.push_back(add_lane(q, "static", {}, true));
      if (teacher_forced_)
        sample.teacher_lane.push_back(add_lane(q, "teacher_forced", teacher_arrays, true));
      if (free_running_) sample.free_lane.push_back(add_lane(q, "free_running", {"match"}, false));
    }
  }

  // Prefill: every row's prompt, shorter prompts padded to the longest (no real query reads the padding),
  // in one forward (decoding.prefill: full) or in chunks of decoding.prefill_chunk positions, each
  // reading the earlier ones through the row's cache (chunked). A row whose prompt ended in an
  // earlier chunk writes nothing.
  auto start_time = std::chrono::steady_clock::now();
  auto prompt_tokens = torch::zeros({rows, longest}, torch::kInt64);
  std::vector<int64_t> prompt_lengths(rows);
  for (int64_t row = 0; row < rows; ++row) {
    const Prompt& prompt = prompts[row_prompt[row]];
    prompt_lengths[row] = static_cast<int64_t>(prompt.tokens.size());
    prompt_tokens[row].narrow(0, 0, prompt_lengths[row]).copy_(torch::tensor(prompt.tokens, torch::kInt64));
  }
  prompt_tokens = prompt_tokens.to(device);
  const int64_t chunk = config_.decoding.prefill == "chunked" ? config_.decoding.prefill_chunk : longest;
  torch::Tensor logits;  // [rows, 1, vocab], at each row's last prompt token
  for (int64_t begin = 0; begin < longest; begin += chunk) {
    const int64_t width = std::min(chunk, longest - begin);
    std::vector<int64_t> starts(rows), lengths(rows), ending;
    for (int64_t row = 0; row < rows; ++row) {
      starts[row] = std::min(begin, prompt_lengths[row]);
      lengths[row] = std::clamp<int64_t>(prompt_lengths[row] - begin, 0, width);
      if (prompt_lengths[row] > begin && prompt_lengths[row] <= begin + width) ending.push_back(row);
    }
    auto chunk_logits = model_.forward(prompt_tokens.narrow(1, begin, width),
                                       RowSpans(starts, lengths, width, device, Phase::Prefill), cache,
                                       /*last_only=*/true, &observer);
    if (!logits.defined()) {
      logits = chunk_logits;  // rows ending in a later chunk are overwritten there
    } else if (!ending.empty()) {
      const auto ended = to_device(ending);
      logits = logits.index_copy(0, ended, chunk_logits.index_select(0, ended));
    }
  }
  synchronize(device);
  const double prefill_seconds = seconds_since(start_time);
  start_time = std::chrono::steady_clock::now();

  std::vector<Sampler> samplers(rows, Sampler(sampling));
  // Per step: [teacher rows, 3 or 4] = kl, top1 agree, logp delta (, kl_sampled).
  std::vector<torch::Tensor> teacher_step_metrics;

  // Moves the metrics computed on the device since the last call into the lanes' host arrays, one
  // copy per kind of metric, and extends the free-running match flags. The device arrays hold the
  // rows of teacher_order / static_order: called before those change.
  auto drain_metrics = [&] {
    if (!teacher_step_metrics.empty()) {
      const auto metrics = torch::stack(teacher_step_metrics, 0).to(torch::kCPU);  // [steps, teacher rows, 3]
      teacher_step_metrics.clear();
      for (size_t i = 0; i < teacher_order.size(); ++i) {
        const auto [p, q] = teacher_order[i];
        auto& arrays = results[p].lanes[samples[p].teacher_lane[q]].arrays;
        const auto own = metrics.select(1, static_cast<int64_t>(i));
        append_rows(arrays["kl"], own.select(1, 0));
        append_rows(arrays["top1_agree"], own.select(1, 1));
        append_rows(arrays["logp_delta"], own.select(1, 2));
        if (kl_sampled) append_rows(arrays["kl_sampled"], own.select(1, 3));
      }
    }
    auto drain_attention = [&](std::vector<torch::Tensor>& rel_l2, std::vector<torch::Tensor>& cosine,
                               const std::vector<std::pair<size_t, size_t>>& order,
                               std::vector<size_t> BatchSample::*lane_of) {
      if (rel_l2.empty()) return;
      const auto rel_l2_host = torch::stack(rel_l2, 0).to(torch::kCPU);  // [logged steps, rows, layers]
      const auto cosine_host = torch::stack(cosine, 0).to(torch::kCPU);
      rel_l2.clear();
      cosine.clear();
      for (size_t i = 0; i < order.size(); ++i) {
        const auto [p, q] = order[i];
        auto& arrays = results[p].lanes[(samples[p].*lane_of)[q]].arrays;
        append_rows(arrays["attn_rel_l2"], rel_l2_host.select(1, static_cast<int64_t>(i)));
        append_rows(arrays["attn_cos"], cosine_host.select(1, static_cast<int64_t>(i)));
      }
    };
    drain_attention(observer.static_rel_l2, observer.static_cos, static_order, &BatchSample::static_lane);
    drain_attention(observer.teacher_rel_l2, observer.teacher_cos, teacher_order, &BatchSample::teacher_lane);
    for (size_t p = 0; p < samples.size(); ++p) {
      for (size_t lane_index : samples[p].free_lane) {
        LaneResult& lane = results[p].lanes[lane_index];
        HostArray& match = lane.arrays["match"];
        const auto& reference = results[p].reference_tokens;
        const size_t steps = std::min(lane.tokens.size(), reference.size());
        for (size_t s = match.values.size(); s < steps; ++s)
          match.values.push_back(lane.tokens[s] == reference[s] ? 1.0f : 0.0f);
        match.shape[0] = static_cast<int64_t>(match.values.size());
      }
    }
  };
  // A lane stops at an end token only with decoding.stop_at_eos; otherwise it decodes every step.
  auto is_stop = [&](int64_t token) {
    return config_.decoding.stop_at_eos && std::find(end_ids_.begin(), end_ids_.end(), token) != end_ids_.end();
  };
  auto any_reference_active = [&] {
    return std::any_of(samples.begin(), samples.end(), [](const BatchSample& s) { return s.reference_active; });
  };
  const std::chrono::duration<double> report_every(config_.output.flush_seconds);
  auto last_report = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < max_new; ++step) {
    // [active rows, vocab]: the rows of lanes still decoding, in batch order.
    auto step_logits = logits.select(1, 0).to(torch::kFloat32);
    // One host read per step: the tokens decide what every lane feeds next and when it stops.
    std::vector<int64_t> next(rows, 0);
    if (sampling.temperature == 0.0) {
      auto host = step_logits.argmax(-1).to(torch::kCPU);
      for (int64_t r = 0; r < rows; ++r)
        if (cache.slot(r) >= 0) next[r] = host[cache.slot(r)].item<int64_t>();
    } else {
      for (int64_t r = 0; r < rows; ++r)
        if (cache.slot(r) >= 0) next[r] = samplers[r].next(step_logits[cache.slot(r)]);
    }
    if (!teacher_order.empty()) {
      // In float64: KL of nearly equal distributions must not come out negative from rounding.
      std::vector<int64_t> reference_tokens;
      for (const auto& [p, q] : teacher_order) reference_tokens.push_back(next[samples[p].reference_row]);
      const auto reference_token = to_device(reference_tokens).unsqueeze(1);
      auto reference_logits = step_logits.index_select(0, index.teacher_reference_slots);
      auto lane_logits = step_logits.index_select(0, index.teacher_slots);
      auto log_ref = torch::log_softmax(reference_logits.to(torch::kFloat64), -1);
      auto log_lane = torch::log_softmax(lane_logits.to(torch::kFloat64), -1);
      auto kl = (log_ref.exp() * (log_ref - log_lane)).sum(-1);
      auto agree = (lane_logits.argmax(-1) == reference_logits.argmax(-1)).to(torch::kFloat32);
      auto delta = (log_ref.gather(1, reference_token) - log_lane.gather(1, reference_token)).squeeze(1);
      std::vector<torch::Tensor> columns = {kl.to(torch::kFloat32), agree, delta.to(torch::kFloat32)};
      if (kl_sampled) {
        // Between the distributions the lanes sample from, on the host in float64 (the samplers' own
        // definition); +inf where the reference keeps a token the lane cuts.
        const auto host_logits = step_logits.to(torch::kCPU);
        std::map<int64_t, SamplingDistribution> references;  // by batch slot
        std::vector<float> divergences;
        for (size_t i = 0; i < index.teacher_slot_list.size(); ++i) {
          const int64_t slot = index.teacher_reference_slot_list[i];
          auto reference = references.find(slot);
          if (reference == references.end())
            reference = references.emplace(slot, sampling_distribution(host_logits[slot], sampling)).first;
          const auto lane = sampling_distribution(host_logits[index.teacher_slot_list[i]], sampling);
          divergences.push_back(static_cast<float>(kl_divergence(reference->second, lane, host_logits.size(1))));
        }
        columns.push_back(torch::tensor(divergences).to(device));
      }
      teacher_step_metrics.push_back(torch::stack(columns, 1));
    }
    // Lanes that end leave the batch: a reference with its teacher-forced rows (and static lanes),
    // a free-running row alone.
    std::vector<int64_t> ended_rows, ended_static_rows;
    for (size_t p = 0; p < samples.size(); ++p) {
      BatchSample& sample = samples[p];
      SampleResult& result = results[p];
      if (sample.reference_active) {
        const int64_t token = next[sample.reference_row];
        result.reference_tokens.push_back(token);
        if (is_stop(token)) {
          result.reference_stopped = true;
          sample.reference_active = false;
          ended_rows.push_back(sample.reference_row);
          ended_rows.insert(ended_rows.end(), sample.teacher_rows.begin(), sample.teacher_rows.end());
          ended_static_rows.insert(ended_static_rows.end(), sample.static_rows.begin(), sample.static_rows.end());
        }
      }
      for (size_t q = 0; q < sample.free_rows.size(); ++q) {
        if (sample.free_stopped[q]) continue;
        const int64_t token = next[sample.free_rows[q]];
        result.lanes[sample.free_lane[q]].tokens.push_back(token);
        if (is_stop(token)) {
          sample.free_stopped[q] = true;
          ended_rows.push_back(sample.free_rows[q]);
        }
      }
    }
    if (!ended_rows.empty()) {
      drain_metrics();
      for (int64_t row : ended_rows) cache.retire(row);
      for (int64_t row : ended_static_rows) static_cache->retire(row);
      locate_lanes();
    }
    if (progress && std::chrono::steady_clock::now() - last_report >= report_every) {
      drain_metrics();
      progress(results);
      last_report = std::chrono::steady_clock::now();
    }
    if (cache.active_rows() == 0 || step + 1 == max_new) break;
    // Teacher-forced rows read their reference's token; free-running rows their own. Each row
    // writes the position after its prompt's last one.
    std::vector<int64_t> inputs(cache.active_rows()), starts(cache.active_rows());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t slot = cache.slot(r);
      if (slot < 0) continue;
      inputs[slot] = next[r];
      starts[slot] = prompt_lengths[r] + step;
    }
    for (const BatchSample& sample : samples)
      for (int64_t row : sample.teacher_rows)
        if (cache.slot(row) >= 0) inputs[cache.slot(row)] = next[sample.reference_row];
    const bool references = any_reference_active();
    const bool logged = step % config_.metrics.layer_stride == 0 && references;
    observer.recording = logged && attention_error;
    for (size_t p = 0; p < samples.size(); ++p)
      if (logged && samples[p].reference_active) results[p].logged_steps.push_back(step + 1);
    for (int64_t r = 0; r < rows; ++r)
      if (cache.slot(r) >= 0) ++results[row_prompt[r]].decode_row_steps;
    // The observer needs some reference in the batch; the static lanes end with theirs.
    logits = model_.forward(torch::tensor(inputs, torch::kInt64).unsqueeze(1).to(device),
                            RowSpans(starts, std::vector<int64_t>(starts.size(), 1), 1, device, Phase::Decode), cache,
                            /*last_only=*/true, references ? &observer : nullptr);
  }
  synchronize(device);
  const double decode_seconds = seconds_since(start_time);
  start_time = std::chrono::steady_clock::now();
  drain_metrics();

  // Token-scale errors, from the caches: each row over the positions it holds (a lane that ended
  // holds those up to its end).
  auto account = [&](LaneResult& lane, const QuantizedKVCache& c, int64_t row, int64_t reference_row, bool drift) {
    if (config_.metrics.token_scale) {
      for (Role role : {Role::Key, Role::Value}) {
        const std::string name = role_name(role);
        const auto written = c.row_contents(role, row, /*read=*/false);  // [layers, kv_heads, positions, head_dim]
        log_token_scale(lane, name + "/quant", written, c.row_contents(role, row, /*read=*/true));
        if (drift) {  // over the positions both the lane and the reference hold
          const auto reference = cache.row_contents(role, reference_row, /*read=*/false);
          const int64_t common = std::min(reference.size(2), written.size(2));
          log_token_scale(lane, name + "/drift", reference.narrow(2, 0, common), written.narrow(2, 0, common));
        }
      }
    }
    lane.scalars["bits_per_element"] = c.bits_per_element(row);
    lane.scalars["fraction_quantized"] = c.fraction_quantized(row);
    lane.scalars["quantize_seconds"] = c.quantize_seconds(row);
  };
  // Decoded texts leave the end token out; a reply ends at the first one.
  auto decode = [&](const std::vector<int64_t>& tokens, bool stopped) {
    return tokenizer_->decode({tokens.begin(), tokens.end() - (stopped ? 1 : 0)});
  };
  auto reply = [&](const std::vector<int64_t>& tokens) {
    const auto end = std::find_first_of(tokens.begin(), tokens.end(), end_ids_.begin(), end_ids_.end());
    return tokenizer_->decode({tokens.begin(), end});
  };
  for (size_t p = 0; p < samples.size(); ++p) {
    const BatchSample& sample = samples[p];
    SampleResult& result = results[p];
    for (size_t q = 0; q < quantizer_count; ++q) {
      if (static_lane_)
        account(result.lanes[sample.static_lane[q]], *static_cache, sample.static_rows[q], sample.reference_row, false);
      if (teacher_forced_)
        account(result.lanes[sample.teacher_lane[q]], cache, sample.teacher_rows[q], sample.reference_row, true);
      if (free_running_) {
        LaneResult& lane = result.lanes[sample.free_lane[q]];
        classify(lane, result.reference_tokens, result.reference_stopped, sample.free_stopped[q]);
        account(lane, cache, sample.free_rows[q], sample.reference_row, true);
        if (tokenizer_) {
          lane.text = decode(lane.tokens, sample.free_stopped[q]);
          lane.reply = reply(lane.tokens);
        }
      }
    }
    if (tokenizer_) {
      result.reference_continuation = decode(result.reference_tokens, result.reference_stopped);
      result.reference_reply = reply(result.reference_tokens);
      std::vector<int64_t> all = result.prompt.tokens;
      all.insert(all.end(), result.reference_tokens.begin(), result.reference_tokens.end());
      result.reference_text = decode(all, result.reference_stopped);
    }
  }
  const double metric_seconds = seconds_since(start_time);
  for (SampleResult& result : results) {
    result.prefill_seconds = prefill_seconds;
    result.decode_seconds = decode_seconds;
    result.metric_seconds = metric_seconds;
  }
  return results;
}

}  // namespace kvdrift
