#include "model/checkpoint_files.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace fs = std::filesystem;

namespace kvdrift {

namespace {

nlohmann::json read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail("file not found: {}", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number too large
    fail("{}: not valid JSON ({})", path.string(), e.what());
  }
}

struct Llama2cHeader {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};
static_assert(sizeof(Llama2cHeader) == Llama2cLayout::kHeaderBytes);

}  // namespace

Llama2cLayout read_llama2c_layout(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) fail("model file not found: {}", path);
  const auto file_size = static_cast<int64_t>(fs::file_size(path, ec));
  std::ifstream in(path, std::ios::binary);
  if (ec || !in) fail("cannot open model file {}", path);
  Llama2cHeader header{};
  if (file_size < Llama2cLayout::kHeaderBytes || !in.read(reinterpret_cast<char*>(&header), sizeof(header)))
    fail("{}: truncated llama2.c checkpoint ({} bytes, shorter than its 28-byte header)", path, file_size);

  Llama2cLayout layout;
  ModelConfig& c = layout.config;
  c.architecture = "llama";
  c.dim = header.dim;
  c.hidden_dim = header.hidden_dim;
  c.n_layers = header.n_layers;
  c.n_heads = header.n_heads;
  c.n_kv_heads = header.n_kv_heads;
  c.vocab_size = header.vocab_size < 0 ? -static_cast<int64_t>(header.vocab_size) : header.vocab_size;
  c.tie_embeddings = header.vocab_size > 0;  // llama2.c marks a separate classifier by a negative vocab size
  c.max_seq_len = header.seq_len;
  if (c.n_heads <= 0 || c.dim % c.n_heads != 0)
    fail("{}: impossible header: dim = {} is not divisible by n_heads = {}", path, c.dim, c.n_heads);
  c.head_dim = c.dim / c.n_heads;
  c.rope_theta = 10000.0;
  c.rope_style = RopeStyle::Interleaved;
  c.norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.validate(path + " (header)");

  // Layout: the weights, two legacy RoPE tables (unused), then the classifier when untied.
  const int64_t L = c.n_layers, D = c.dim, F = c.hidden_dim, KV = c.kv_dim(), V = c.vocab_size;
  layout.arrays = {{"token_embedding", {V, D}}, {"rms_att", {L, D}},  {"wq", {L, D, D}},   {"wk", {L, KV, D}},
                   {"wv", {L, KV, D}},          {"wo", {L, D, D}},    {"rms_ffn", {L, D}}, {"w1", {L, F, D}},
                   {"w2", {L, D, F}},           {"w3", {L, F, D}},    {"rms_final", {D}},
                   {"rope_tables", {2, c.max_seq_len, c.head_dim / 2}}};
  if (!c.tie_embeddings) layout.arrays.push_back({"wcls", {V, D}});
  // Sized in double first: a garbage header must not overflow int64 before it is rejected.
  double floats = 0;
  for (const auto& [name, shape] : layout.arrays) {
    double count = 1;
    for (int64_t extent : shape) count *= static_cast<double>(extent);
    floats += count;
  }
  const double implied_size = static_cast<double>(Llama2cLayout::kHeaderBytes) + floats * 4;
  if (static_cast<double>(file_size) < implied_size)
    fail("{}: truncated llama2.c checkpoint: the header implies {:.0f} bytes, the file has {}", path, implied_size,
         file_size);
  const auto expected_size = static_cast<int64_t>(implied_size);
  if (file_size > expected_size)
    fail("{}: {} unexpected trailing bytes after the weights the header describes ({} bytes expected)", path,
         file_size - expected_size, expected_size);
  return layout;
}

ModelConfig read_hf_config(const std::string& dir) {
  if (!fs::is_directory(dir)) fail("model directory not found: {}", dir);
  const fs::path config_path = fs::path(dir) / "config.json";
  return config_from_hf_json(read_json_file(config_path), config_path.string());
}

std::map<std::string, std::set<std::string>> read_hf_shard_list(const std::string& dir) {
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::set<std::string>> shards;
  if (fs::exists(index_path)) {
    const auto index = read_json_file(index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object())
      fail("{}: missing 'weight_map' object", index_path.string());
    for (const auto& [name, file] : index.at("weight_map").items()) {
      if (!file.is_string()) fail("{}: weight_map entry '{}' is not a file name", index_path.string(), name);
      // Shards live in the model directory: a path out of it ("../x", "/etc/x") is refused.
      const fs::path shard = file.get<std::string>();
      if (shard.empty() || shard.has_parent_path() || shard.is_absolute() || shard == "." || shard == "..")
        fail("{}: weight_map entry '{}' names '{}', which is not a file name in the model directory",
             index_path.string(), name, shard.string());
      shards[file.get<std::string>()].insert(name);
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    shards["model.safetensors"] = {};
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", dir);
  }
  return shards;
}

}  // namespace kvdrift
