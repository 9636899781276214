#pragma once
// What every harness shares: the input written to a file (the parsers read files, as users give them),
// and the one outcome allowed besides success, kvdrift::Error. Anything else escaping (another
// exception type, a crash, a sanitizer report, a hang) is a finding.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <cstdlib>
#include <memory>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift::fuzz {

// A folder of this process's own, emptied once, where the inputs are written.
inline const std::string& scratch() {
  static const std::string dir = [] {
    const auto path = std::filesystem::temp_directory_path() / ("kvdrift-fuzz-" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
    return path.string();
  }();
  return dir;
}

// Writes `size` bytes to scratch()/name and returns its path.
inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                 static_cast<std::streamsize>(size));
  return path;
}

// Runs `parse`; a kvdrift::Error is the expected way to refuse bad input.
template <typename Parse>
void refuse_or_accept(Parse&& parse) {
  try {
    parse();
  } catch (const Error&) {
  }
}

// Encoded ids must lie in the tokenizer's vocabulary.
inline void check_ids_in_vocabulary(const Tokenizer& tokenizer, const std::vector<TokenId>& ids) {
  for (auto id : ids)
    if (id < 0 || id >= tokenizer.vocab_size()) __builtin_trap();
}

// The input as a tokenizer file named `file_name`; one that loads must encode `text` (BOS and EOS
// added) to ids in its vocabulary, and decode them.
inline void load_and_use_tokenizer(const std::string& file_name, const uint8_t* data, size_t size, const char* text) {
  const std::string path = write_input(file_name, data, size);
  refuse_or_accept([&] {
    const auto tokenizer = load_tokenizer(path);
    const auto ids = tokenizer->encode(text, true, true);
    check_ids_in_vocabulary(*tokenizer, ids);
    tokenizer->decode(ids);
  });
}

// The tokenizer a harness that fuzzes text runs with: the file $variable names, else `fallback`.
inline std::unique_ptr<Tokenizer> fixed_tokenizer(const char* variable, const std::string& fallback) {
  const char* path = std::getenv(variable);
  return load_tokenizer(path ? path : fallback);
}

}  // namespace kvdrift::fuzz
