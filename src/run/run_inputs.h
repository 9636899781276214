#pragma once
// Loading what a run needs before it decodes, from its config: the model, the tokenizer and the
// prompts, each checked against the others.
#include <memory>
#include <vector>

#include "io/prompts.h"
#include "io/run_config.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {

// What a run loads from its config before the engine can start: the tokenizer (null when the config
// has none and needs none), the model on its device and dtype, and the prompts.
struct RunInputs {
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<LlamaModel> model;
  std::vector<Prompt> prompts;
};
RunInputs load_run_inputs(const RunConfig& config);

}  // namespace kvdrift
