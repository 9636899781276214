#include <filesystem>

#include "core/error.h"
#include "tokenizer/hf_tokenizer.h"
#include "tokenizer/llama2c_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::path file = fs::is_directory(path, error) ? fs::path(path) / "tokenizer.json" : fs::path(path);
  if (!fs::is_regular_file(file, error)) fail("tokenizer file not found: {}", file.string());
  if (file.extension() == ".json") return load_hf_tokenizer(file.string());
  return load_llama2c_tokenizer(file.string());
}

std::unique_ptr<Tokenizer> tokenizer_for_model(const std::string& tokenizer_path, const std::string& model_path) {
  if (!tokenizer_path.empty()) return load_tokenizer(tokenizer_path);
  std::error_code error;
  const auto beside = std::filesystem::path(model_path) / "tokenizer.json";
  if (std::filesystem::is_regular_file(beside, error)) return load_hf_tokenizer(beside.string());
  return nullptr;
}

}  // namespace kvdrift
