#include "model/config.h"

#include <algorithm>
#include <limits>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_integer.h"

namespace kvdrift {

void ModelConfig::validate(const std::string& where) const {
  const std::pair<const char*, int64_t> positive[] = {
      {"dim", dim},           {"hidden_dim", hidden_dim}, {"n_layers", n_layers},
      {"n_heads", n_heads},   {"n_kv_heads", n_kv_heads}, {"head_dim", head_dim},
      {"vocab_size", vocab_size}, {"max_seq_len", max_seq_len}};
  // Bounds far above any real model: they catch garbage headers before anything is allocated.
  constexpr int64_t kMaxSize = int64_t{1} << 24;
  for (const auto& [name, value] : positive) {
    if (value <= 0 || value > kMaxSize) fail("{}: impossible {} = {}", where, name, value);
  }
  if (n_heads % n_kv_heads != 0)
    fail("{}: n_heads = {} is not a multiple of n_kv_heads = {}", where, n_heads, n_kv_heads);
  if (head_dim % 2 != 0) fail("{}: head_dim = {} must be even for RoPE", where, head_dim);
  if (rope_theta <= 0) fail("{}: rope_theta = {} must be positive", where, rope_theta);
  if (norm_eps <= 0) fail("{}: norm eps = {} must be positive", where, norm_eps);
  if (rope_scaling.factor <= 0) fail("{}: rope_scaling factor = {} must be positive", where, rope_scaling.factor);
  if (rope_scaling.type == RopeScalingType::Llama3 && rope_scaling.high_freq_factor <= rope_scaling.low_freq_factor)
    fail("{}: rope_scaling high_freq_factor must exceed low_freq_factor", where);
}

std::vector<std::pair<std::string, std::vector<int64_t>>> expected_weight_shapes(const ModelConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  shapes.push_back({"model.embed_tokens.weight", {c.vocab_size, c.dim}});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes.push_back({p + "input_layernorm.weight", {c.dim}});
    shapes.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), c.dim}});
    shapes.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), c.dim}});
    shapes.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), c.dim}});
    if (c.attention_bias) {
      shapes.push_back({p + "self_attn.q_proj.bias", {c.q_dim()}});
      shapes.push_back({p + "self_attn.k_proj.bias", {c.kv_dim()}});
      shapes.push_back({p + "self_attn.v_proj.bias", {c.kv_dim()}});
    }
    if (c.qk_norm) {
      shapes.push_back({p + "self_attn.q_norm.weight", {c.head_dim}});
      shapes.push_back({p + "self_attn.k_norm.weight", {c.head_dim}});
    }
    shapes.push_back({p + "self_attn.o_proj.weight", {c.dim, c.q_dim()}});
    shapes.push_back({p + "post_attention_layernorm.weight", {c.dim}});
    shapes.push_back({p + "mlp.gate_proj.weight", {c.hidden_dim, c.dim}});
    shapes.push_back({p + "mlp.up_proj.weight", {c.hidden_dim, c.dim}});
    shapes.push_back({p + "mlp.down_proj.weight", {c.dim, c.hidden_dim}});
  }
  shapes.push_back({"model.norm.weight", {c.dim}});
  if (!c.tie_embeddings) shapes.push_back({"lm_head.weight", {c.vocab_size, c.dim}});
  return shapes;
}

int64_t parameter_count(const ModelConfig& config) {
  int64_t total = 0;
  for (const auto& [name, shape] : expected_weight_shapes(config)) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    total += n;
  }
  return total;
}

namespace {

template <typename T>
T required(const nlohmann::json& json, const char* key, const std::string& where) {
  if (!json.contains(key)) fail("{}: missing required key '{}'", where, key);
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    const auto value = json_int64(json.at(key));
    if (!value || *value < std::numeric_limits<T>::min() || *value > std::numeric_limits<T>::max())
      fail("{}: key '{}' must be an integer, got {}", where, key, json.at(key).dump());
    return static_cast<T>(*value);
  }
  try {
    return json.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    fail("{}: key '{}' has the wrong type ({})", where, key, json.at(key).dump());
  }
}

template <typename T>
T optional(const nlohmann::json& json, const char* key, T fallback, const std::string& where) {
  if (!json.contains(key) || json.at(key).is_null()) return fallback;
  return required<T>(json, key, where);
}

std::vector<int64_t> token_id_list(const nlohmann::json& json, const char* key, const std::string& where) {
  if (!json.contains(key) || json.at(key).is_null()) return {};
  if (!json.at(key).is_array()) return {required<int64_t>(json, key, where)};
  std::vector<int64_t> ids;
  for (const nlohmann::json& id : json.at(key)) {
    const auto value = json_int64(id);
    if (!value) fail("{}: key '{}' must hold integers, got {}", where, key, json.at(key).dump());
    ids.push_back(*value);
  }
  return ids;
}

