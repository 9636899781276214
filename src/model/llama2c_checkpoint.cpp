// llama2.c "legacy" checkpoints (karpathy/llama2.c export version 0).
#include <fstream>
#include <filesystem>

#include "core/error.h"
#include "model/checkpoint.h"

namespace kvdrift {

namespace {

struct Llama2cHeader {
  int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

}  // namespace

Checkpoint read_llama2c_checkpoint(const std::string& path, torch::Device device, torch::ScalarType dtype) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail("model file not found: {}", path);
  const auto file_size = static_cast<int64_t>(std::filesystem::file_size(path));
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open model file {}", path);
  Llama2cHeader header{};
  if (file_size < static_cast<int64_t>(sizeof(header)) || !in.read(reinterpret_cast<char*>(&header), sizeof(header)))
    fail("{}: truncated llama2.c checkpoint ({} bytes, shorter than its 28-byte header)", path, file_size);

  ModelConfig c;
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
  const std::vector<std::pair<std::string, std::vector<int64_t>>> arrays = {
      {"token_embedding", {V, D}}, {"rms_att", {L, D}},  {"wq", {L, D, D}},   {"wk", {L, KV, D}},
      {"wv", {L, KV, D}},          {"wo", {L, D, D}},    {"rms_ffn", {L, D}}, {"w1", {L, F, D}},
      {"w2", {L, D, F}},           {"w3", {L, F, D}},    {"rms_final", {D}},
      {"rope_tables", {2, c.max_seq_len, c.head_dim / 2}}};
  // Sized in double first: a garbage header must not overflow int64 before it is rejected.
  double floats = 0;
  for (const auto& [name, shape] : arrays) {
    double count = 1;
    for (int64_t extent : shape) count *= static_cast<double>(extent);
    floats += count;
  }
  if (!c.tie_embeddings) floats += static_cast<double>(V) * static_cast<double>(D);
  const double implied_size = static_cast<double>(sizeof(header)) + floats * 4;
  if (static_cast<double>(file_size) < implied_size)
    fail("{}: truncated llama2.c checkpoint: the header implies {:.0f} bytes, the file has {}", path, implied_size,
         file_size);
  const auto expected_size = static_cast<int64_t>(implied_size);
  if (file_size > expected_size)
    fail("{}: {} unexpected trailing bytes after the weights the header describes ({} bytes expected)", path,
         file_size - expected_size, expected_size);

  std::map<std::string, torch::Tensor> raw;
  for (const auto& [name, shape] : arrays) {
    auto tensor = torch::empty(shape, torch::kFloat32);
    in.read(reinterpret_cast<char*>(tensor.data_ptr<float>()), tensor.numel() * 4);
    raw[name] = tensor;
  }
  if (!c.tie_embeddings) {
    raw["wcls"] = torch::empty({V, D}, torch::kFloat32);
    in.read(reinterpret_cast<char*>(raw["wcls"].data_ptr<float>()), V * D * 4);
  }
  if (!in) fail("{}: read error while loading weights", path);

  Checkpoint checkpoint{c, {}};
  auto put = [&](const std::string& name, const torch::Tensor& t) { checkpoint.weights[name] = t.to(device, dtype); };
  put("model.embed_tokens.weight", raw["token_embedding"]);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    put(p + "input_layernorm.weight", raw["rms_att"][l]);
    put(p + "self_attn.q_proj.weight", raw["wq"][l]);
    put(p + "self_attn.k_proj.weight", raw["wk"][l]);
    put(p + "self_attn.v_proj.weight", raw["wv"][l]);
    put(p + "self_attn.o_proj.weight", raw["wo"][l]);
    put(p + "post_attention_layernorm.weight", raw["rms_ffn"][l]);
    put(p + "mlp.gate_proj.weight", raw["w1"][l]);
    put(p + "mlp.down_proj.weight", raw["w2"][l]);
    put(p + "mlp.up_proj.weight", raw["w3"][l]);
  }
  put("model.norm.weight", raw["rms_final"]);
  if (!c.tie_embeddings) put("lm_head.weight", raw["wcls"]);
  return checkpoint;
}

}  // namespace kvdrift
