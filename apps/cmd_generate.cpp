#include <spdlog/spdlog.h>

#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/out_of_memory.h"
#include "core/output_path.h"
#include "decode/generate.h"
#include "io/hdf5.h"
#include "model/checkpoint.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift::cli {

namespace {

struct GenerateOptions {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  int64_t steps = 256;
  SamplingConfig sampling;
  std::string device = "cpu";
  std::string dtype = "float32";
  bool chat = false;                  // wrap --prompt as a user turn in the model's chat template
  std::optional<std::string> system;  // its system turn (default: the template's)
  bool json = false;                  // one JSON object (ids and text) instead of the text
  std::optional<std::string> logits_path;  // HDF5 file for every step's logits
  bool overwrite = false;                  // may replace an existing logits file
};

void run_generate(const GenerateOptions& options) {
  const auto device = parse_device(options.device);
  const auto dtype = parse_dtype(options.dtype);
  options.sampling.validate();
  auto tokenizer = tokenizer_for_model(options.tokenizer, options.model);
  if (!tokenizer)
    fail("no tokenizer: pass --tokenizer FILE (the model '{}' has no tokenizer.json beside it)", options.model);
  auto model = load_model(options.model, device, dtype, options.sampling.seed);
  require_tokenizer_fits(model, *tokenizer, options.tokenizer.empty() ? options.model : options.tokenizer);
  if (options.system && !options.chat) fail("--system needs --chat");
  if (options.logits_path) {
    std::vector<std::string> inputs = {options.model, options.tokenizer};  // a model directory: every file in it
    if (options.chat)
      for (const std::string& file : chat_template_files(options.tokenizer, options.model)) inputs.push_back(file);
    check_output_path("--logits", *options.logits_path, inputs, options.overwrite);
  }
  std::string prompt_text = options.prompt;
  if (options.chat) prompt_text = chat_template_for_model(options.tokenizer, options.model).render(prompt_text, options.system);
  // A chat template writes the model's own special tokens; a plain prompt gets BOS when there is one.
  const bool add_bos = !options.chat && tokenizer->bos_id().has_value();
  auto prompt = tokenizer->encode(prompt_text, add_bos);
  if (prompt.empty()) fail("the prompt encodes to no tokens and the tokenizer has no BOS token");
  const auto stop_ids = stop_tokens(model, tokenizer.get());
  spdlog::info("model {} ({}, {} layers, dim {}), {} prompt tokens, {} steps on {} in {}", options.model,
               model_format_name(model.source().format), model.config().n_layers, model.config().dim, prompt.size(), options.steps,
               describe_device(device), dtype_name(dtype));
  Sampler sampler(options.sampling);
  std::vector<float> logits;  // step-major [steps, vocab], float32
  std::function<void(const torch::Tensor&)> keep_logits;
  if (options.logits_path) {
    keep_logits = [&logits](const torch::Tensor& step) {
      const auto values = step.to(torch::kCPU, torch::kFloat32).contiguous();
      logits.insert(logits.end(), values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
    };
  }
  const MemoryScope memory(fmt::format("--steps {}{}, a prompt of {} tokens", options.steps,
                                       options.logits_path ? " (--logits keeps every step's)" : "", prompt.size()));
  const auto result = generate(model, prompt, options.steps, sampler, stop_ids, keep_logits);
  if (options.logits_path) {
    const auto vocab = static_cast<hsize_t>(model.config().vocab_size);
    h5::write_new_file(*options.logits_path, options.overwrite,
                       [&](h5::File& file) { file.write("logits", logits, {logits.size() / vocab, vocab}); });
  }
  if (options.json) {
    const std::vector<int64_t> generated(result.tokens.end() - result.generated, result.tokens.end());
    // Byte-level tokens may stop inside a character: JSON text cannot hold such bytes, so they become
    // U+FFFD (the ids say exactly what was generated).
    std::cout << nlohmann::json{{"prompt_ids", prompt}, {"ids", generated}, {"text", tokenizer->decode(generated)},
                                {"stopped", result.stopped}}
                     .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
              << std::endl;
  } else {
    std::cout << tokenizer->decode(result.tokens) << std::endl;
  }
  spdlog::info("generated {} tokens{}", result.generated, result.stopped ? " (stopped at an end token)" : "");
}

}  // namespace

void register_generate(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<GenerateOptions>();
  auto* sub = app.add_subcommand("generate", "decode text with the full-precision model; the text goes to stdout");
  sub->add_option("--model", options->model, "llama2.c .bin file, HF directory, or synthetic:NAME")->required();
  sub->add_option("--tokenizer", options->tokenizer, "tokenizer.bin (llama2.c) or tokenizer.json (HF)");
  sub->add_option("--prompt", options->prompt, "prompt text (empty: start from BOS)");
  sub->add_option("--steps", options->steps, "tokens to generate")->capture_default_str();
  sub->add_option("--temperature", options->sampling.temperature, "0 = greedy")->capture_default_str();
  sub->add_option("--top-p", options->sampling.top_p, "nucleus sampling mass")->capture_default_str();
  sub->add_option("--top-k", options->sampling.top_k, "0 = no top-k cut")->capture_default_str();
  sub->add_option("--seed", options->sampling.seed, "sampling and synthetic-weight seed")->capture_default_str();
  sub->add_option("--device", options->device, "cpu, cuda or cuda:N")->capture_default_str();
  sub->add_option("--dtype", options->dtype, "float32, float16 or bfloat16")->capture_default_str();
  sub->add_flag("--chat", options->chat, "wrap the prompt as a user turn in the model's chat template");
  sub->add_option("--system", options->system, "with --chat: the system turn (default: the template's own)");
  sub->add_option("--logits", options->logits_path,
                  "write each step's logits (float32 [steps, vocab], dataset 'logits') to this HDF5 file");
  sub->add_flag("--overwrite", options->overwrite, "replace the --logits file if it exists");
  sub->add_flag("--json", options->json,
                "print {prompt_ids, ids, text, stopped} of the generated tokens as one JSON line instead of the text");
  sub->callback([options, &command] { command = [options] { run_generate(*options); }; });
}

}  // namespace kvdrift::cli
