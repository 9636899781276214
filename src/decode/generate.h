#pragma once
// Plain autoregressive generation with the full-precision cache: prefill the prompt, then one decode
// step per token.
#include <cstdint>
#include <functional>
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

// The tokens that end a generation: the model config's eos_token_id(s) and the tokenizer's end tokens
// (its </s>, <|endoftext|>, <|im_end|>, <|eot_id|>, ...), and for llama2.c models BOS too, since
// their training documents are separated by BOS (as run.c stops). Sorted, without repeats.
std::vector<int64_t> stop_tokens(const LlamaModel& model, const Tokenizer* tokenizer);

// Fails, naming `tokenizer_name`, when the tokenizer can produce ids the model has no embedding for.
void require_tokenizer_fits(const LlamaModel& model, const Tokenizer& tokenizer, const std::string& tokenizer_name);

// Generates up to `steps` tokens after `prompt` (non-empty). A generated token in `stop_ids` ends the
// generation and is not part of the result. `on_logits`, when given, sees each step's logits [vocab]
// before its token is drawn (the step that draws a stop token included).
GenerateResult generate(const LlamaModel& model, const std::vector<int64_t>& prompt, int64_t steps, Sampler& sampler,
                        const std::vector<int64_t>& stop_ids,
                        const std::function<void(const torch::Tensor&)>& on_logits = {});

}  // namespace kvdrift