// What transformers' config class of a model_type (LlamaConfig, MistralConfig, Qwen2Config,
// Qwen3Config in transformers 5) takes for a key config.json leaves out, where they differ.
struct ArchitectureDefaults {
  const char* model_type;
  int64_t max_position_embeddings;
  int64_t num_key_value_heads;  // 0: num_attention_heads
  int64_t head_dim;             // 0: hidden_size / num_attention_heads
  int64_t sliding_window;       // the window in use when the key is missing (0: none)
  bool windowed_by_flag;        // the window counts only with use_sliding_window (Qwen)
};
constexpr ArchitectureDefaults kArchitectures[] = {
    {"llama", 2048, 0, 0, 0, false},
    {"mistral", 131072, 8, 0, 4096, false},
    {"qwen2", 32768, 32, 0, 4096, true},
    {"qwen3", 32768, 32, 128, 4096, true},
};

// RoPE as transformers 5 reads config.json (PreTrainedConfig.convert_rope_params_to_dict, then
// standardize_rope_params and validate_rope in modeling_rope_utils.py), in both layouts: transformers
// 4 wrote a top-level `rope_theta` and an optional `rope_scaling`, transformers 5 writes one
// `rope_parameters` object. A non-empty `rope_scaling` replaces `rope_parameters` whole; a top-level
// `rope_theta` fills in the object's when it has none (else 10000); `type` is the older name of
// `rope_type`, and without either the type is "default". The keys a type needs must be there
// (transformers raises KeyError otherwise); llama3's original context defaults to
// max_position_embeddings.
void read_rope(const nlohmann::json& json, const std::string& where, int64_t max_position_embeddings,
               ModelConfig& c) {
  const bool scaling = json.contains("rope_scaling") && !json.at("rope_scaling").is_null() &&
                       !json.at("rope_scaling").empty();
  const char* key = scaling ? "rope_scaling" : "rope_parameters";
  if (!scaling && (!json.contains(key) || json.at(key).is_null())) {
    c.rope_theta = optional<double>(json, "rope_theta", 10000.0, where);
    return;
  }
  const nlohmann::json& rope = json.at(key);
  const std::string rope_where = where + " " + key;
  if (!rope.is_object()) fail("{}: key '{}' must be a JSON object, got {}", where, key, rope.dump());
  c.rope_theta = rope.contains("rope_theta") ? required<double>(rope, "rope_theta", rope_where)
                                             : optional<double>(json, "rope_theta", 10000.0, where);
  const std::string type = rope.contains("rope_type") ? required<std::string>(rope, "rope_type", rope_where)
                           : rope.contains("type")    ? required<std::string>(rope, "type", rope_where)
                                                      : "default";
  const auto known = parse_enum(kRopeScalingTypeNames, type == "default" ? "none" : type);
  if (!known) fail("{}: unsupported rope_type '{}' (supported: default, linear, llama3)", rope_where, type);
  c.rope_scaling.type = *known;
  if (c.rope_scaling.type == RopeScalingType::None) return;
  // The scaled types compute frequencies over head_dim * partial_rotary_factor channels (the default
  // type ignores it); kvdrift rotates every channel.
  const double partial = rope.contains("partial_rotary_factor")
                             ? required<double>(rope, "partial_rotary_factor", rope_where)
                             : optional<double>(json, "partial_rotary_factor", 1.0, where);
  if (partial != 1.0)
    fail("{}: partial_rotary_factor = {} is not supported (kvdrift rotates every channel)", rope_where, partial);
  c.rope_scaling.factor = required<double>(rope, "factor", rope_where);
  if (c.rope_scaling.type == RopeScalingType::Llama3) {
    c.rope_scaling.low_freq_factor = required<double>(rope, "low_freq_factor", rope_where);
    c.rope_scaling.high_freq_factor = required<double>(rope, "high_freq_factor", rope_where);
    c.rope_scaling.original_max_position =
        optional<int64_t>(rope, "original_max_position_embeddings", max_position_embeddings, rope_where);
  }
}

}  // namespace

