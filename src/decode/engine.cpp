#include "decode/engine.h"

#include <algorithm>
#include <chrono>

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

// Relative L2 error and cosine of attention outputs [rows, heads, 1, head_dim] against the reference
// output [1, heads, 1, head_dim], one value per row.
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
  lane.scalars[prefix + "/worst5_magnitude_share"] = metrics::worst_rows_magnitude_share(error);
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

// Per-layer work inside the forward pass: the static lanes' attention over the quantized copy of the
// reference cache, and the attention-output error of the teacher-forced rows. Only in forwards
// where the reference is batch row 0.
class StepObserver final : public AttentionObserver {
 public:
  // `teacher_slots`: the teacher-forced rows' batch rows on the device, kept current by the engine.
  StepObserver(QuantizedKVCache* static_cache, const torch::Tensor* teacher_slots, int64_t layers)
      : static_cache_(static_cache), teacher_slots_(teacher_slots), layers_(layers) {}

  // Decode steps whose per-layer errors are recorded (the metrics' layer stride).
  bool recording = false;
  std::vector<torch::Tensor> static_rel_l2, static_cos, teacher_rel_l2, teacher_cos;  // per logged step: [rows, layers]

  void observe(int64_t layer, int64_t start, const torch::Tensor& q, const torch::Tensor& keys,
               const torch::Tensor& values, const torch::Tensor& output) override {
    const bool decode = q.size(2) == 1;
    if (layer == 0 && decode && recording) {
      static_layers_.clear();
      teacher_layers_.clear();
    }
    auto reference_output = output.narrow(0, 0, 1);
    if (static_cache_) {
      const int64_t rows = static_cache_->active_rows();
      auto [cached_keys, cached_values] =
          static_cache_->update(layer, start, keys.narrow(0, 0, 1).expand({rows, -1, -1, -1}),
                                values.narrow(0, 0, 1).expand({rows, -1, -1, -1}));
      if (decode && recording) {
        auto static_output =
            ops::attention(q.narrow(0, 0, 1).expand({rows, -1, -1, -1}), cached_keys, cached_values, start);
        static_layers_.push_back(attention_error(static_output, reference_output));
      }
    }
    if (decode && recording && teacher_slots_->numel() > 0)
      teacher_layers_.push_back(attention_error(output.index_select(0, *teacher_slots_), reference_output));
    if (layer == layers_ - 1 && decode && recording) {
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
  const torch::Tensor* teacher_slots_;
  int64_t layers_;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> static_layers_, teacher_layers_;
};

}  // namespace

RunInputs load_run_inputs(const RunConfig& config) {
  RunInputs inputs;
  const auto device = parse_device(config.model.device);
  const auto dtype = parse_dtype(config.model.dtype);
  inputs.tokenizer = tokenizer_for_model(config.model.tokenizer, config.model.path);
  inputs.model = std::make_unique<LlamaModel>(load_model(config.model.path, device, dtype, config.model.seed));
  inputs.prompts = load_prompts(config.prompts, inputs.tokenizer.get());
  return inputs;
}

Engine::Engine(const LlamaModel& model, const RunConfig& config, const Tokenizer* tokenizer)
    : model_(model), config_(config), tokenizer_(tokenizer) {
  for (const auto& q : config_.quantizers) {
    try {
      quantizers_.push_back(make_quantizer(q.method, q.params, model_.config().head_dim));
    } catch (const Error& e) {
      fail("{}{}: quantizers '{}': {}", config_.source_path, q.line > 0 ? fmt::format(":{}", q.line) : "", q.name,
           e.what());
    }
  }
  if (config_.decoding.batch_prompts != 1)
    fail("{}: decoding.batch_prompts = {}: several prompts per batch are not implemented yet (use 1)",
         config_.source_path, config_.decoding.batch_prompts);
  for (const auto& lane : config_.lanes) {
    static_lane_ = static_lane_ || lane == "static";
    teacher_forced_ = teacher_forced_ || lane == "teacher_forced";
    free_running_ = free_running_ || lane == "free_running";
  }
  if (config_.decoding.stop_at_eos) stop_ids_ = stop_tokens(model_, tokenizer_);
}

SampleResult Engine::run(const Prompt& prompt, const Progress& progress) const {
  const ModelConfig& mc = model_.config();
  const int64_t n = static_cast<int64_t>(prompt.tokens.size());
  const int64_t max_new = config_.decoding.max_new_tokens;
  if (n == 0) fail("prompt '{}' has no tokens", prompt.id);
  if (n + max_new > mc.max_seq_len)
    fail("prompt '{}' ({} tokens) + max_new_tokens ({}) exceed the model's context of {} positions", prompt.id, n,
         max_new, mc.max_seq_len);
  const torch::Device device = model_.device();
  const int64_t layers = mc.n_layers;
  const size_t quantizer_count = quantizers_.size();

  // Batch rows: 0 = reference, then per quantizer its teacher-forced and free-running rows.
  std::vector<std::shared_ptr<const Quantizer>> row_quantizers = {make_quantizer("none", {}, mc.head_dim)};
  std::vector<int64_t> teacher_rows, free_rows;
  for (const auto& q : quantizers_) {
    if (teacher_forced_) {
      teacher_rows.push_back(static_cast<int64_t>(row_quantizers.size()));
      row_quantizers.push_back(q);
    }
    if (free_running_) {
      free_rows.push_back(static_cast<int64_t>(row_quantizers.size()));
      row_quantizers.push_back(q);
    }
  }
  const int64_t rows = static_cast<int64_t>(row_quantizers.size());
  QuantizedKVCache cache(row_quantizers, layers, mc.n_kv_heads, n + max_new, mc.head_dim, model_.dtype(), device);
  std::unique_ptr<QuantizedKVCache> static_cache;
  if (static_lane_)
    static_cache = std::make_unique<QuantizedKVCache>(quantizers_, layers, mc.n_kv_heads, n + max_new, mc.head_dim,
                                                      model_.dtype(), device);
  // The teacher-forced rows' places in the batch, on the device: rebuilt only when lanes end, so
  // indexing them does not copy from the host at every step.
  torch::Tensor teacher_slots;
  auto locate_teacher_rows = [&] {
    std::vector<int64_t> slots;
    for (int64_t row : teacher_rows) slots.push_back(cache.slot(row));
    teacher_slots = torch::tensor(slots, torch::TensorOptions().dtype(torch::kInt64)).to(device);
  };
  locate_teacher_rows();
  StepObserver observer(static_cache.get(), &teacher_slots, layers);

  // The lanes in log order (per quantizer: static, teacher-forced, free-running), with their per-step
  // arrays declared empty so that a partial sample already names every array it will hold.
  SampleResult result;
  result.prompt = prompt;
  std::vector<size_t> static_lane(quantizer_count), teacher_lane(quantizer_count), free_lane(quantizer_count);
  const bool attention_error = config_.metrics.attention_error;
  auto add_lane = [&](size_t q, const char* kind, std::vector<std::string> step_arrays, bool attention) {
    LaneResult lane;
    lane.quantizer = config_.quantizers[q].name;
    lane.lane = kind;
    for (const auto& name : step_arrays) lane.arrays[name] = {{}, {0}};
    if (attention && attention_error)
      for (const char* name : {"attn_rel_l2", "attn_cos"}) lane.arrays[name] = {{}, {0, layers}};
    result.lanes.push_back(std::move(lane));
    return result.lanes.size() - 1;
  };
  for (size_t q = 0; q < quantizer_count; ++q) {
    if (static_lane_) static_lane[q] = add_lane(q, "static", {}, true);
    if (teacher_forced_) teacher_lane[q] = add_lane(q, "teacher_forced", {"kl", "top1_agree", "logp_delta"}, true);
    if (free_running_) free_lane[q] = add_lane(q, "free_running", {"match"}, false);
  }

  auto start_time = std::chrono::steady_clock::now();
  auto prompt_tokens = torch::tensor(prompt.tokens, torch::kInt64).unsqueeze(0).expand({rows, n}).contiguous();
  auto logits = model_.forward(prompt_tokens.to(device), 0, cache, /*last_only=*/true, &observer);
  synchronize(device);
  result.prefill_seconds = seconds_since(start_time);
  start_time = std::chrono::steady_clock::now();

  // Every sampled lane draws from its own generator with the run's seed: equal logits, equal tokens.
  SamplingConfig sampling{config_.decoding.temperature, config_.decoding.top_p, config_.decoding.top_k,
                          config_.decoding.seed};
  std::vector<Sampler> samplers(rows, Sampler(sampling));
  std::vector<bool> free_stopped(quantizer_count, false);
  std::vector<torch::Tensor> teacher_step_metrics;  // per step: [teacher rows, 3] = kl, top1 agree, logp delta

  // Moves the metrics computed on the device since the last call into the lanes' host arrays, one
  // copy per kind of metric, and extends the free-running match flags.
  auto drain_metrics = [&] {
    if (!teacher_step_metrics.empty()) {
      const auto metrics = torch::stack(teacher_step_metrics, 0).to(torch::kCPU);  // [steps, teacher rows, 3]
      teacher_step_metrics.clear();
      for (size_t q = 0; q < quantizer_count; ++q) {
        auto& arrays = result.lanes[teacher_lane[q]].arrays;
        const auto own = metrics.select(1, static_cast<int64_t>(q));
        append_rows(arrays["kl"], own.select(1, 0));
        append_rows(arrays["top1_agree"], own.select(1, 1));
        append_rows(arrays["logp_delta"], own.select(1, 2));
      }
    }
    auto drain_attention = [&](std::vector<torch::Tensor>& rel_l2, std::vector<torch::Tensor>& cosine,
                               const std::vector<size_t>& lane_of) {
      if (rel_l2.empty()) return;
      const auto rel_l2_host = torch::stack(rel_l2, 0).to(torch::kCPU);  // [logged steps, rows, layers]
      const auto cosine_host = torch::stack(cosine, 0).to(torch::kCPU);
      rel_l2.clear();
      cosine.clear();
      for (size_t q = 0; q < quantizer_count; ++q) {
        auto& arrays = result.lanes[lane_of[q]].arrays;
        append_rows(arrays["attn_rel_l2"], rel_l2_host.select(1, static_cast<int64_t>(q)));
        append_rows(arrays["attn_cos"], cosine_host.select(1, static_cast<int64_t>(q)));
      }
    };
    drain_attention(observer.static_rel_l2, observer.static_cos, static_lane);
    drain_attention(observer.teacher_rel_l2, observer.teacher_cos, teacher_lane);
    if (free_running_) {
      for (size_t q = 0; q < quantizer_count; ++q) {
        LaneResult& lane = result.lanes[free_lane[q]];
        HostArray& match = lane.arrays["match"];
        const size_t steps = std::min(lane.tokens.size(), result.reference_tokens.size());
        for (size_t s = match.values.size(); s < steps; ++s)
          match.values.push_back(lane.tokens[s] == result.reference_tokens[s] ? 1.0f : 0.0f);
        match.shape[0] = static_cast<int64_t>(match.values.size());
      }
    }
  };

  auto is_stop = [&](int64_t token) { return std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end(); };
  const std::chrono::duration<double> report_every(config_.output.flush_seconds);
  auto last_report = std::chrono::steady_clock::now();
  bool reference_active = true;
  for (int64_t step = 0; step < max_new; ++step) {
    // [active rows, vocab]: the rows of lanes still decoding, in batch order; the reference first.
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
    if (reference_active) {
      const int64_t reference_token = next[0];
      if (!teacher_rows.empty()) {
        // In float64: KL of nearly equal distributions must not come out negative from rounding.
        auto log_ref = torch::log_softmax(step_logits.narrow(0, 0, 1).to(torch::kFloat64), -1);
        auto lane_logits = step_logits.index_select(0, teacher_slots);
        auto log_lane = torch::log_softmax(lane_logits.to(torch::kFloat64), -1);
        auto kl = (log_ref.exp() * (log_ref - log_lane)).sum(-1);
        auto agree = (lane_logits.argmax(-1) == step_logits[0].argmax()).to(torch::kFloat32);
        auto delta = log_ref.select(1, reference_token) - log_lane.select(1, reference_token);
        teacher_step_metrics.push_back(torch::stack({kl.to(torch::kFloat32), agree, delta.to(torch::kFloat32)}, 1));
      }
      result.reference_tokens.push_back(reference_token);
      if (is_stop(reference_token)) {
        result.reference_stopped = true;
        reference_active = false;
        // Ended lanes leave the batch: the reference and the teacher-forced rows that follow it.
        cache.retire(0);
        for (int64_t row : teacher_rows) cache.retire(row);
      }
    }
    for (size_t q = 0; q < free_rows.size(); ++q) {
      if (free_stopped[q]) continue;
      result.lanes[free_lane[q]].tokens.push_back(next[free_rows[q]]);
      if (is_stop(next[free_rows[q]])) {
        free_stopped[q] = true;
        cache.retire(free_rows[q]);
        if (reference_active) locate_teacher_rows();
      }
    }
    if (progress && std::chrono::steady_clock::now() - last_report >= report_every) {
      drain_metrics();
      progress(result);
      last_report = std::chrono::steady_clock::now();
    }
    const bool any_free = std::find(free_stopped.begin(), free_stopped.end(), false) != free_stopped.end();
    if ((!reference_active && !any_free) || step + 1 == max_new) break;
    // Teacher-forced rows read the reference's token; free-running rows their own.
    std::vector<int64_t> inputs(cache.active_rows());
    for (int64_t r = 0; r < rows; ++r)
      if (cache.slot(r) >= 0) inputs[cache.slot(r)] = next[r];
    for (int64_t row : teacher_rows)
      if (cache.slot(row) >= 0) inputs[cache.slot(row)] = next[0];
    const bool logged = step % config_.metrics.layer_stride == 0 && reference_active;
    observer.recording = logged && attention_error;
    if (logged) result.logged_steps.push_back(step + 1);
    result.decode_row_steps += cache.active_rows();
    // The observer needs the reference in the batch (row 0); the static lanes end with it.
    logits = model_.forward(torch::tensor(inputs, torch::kInt64).unsqueeze(1).to(device), n + step, cache,
                            /*last_only=*/true, reference_active ? &observer : nullptr);
  }
  synchronize(device);
  result.decode_seconds = seconds_since(start_time);
  start_time = std::chrono::steady_clock::now();
  drain_metrics();

  // Token-scale errors, from the caches: each row over the positions it holds (a lane that ended
  // holds those up to its end).
  auto account = [&](size_t lane_index, const QuantizedKVCache& c, int64_t row, bool drift) {
    LaneResult& lane = result.lanes[lane_index];
    if (config_.metrics.token_scale) {
      for (Role role : {Role::Key, Role::Value}) {
        const std::string name = role_name(role);
        const auto written = c.row_contents(role, row, /*read=*/false);  // [layers, kv_heads, positions, head_dim]
        log_token_scale(lane, name + "/quant", written, c.row_contents(role, row, /*read=*/true));
        if (drift) {  // over the positions both the lane and the reference hold
          const auto reference = cache.row_contents(role, 0, /*read=*/false);
          const int64_t common = std::min(reference.size(2), written.size(2));
          log_token_scale(lane, name + "/drift", reference.narrow(2, 0, common), written.narrow(2, 0, common));
        }
      }
    }
    lane.scalars["bits_per_element"] = c.bits_per_element(row);
    lane.scalars["fraction_quantized"] = c.fraction_quantized(row);
    lane.scalars["quantize_seconds"] = c.quantize_seconds(row);
  };
  // Decoded texts leave the end token out.
  auto decode = [&](const std::vector<int64_t>& tokens, bool stopped) {
    return tokenizer_->decode({tokens.begin(), tokens.end() - (stopped ? 1 : 0)});
  };
  for (size_t q = 0; q < quantizer_count; ++q) {
    if (static_lane_) account(static_lane[q], *static_cache, static_cast<int64_t>(q), false);
    if (teacher_forced_) account(teacher_lane[q], cache, teacher_rows[q], true);
    if (free_running_) {
      LaneResult& lane = result.lanes[free_lane[q]];
      classify(lane, result.reference_tokens, result.reference_stopped, free_stopped[q]);
      account(free_lane[q], cache, free_rows[q], true);
      if (tokenizer_) lane.text = decode(lane.tokens, free_stopped[q]);
    }
  }
  if (tokenizer_) {
    result.reference_continuation = decode(result.reference_tokens, result.reference_stopped);
    std::vector<int64_t> all = prompt.tokens;
    all.insert(all.end(), result.reference_tokens.begin(), result.reference_tokens.end());
    result.reference_text = decode(all, result.reference_stopped);
  }
  result.metric_seconds = seconds_since(start_time);
  return result;
}

}  // namespace kvdrift
