#include "run/run_inputs.h"

#include <optional>

#include "core/device.h"
#include "core/error.h"
#include "decode/engine.h"
#include "decode/generate.h"
#include "model/checkpoint.h"
#include "tokenizer/chat_template.h"

namespace kvdrift {

RunInputs load_run_inputs(const RunConfig& config) {
  RunInputs inputs;
  const auto device = parse_device(config.model.device);
  const auto dtype = parse_dtype(config.model.dtype);
  inputs.tokenizer = tokenizer_for_model(config.model.tokenizer, config.model.path);
  inputs.model = std::make_unique<LlamaModel>(load_model(config.model.path, device, dtype, config.model.seed));
  std::optional<ChatTemplate> chat;
  if (config.prompts.chat_template) {
    try {
      chat = chat_template_for_model(config.model.tokenizer, config.model.path);
    } catch (const Error& e) {
      fail("{}: prompts.chat_template: {}", config.source_path, e.what());
    }
  }
  inputs.prompts = load_prompts(config.prompts, inputs.tokenizer.get(), chat ? &*chat : nullptr);
  // Checked here, before a run touches its log: an id the model has no embedding for would fail deep
  // inside LibTorch ("index out of range"), and a prompt too long only when its batch starts.
  if (inputs.tokenizer) require_tokenizer_fits(*inputs.model, *inputs.tokenizer, config.source_path);
  for (const auto& prompt : inputs.prompts) {
    try {
      check_prompt_fits(prompt, inputs.model->config(), config.decoding.max_new_tokens);
    } catch (const Error& e) {
      fail("{}: {}", config.source_path, e.what());
    }
  }
  return inputs;
}

}  // namespace kvdrift
