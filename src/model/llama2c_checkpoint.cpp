// llama2.c "legacy" checkpoints (karpathy/llama2.c export version 0).
#include <fstream>

#include "core/error.h"
#include "model/checkpoint.h"
#include "model/checkpoint_files.h"

namespace kvdrift {

Checkpoint read_llama2c_checkpoint(const std::string& path, torch::Device device, torch::ScalarType dtype) {
  const Llama2cLayout layout = read_llama2c_layout(path);
  const ModelConfig& c = layout.config;
  std::ifstream in(path, std::ios::binary);
  in.seekg(Llama2cLayout::kHeaderBytes);  // the layout checked the file's size
  std::map<std::string, torch::Tensor> raw;
  for (const auto& [name, shape] : layout.arrays) {
    auto tensor = torch::empty(shape, torch::kFloat32);
    in.read(reinterpret_cast<char*>(tensor.data_ptr<float>()), tensor.numel() * 4);
    raw[name] = tensor;
  }
  if (!in) fail("{}: read error while loading weights", path);

  Checkpoint checkpoint{c, {}};
  auto put = [&](const std::string& name, const torch::Tensor& t) { checkpoint.weights[name] = t.to(device, dtype); };
  put("model.embed_tokens.weight", raw["token_embedding"]);
  for (int64_t l = 0; l < c.n_layers; ++l) {
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
