#include <spdlog/spdlog.h>

#include "commands.h"
#include "core/error.h"
#include "model/checkpoint.h"

namespace kvdrift::cli {

namespace {

struct ConvertOptions {
  std::string from_format;
  std::string input;
  std::string to_format;
  std::string output;
};

void run_convert(const ConvertOptions& options) {
  if (options.from_format != "llama2c") fail("convert: unsupported source format '{}' (supported: llama2c)", options.from_format);
  if (options.to_format != "hf") fail("convert: unsupported target format '{}' (supported: hf)", options.to_format);
  const auto checkpoint = read_llama2c_checkpoint(options.input, torch::kCPU, torch::kFloat32);
  write_hf_checkpoint(checkpoint, options.output);
  spdlog::info("wrote {}/config.json and {}/model.safetensors ({} parameters)", options.output, options.output,
               parameter_count(checkpoint.config));
}

}  // namespace

void register_convert(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<ConvertOptions>();
  auto* sub = app.add_subcommand("convert", "convert a checkpoint to another format");
  sub->add_option("--from", options->from_format, "source format (llama2c)")->required();
  sub->add_option("input", options->input, "source checkpoint file")->required();
  sub->add_option("--to", options->to_format, "target format (hf)")->required();
  sub->add_option("output", options->output, "target directory")->required();
  sub->callback([options, &command] { command = [options] { run_convert(*options); }; });
}

}  // namespace kvdrift::cli
