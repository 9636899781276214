#include <spdlog/spdlog.h>

#include <filesystem>

#include "commands.h"
#include "core/error.h"
#include "core/output_path.h"
#include "model/checkpoint.h"

namespace kvdrift::cli {

namespace {

struct ConvertOptions {
  std::string from_format;
  std::string input;
  std::string to_format;
  std::string output;
  bool overwrite = false;
};

void run_convert(const ConvertOptions& options) {
  if (options.from_format != "llama2c") fail("convert: unsupported source format '{}' (supported: llama2c)", options.from_format);
  if (options.to_format != "hf") fail("convert: unsupported target format '{}' (supported: hf)", options.to_format);
  // Never write into someone's folder unasked: its config.json would be replaced.
  std::error_code error;
  if (std::filesystem::exists(options.output, error)) {
    if (!std::filesystem::is_directory(options.output, error))
      fail("convert: {} exists and is not a directory", options.output);
    if (!std::filesystem::is_empty(options.output, error) && !options.overwrite)
      fail("convert: {} is not empty; pass --overwrite to write into it", options.output);
  }
  for (const char* name : {"config.json", "model.safetensors"})
    check_output_kind("convert: output", (std::filesystem::path(options.output) / name).string(), {options.input});
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
  sub->add_option("output", options->output, "target directory (absent or empty)")->required();
  sub->add_flag("--overwrite", options->overwrite, "write into a non-empty target directory");
  sub->callback([options, &command] { command = [options] { run_convert(*options); }; });
}

}  // namespace kvdrift::cli
