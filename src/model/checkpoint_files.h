#pragma once
// What a checkpoint's files say, read and checked before any tensor exists: a llama2.c file's header
// and layout, a Hugging Face directory's config.json and shard list. No LibTorch here, so that these
// parsers of untrusted files are fuzzed on their own (tests/fuzz/).
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace kvdrift {

// A llama2.c legacy checkpoint: the config its 28-byte header implies and the float32 arrays that
// follow it, in file order (the classifier last, when untied). The file's size must be exactly what
// the header implies.
struct Llama2cLayout {
  static constexpr int64_t kHeaderBytes = 28;
  ModelConfig config;
  std::vector<std::pair<std::string, std::vector<int64_t>>> arrays;  // name -> shape
};
Llama2cLayout read_llama2c_layout(const std::string& path);

// A Hugging Face directory's config.json.
ModelConfig read_hf_config(const std::string& dir);
// Its weight files: each shard file -> the tensors model.safetensors.index.json lists for it, or
// {"model.safetensors" -> {}} (every tensor of the file) without an index. Shards must be file names
// in the directory.
std::map<std::string, std::set<std::string>> read_hf_shard_list(const std::string& dir);

}  // namespace kvdrift
