#include "core/output_path.h"

#include <filesystem>

#include "core/error.h"

namespace kvdrift {

namespace {

namespace fs = std::filesystem;

// The file among `input`'s that is `output` (the same device and inode, links followed), else "". A
// folder input (a Hugging Face model directory) stands for every file under it, at any depth: its
// config, shards, tokenizer and templates are all read.
std::string input_file_that_is(const fs::path& output, const std::string& input) {
  std::error_code error;
  if (fs::equivalent(output, input, error)) return input;
  if (!fs::is_directory(input, error)) return "";
  for (fs::recursive_directory_iterator entry(input, fs::directory_options::skip_permission_denied, error), end;
       !error && entry != end; entry.increment(error)) {
    std::error_code entry_error;
    if (fs::equivalent(output, entry->path(), entry_error)) return entry->path().string();
  }
  return "";
}

}  // namespace

void check_output_kind(const std::string& option, const std::string& output, const std::vector<std::string>& inputs) {
  if (output.empty()) fail("{} must name a file", option);
  std::error_code error;
  const auto status = fs::status(output, error);
  if (fs::is_symlink(fs::symlink_status(output, error)) && !fs::exists(status)) {
    fail("{} {} is a symbolic link to {}, which does not exist; name the file itself, or remove the link", option,
         output, fs::read_symlink(output, error).string());
  }
  if (!fs::exists(status)) return;
  if (!fs::is_regular_file(status)) fail("{} {} exists and is not a regular file; name a file", option, output);
  for (const auto& input : inputs) {
    if (input.empty()) continue;
    const std::string same = input_file_that_is(output, input);
    if (!same.empty()) fail("{} {} is the same file as the input {}; name another output", option, output, same);
  }
}

void check_output_path(const std::string& option, const std::string& output, const std::vector<std::string>& inputs,
                       bool overwrite) {
  check_output_kind(option, output, inputs);
  if (!overwrite && std::filesystem::exists(output)) fail("{} {} exists; pass --overwrite to replace it", option, output);
}

}  // namespace kvdrift
