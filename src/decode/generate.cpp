#include "decode/generate.h"

#include <algorithm>

#include "core/error.h"

namespace kvdrift {

std::vector<int64_t> stop_tokens(const LlamaModel& model, const Tokenizer* tokenizer) {
  std::vector<int64_t> stops = model.config().eos_token_ids;
  if (tokenizer) {
    const auto tokenizer_stops = tokenizer->eos_ids();
    stops.insert(stops.end(), tokenizer_stops.begin(), tokenizer_stops.end());
  }
  if (model.source().format == ModelFormat::Llama2c && model.config().bos_token_id >= 0)
    stops.push_back(model.config().bos_token_id);
  std::sort(stops.begin(), stops.end());
  stops.erase(std::unique(stops.begin(), stops.end()), stops.end());
  return stops;
}

void require_tokenizer_fits(const LlamaModel& model, const Tokenizer& tokenizer, const std::string& tokenizer_name) {
  if (tokenizer.vocab_size() > model.config().vocab_size)
    fail("{}: the tokenizer has {} tokens but the model's vocabulary has only {} ids", tokenizer_name,
         tokenizer.vocab_size(), model.config().vocab_size);
}

GenerateResult generate(const LlamaModel& model, const std::vector<int64_t>& prompt, int64_t steps, Sampler& sampler,
                        const std::vector<int64_t>& stop_ids,
                        const std::function<void(const torch::Tensor&)>& on_logits) {
  if (prompt.empty()) fail("the prompt has no tokens");
  if (steps < 0) fail("steps = {} must be >= 0", steps);
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + steps;
  if (capacity > model.config().max_seq_len)
    fail("prompt ({} tokens) + steps ({}) exceed the model's context of {} positions", prompt.size(), steps,
         model.config().max_seq_len);
  auto cache = model.make_cache(1, capacity);
  GenerateResult result{prompt, 0, false};
  auto input = torch::tensor(prompt, torch::kInt64).unsqueeze(0);
  int64_t position = 0;
  while (result.generated < steps) {
    auto logits = model.forward(input, position, cache, /*last_only=*/true);
    position += input.size(1);
    if (on_logits) on_logits(logits[0][0]);
    const int64_t token = sampler.next(logits[0][0]);
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
      result.stopped = true;
      break;
    }
    result.tokens.push_back(token);
    ++result.generated;
    input = torch::tensor({token}, torch::kInt64).unsqueeze(0);
  }
  return result;
}

}  // namespace kvdrift
