// Hugging Face checkpoint directories: config.json plus one or many safetensors files.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/checkpoint.h"
#include "model/checkpoint_files.h"

namespace fs = std::filesystem;

namespace kvdrift {

namespace {

torch::ScalarType torch_dtype(StorageDtype dtype) {
  switch (dtype) {
    case StorageDtype::F32: return torch::kFloat32;
    case StorageDtype::F16: return torch::kFloat16;
    case StorageDtype::BF16: return torch::kBFloat16;
  }
  internal_error("a storage dtype is F32, F16 or BF16", __FILE__, __LINE__);
}

StorageDtype storage_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return StorageDtype::F32;
    case torch::kFloat16: return StorageDtype::F16;
    case torch::kBFloat16: return StorageDtype::BF16;
    default: fail("cannot store dtype {} in safetensors", c10::toString(dtype));
  }
}

// llama2.c/Meta order (pairs 2i, 2i+1 per head) -> HF order (i, i + head_dim/2), as HF's converter.
torch::Tensor permute_rows_for_half_split(const torch::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({heads, rows / heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

}  // namespace

Checkpoint read_hf_checkpoint(const std::string& dir, torch::Device device, torch::ScalarType dtype) {
  Checkpoint checkpoint{read_hf_config(dir), {}};
  const auto shards = read_hf_shard_list(dir);
  for (const auto& [file, names] : shards) {
    const SafetensorsFile shard((fs::path(dir) / file).string());
    for (const auto& name : names)
      if (!shard.find(name)) fail("{}: tensor '{}' listed in the index is missing", shard.path(), name);
    for (const auto& entry : shard.entries()) {
      if (!names.empty() && !names.count(entry.name)) continue;
      // Legacy HF exports carry RoPE buffers; they are recomputed, not loaded.
      const std::string rope_buffer = "rotary_emb.inv_freq";
      if (entry.name.size() >= rope_buffer.size() &&
          entry.name.compare(entry.name.size() - rope_buffer.size(), rope_buffer.size(), rope_buffer) == 0)
        continue;
      if (checkpoint.weights.count(entry.name)) fail("{}: tensor '{}' appears in two shards", dir, entry.name);
      auto view = torch::from_blob(const_cast<std::byte*>(entry.data), entry.shape,
                                   torch::TensorOptions().dtype(torch_dtype(entry.dtype)));
      // copy=true: the result must own its memory, never alias the mapping that closes below.
      checkpoint.weights[entry.name] = view.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
    }
  }
  // Some tied checkpoints also store the classifier; it is the embedding, so drop the duplicate.
  if (checkpoint.config.tie_embeddings) checkpoint.weights.erase("lm_head.weight");
  return checkpoint;
}

void write_hf_checkpoint(const Checkpoint& checkpoint, const std::string& dir) {
  ModelConfig config = checkpoint.config;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create output directory {}: {}", dir, ec.message());
  std::vector<torch::Tensor> owned;  // keeps converted tensors alive while the views point at them
  std::vector<SafetensorsTensorView> views;
  for (const auto& [name, shape] : expected_weight_shapes(config)) {
    auto it = checkpoint.weights.find(name);
    if (it == checkpoint.weights.end()) fail("cannot write {}: tensor '{}' is missing", dir, name);
    auto tensor = it->second.to(torch::kCPU, torch::kFloat32).contiguous();
    const bool rope_rows = name.find("self_attn.q_proj") != std::string::npos ||
                           name.find("self_attn.k_proj") != std::string::npos;
    if (rope_rows && config.rope_style == RopeStyle::Interleaved) {
      const int64_t heads = name.find("q_proj") != std::string::npos ? config.n_heads : config.n_kv_heads;
      tensor = tensor.dim() == 2 ? permute_rows_for_half_split(tensor, heads)
                                 : permute_rows_for_half_split(tensor.unsqueeze(1), heads).squeeze(1);
      tensor = tensor.contiguous();
    }
    owned.push_back(tensor);
    views.push_back({name, storage_dtype(tensor.scalar_type()), tensor.sizes().vec(), tensor.data_ptr(),
                     static_cast<size_t>(tensor.numel()) * tensor.element_size()});
  }
  config.rope_style = RopeStyle::HalfSplit;
  write_safetensors((fs::path(dir) / "model.safetensors").string(), views, {{"format", "pt"}});
  // Through a new file and a rename, as the safetensors file: a config.json that is a link is replaced,
  // never written through.
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const std::string temporary = config_path + ".tmp";
  fs::remove(temporary, ec);
  {
    std::ofstream out(temporary);
    out << config_to_hf_json(config).dump(2) << "\n";
    if (!out.flush()) fail("cannot write {}", temporary);
  }
  fs::rename(temporary, config_path, ec);
  if (ec) fail("cannot rename {} to {}: {}", temporary, config_path, ec.message());
}

}  // namespace kvdrift
