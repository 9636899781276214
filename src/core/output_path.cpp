#include "core/output_path.h"

#include <filesystem>

#include "core/error.h"

namespace kvdrift {

void check_output_kind(const std::string& option, const std::string& output, const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  if (output.empty()) fail("{} must name a file", option);
  std::error_code error;
  const auto status = fs::status(output, error);
  if (!fs::exists(status)) return;
  if (!fs::is_regular_file(status)) fail("{} {} exists and is not a regular file; name a file", option, output);
  for (const auto& input : inputs) {
    if (!input.empty() && fs::equivalent(output, input, error))
      fail("{} {} is the same file as the input {}; name another output", option, output, input);
  }
}

void check_output_path(const std::string& option, const std::string& output, const std::vector<std::string>& inputs,
                       bool overwrite) {
  check_output_kind(option, output, inputs);
  if (!overwrite && std::filesystem::exists(output)) fail("{} {} exists; pass --overwrite to replace it", option, output);
}

}  // namespace kvdrift