ModelConfig config_from_hf_json(const nlohmann::json& json, const std::string& where) {
  if (!json.is_object()) fail("{}: expected a JSON object", where);
  ModelConfig c;
  c.architecture = optional<std::string>(json, "model_type", "llama", where);
  const ArchitectureDefaults* defaults = nullptr;
  for (const auto& known : kArchitectures)
    if (c.architecture == known.model_type) defaults = &known;
  if (!defaults)
    fail("{}: unsupported model_type '{}' (supported: llama, mistral, qwen2, qwen3)", where, c.architecture);
  c.dim = required<int64_t>(json, "hidden_size", where);
  c.hidden_dim = required<int64_t>(json, "intermediate_size", where);
  c.n_layers = required<int64_t>(json, "num_hidden_layers", where);
  c.n_heads = required<int64_t>(json, "num_attention_heads", where);
  c.vocab_size = required<int64_t>(json, "vocab_size", where);
  if (c.n_heads <= 0) fail("{}: impossible num_attention_heads = {}", where, c.n_heads);
  // A key given as null takes the derived value (transformers' __post_init__), a missing one the class's
  // default.
  c.n_kv_heads = json.contains("num_key_value_heads") || defaults->num_key_value_heads == 0
                     ? optional<int64_t>(json, "num_key_value_heads", c.n_heads, where)
                     : defaults->num_key_value_heads;
  c.head_dim = json.contains("head_dim") || defaults->head_dim == 0
                   ? optional<int64_t>(json, "head_dim", c.dim / c.n_heads, where)
                   : defaults->head_dim;
  const int64_t max_position_embeddings =
      optional<int64_t>(json, "max_position_embeddings", defaults->max_position_embeddings, where);
  c.max_seq_len = max_position_embeddings;
  // Sliding-window attention is full attention while a sequence fits in the window; kvdrift has no
  // window, so the context stops at it. Qwen configs carry a window that only use_sliding_window turns on.
  if (!defaults->windowed_by_flag || optional<bool>(json, "use_sliding_window", false, where)) {
    const bool given = json.contains("sliding_window");
    const int64_t window = given ? optional<int64_t>(json, "sliding_window", 0, where) : defaults->sliding_window;
    if (given && !json.at("sliding_window").is_null() && window < 1)
      fail("{}: impossible sliding_window = {}", where, window);
    if (window > 0) c.max_seq_len = std::min(c.max_seq_len, window);
  }
  read_rope(json, where, max_position_embeddings, c);
  // Every family here applies SiLU in a bias-free MLP. Qwen2 biases q/k/v whatever the config says,
  // Mistral nothing; Llama's and Qwen3's attention_bias biases o_proj too, which kvdrift lacks.
  const std::string activation = optional<std::string>(json, "hidden_act", "silu", where);
  if (activation != "silu" && activation != "swish")
    fail("{}: hidden_act '{}' is not supported (kvdrift's MLP applies silu)", where, activation);
  if (c.architecture == "llama" && optional<bool>(json, "mlp_bias", false, where))
    fail("{}: mlp_bias = true is not supported (kvdrift's MLP has no biases)", where);
  c.attention_bias = c.architecture == "qwen2";
  if ((c.architecture == "llama" || c.architecture == "qwen3") && optional<bool>(json, "attention_bias", false, where))
    fail("{}: attention_bias = true is not supported for model_type {} (it biases o_proj too, which kvdrift's "
         "attention lacks)",
         where, c.architecture);
  c.norm_eps = optional<double>(json, "rms_norm_eps", 1e-6, where);
  c.tie_embeddings = optional<bool>(json, "tie_word_embeddings", false, where);
  c.qk_norm = c.architecture == "qwen3";
  c.rope_style = RopeStyle::HalfSplit;
  c.bos_token_id = optional<int64_t>(json, "bos_token_id", -1, where);
  c.eos_token_ids = token_id_list(json, "eos_token_id", where);
  c.validate(where);
  return c;
}

nlohmann::json config_to_hf_json(const ModelConfig& c) {
  nlohmann::json json = {
      {"architectures", {c.architecture == "llama" ? "LlamaForCausalLM"
                         : c.architecture == "qwen2" ? "Qwen2ForCausalLM"
                         : c.architecture == "qwen3" ? "Qwen3ForCausalLM"
                                                     : "MistralForCausalLM"}},
      {"model_type", c.architecture},
      {"hidden_act", "silu"},
      {"hidden_size", c.dim},
      {"intermediate_size", c.hidden_dim},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_seq_len},
      {"rope_theta", c.rope_theta},
      {"rms_norm_eps", c.norm_eps},
      {"tie_word_embeddings", c.tie_embeddings},
      {"attention_bias", c.attention_bias},
      {"torch_dtype", "float32"},
  };
  if (c.bos_token_id >= 0) json["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) json["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) json["eos_token_id"] = c.eos_token_ids;
  if (c.rope_scaling.type != RopeScalingType::None) {
    json["rope_scaling"] = {{"rope_type", enum_name(kRopeScalingTypeNames, c.rope_scaling.type)},
                            {"factor", c.rope_scaling.factor}};
    if (c.rope_scaling.type == RopeScalingType::Llama3) {
      json["rope_scaling"]["low_freq_factor"] = c.rope_scaling.low_freq_factor;
      json["rope_scaling"]["high_freq_factor"] = c.rope_scaling.high_freq_factor;
      json["rope_scaling"]["original_max_position_embeddings"] = c.rope_scaling.original_max_position;
    }
  }
  return json;
}

}  // namespace kvdrift
