#pragma once
// Reading and writing model checkpoints: llama2.c legacy .bin, Hugging Face directories
// (config.json + safetensors), and seeded synthetic models with the shapes of real ones.
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/checkpoint_files.h"
#include "model/config.h"
#include "model/llama.h"

namespace kvdrift {

struct Checkpoint {
  ModelConfig config;
  WeightMap weights;  // HF names (see expected_weight_shapes), already on the target device/dtype
};

// llama2.c legacy format: 7 int32 header fields, float32 arrays, RoPE on interleaved pairs.
Checkpoint read_llama2c_checkpoint(const std::string& path, torch::Device device, torch::ScalarType dtype);

// A directory with config.json and model.safetensors, or shards listed in model.safetensors.index.json.
Checkpoint read_hf_checkpoint(const std::string& dir, torch::Device device, torch::ScalarType dtype);

// Writes config.json and model.safetensors (float32) in HF layout. An interleaved-RoPE model has the
// rows of its q/k projections permuted per head so that HF's half-split RoPE computes the same
// attention (what HF's convert_llama_weights_to_hf does).
void write_hf_checkpoint(const Checkpoint& checkpoint, const std::string& dir);

// Random-weight models (seeded, generated on the CPU so every device sees the same weights).
std::vector<std::string> synthetic_model_names();
ModelConfig synthetic_config(const std::string& name);
Checkpoint synthetic_checkpoint(const std::string& name, uint64_t seed, torch::Device device, torch::ScalarType dtype);

// SHA-256 identifying a checkpoint: of the file (llama2.c), or of the "name sha256" lines of a HF
// directory's config.json and safetensors files in name order; empty for synthetic models.
std::string checkpoint_sha256(const ModelSource& source);

// "synthetic:NAME", a HF directory, or a llama2.c .bin file.
// The shapes of the model `spec` names (as load_model takes it) without building it: an HF
// directory's config.json, a synthetic model's table, a llama2.c file's header.
ModelConfig read_model_config(const std::string& spec);
LlamaModel load_model(const std::string& spec, torch::Device device, torch::ScalarType dtype, uint64_t seed = 0);

}  // namespace kvdrift
