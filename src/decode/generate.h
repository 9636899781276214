#pragma once
// Plain autoregressive generation with the full-precision cache: prefill the prompt, then one decode
// step per token.
#include <cstdint>
#include <vector>

#include "decode/sampler.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {

struct GenerateResult {
  std::vector<int64_t> tokens;  // prompt followed by the generated tokens
  int64_t generated = 0;
  bool stopped = false;  // a stop token ended generation before `steps`
};

// The tokens that end a generation: the tokenizer's end tokens (the model config's without one), and
// for llama2.c models BOS too, since their training documents are separated by BOS (as run.c stops).
std::vector<int64_t> stop_tokens(const LlamaModel& model, const Tokenizer* tokenizer);

// Generates up to `steps` tokens after `prompt` (non-empty). A generated token in `stop_ids` ends the
// generation and is not part of the result.
GenerateResult generate(const LlamaModel& model, const std::vector<int64_t>& prompt, int64_t steps, Sampler& sampler,
                        const std::vector<int64_t>& stop_ids);

}  // namespace kvdrift
