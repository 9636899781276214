#pragma once
// The side-by-side decoding engine (SPEC §1): for each prompt, the full-precision reference and, for
// every quantizer, its teacher-forced, one-step and free-running lanes run as rows of one batch, one
// forward pass per step (a lane follows its reference, with no row of its own, until its first
// quantized read: decoding.share_until_onset); the static lanes attend over a quantized copy of the
// reference cache inside the same step. A one-step row is fed the reference's tokens and its cache holds the reference's keys
// and values (quantized by its method), so its error passes through every layer of a step but never
// into a later step (docs/engine.md). Several prompts may share the batch (decoding.batch_prompts), each at its own
// positions. Metrics (SPEC §3) are kept on the device and copied to the host in chunks: when the
// caller asks for progress (every output.flush_seconds) and once at the end of the batch.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/prompts.h"
#include "io/run_config.h"
#include "metrics/sample_result.h"
#include "model/llama.h"
#include "quant/quantizer.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {

// Fails unless the model can run `prompt`: some tokens, ids it has embeddings for, and room for
// max_new_tokens more in its context.
void check_prompt_fits(const Prompt& prompt, const ModelConfig& model, int64_t max_new_tokens);

class Engine {
 public:
  // Builds every quantizer of the config for the model's head_dim (errors name the quantizer).
  Engine(const LlamaModel& model, const RunConfig& config, const Tokenizer* tokenizer);
  // Called during decoding, at most every output.flush_seconds, with the samples so far: their tokens
  // and per-step arrays as decoded up to now (so a log can be written while they run). Token-scale
  // arrays, scalars and texts exist only in the results `run` returns.
  using Progress = std::function<void(const std::vector<SampleResult>& so_far)>;
  // Decodes `prompts` side by side in one batch (prompts of different lengths each at their own
  // positions); results in the same order.
  std::vector<SampleResult> run(const std::vector<Prompt>& prompts, const Progress& progress = {}) const;
  SampleResult run(const Prompt& prompt) const { return run(std::vector<Prompt>{prompt}).front(); }
  const std::vector<std::shared_ptr<const Quantizer>>& quantizers() const { return quantizers_; }
  // Refuses a batch of `prompts` prompts, the longest `longest_prompt` tokens, whose caches would not fit
  // in the machine's available memory (CPU), naming the settings that size them; run checks each batch
  // before allocating, and a caller can check the largest batch before it writes anything.
  void check_cache_memory(int64_t prompts, int64_t longest_prompt) const;

 private:
  class Batch;  // one call of run (engine.cpp)

  const LlamaModel& model_;
  const RunConfig& config_;
  const Tokenizer* tokenizer_;
  std::vector<std::shared_ptr<const Quantizer>> quantizers_;  // in config order
  std::vector<int64_t> end_ids_;  // the model's end tokens (lanes stop at them with decoding.stop_at_eos)
  bool static_lane_ = false, teacher_forced_ = false, one_step_ = false, free_running_ = false;
};

}  // namespace kvdrift
