#include <spdlog/spdlog.h>

#include <iostream>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "decode/generate.h"
#include "model/checkpoint.h"
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
};

void run_generate(const GenerateOptions& options) {
  const auto device = parse_device(options.device);
  const auto dtype = parse_dtype(options.dtype);
  options.sampling.validate();
  auto tokenizer = tokenizer_for_model(options.tokenizer, options.model);
  if (!tokenizer)
    fail("no tokenizer: pass --tokenizer FILE (the model '{}' has no tokenizer.json beside it)", options.model);
  auto model = load_model(options.model, device, dtype, options.sampling.seed);
  if (tokenizer->vocab_size() > model.config().vocab_size)
    fail("tokenizer has {} tokens but the model's vocabulary has only {}", tokenizer->vocab_size(),
         model.config().vocab_size);
  const bool add_bos = tokenizer->bos_id().has_value();
  auto prompt = tokenizer->encode(options.prompt, add_bos);
  if (prompt.empty()) fail("the prompt encodes to no tokens and the tokenizer has no BOS token");
  const auto stop_ids = stop_tokens(model, tokenizer.get());
  spdlog::info("model {} ({}, {} layers, dim {}), {} prompt tokens, {} steps on {} in {}", options.model,
               model.source().format, model.config().n_layers, model.config().dim, prompt.size(), options.steps,
               describe_device(device), dtype_name(dtype));
  Sampler sampler(options.sampling);
  const auto result = generate(model, prompt, options.steps, sampler, stop_ids);
  std::cout << tokenizer->decode(result.tokens) << std::endl;
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
  sub->callback([options, &command] { command = [options] { run_generate(*options); }; });
}

}  // namespace kvdrift::cli
