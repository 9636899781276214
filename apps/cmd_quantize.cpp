// `kvdrift quantize`: inspect one tensor through one quantizer. `kvdrift dump-kv`: write the keys and
// values a prompt produces, the natural input of `quantize`.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/output_path.h"
#include "decode/generate.h"
#include "io/hdf5.h"
#include "metrics/token_scale.h"
#include "model/checkpoint.h"
#include "quant/inspect.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift::cli {

namespace {

struct QuantizeOptions {
  std::string input;
  std::string dataset;
  std::string role;
  std::string method;
  std::vector<std::string> settings;  // key=value
  std::string cache_policy = "tiles";
  std::string output;
  bool overwrite = false;
};

ParamMap parse_settings(const std::vector<std::string>& settings) {
  ParamMap params;
  for (const auto& setting : settings) {
    const auto eq = setting.find('=');
    if (eq == std::string::npos || eq == 0) fail("--set '{}' is not of the form key=value", setting);
    if (!params.emplace(setting.substr(0, eq), setting.substr(eq + 1)).second)
      fail("--set gives '{}' twice", setting.substr(0, eq));
  }
  return params;
}

template <typename T>
std::vector<T> to_vector(const torch::Tensor& t) {
  auto flat = t.contiguous().view(-1);
  return std::vector<T>(flat.data_ptr<T>(), flat.data_ptr<T>() + flat.numel());
}

std::vector<hsize_t> shape_of(const torch::Tensor& t) {
  return std::vector<hsize_t>(t.sizes().begin(), t.sizes().end());
}

void run_quantize(const QuantizeOptions& options) {
  check_output_path("--output", options.output, {options.input}, options.overwrite);
  const Role role = options.role == "key" ? Role::Key : Role::Value;
  const auto input = h5::File::open_read(options.input);
  std::vector<hsize_t> shape;
  const auto values = input.open_dataset(options.dataset).read<float>(&shape);
  if (shape.size() != 3)
    fail("{}: dataset '{}' has rank {}, expected 3 ([heads, tokens, head_dim])", options.input, options.dataset,
         shape.size());
  if (shape[0] == 0 || shape[1] == 0 || shape[2] == 0)
    fail("{}: dataset '{}' has shape [{}, {}, {}]; every dimension must be at least 1", options.input,
         options.dataset, shape[0], shape[1], shape[2]);
  const auto non_finite = std::find_if(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
  if (non_finite != values.end())
    fail("{}: dataset '{}' holds a non-finite value ({} at flat index {}); quantizers need finite input",
         options.input, options.dataset, *non_finite, non_finite - values.begin());
  auto x =
      torch::from_blob(const_cast<float*>(values.data()),
                       {static_cast<int64_t>(shape[0]), static_cast<int64_t>(shape[1]), static_cast<int64_t>(shape[2])},
                       torch::kFloat32);
  const auto quantizer = make_quantizer(options.method, parse_settings(options.settings), x.size(2));
  const auto policy = options.cache_policy == "full" ? InspectPolicy::Cache : InspectPolicy::Tiles;
  const auto result = inspect_quantizer(*quantizer, x, role, policy);
  const auto error = metrics::token_scale_error(x, result.dequantized);
  const double signal = x.to(torch::kFloat64).pow(2).sum().item<double>();
  const double relative_mse = signal > 0 ? error.total.sum().item<double>() / signal : 0.0;

  h5::write_new_file(options.output, options.overwrite, [&](h5::File& out) {
    out.set_attribute("kvdrift_version", KVDRIFT_VERSION);
    out.set_attribute("git_revision", KVDRIFT_GIT_REVISION);
    out.set_attribute("input", options.input);
    out.set_attribute("dataset", options.dataset);
    out.set_attribute("role", role_name(role));
    out.set_attribute("method", quantizer->method());
    out.set_attribute("cache_policy", options.cache_policy);
    for (const auto& [key, value] : quantizer->resolved_params()) out.set_attribute("param." + key, value);
    out.set_attribute("bits_per_element", result.bits_per_element);
    out.set_attribute("quantized_bits_per_element", result.quantized_bits_per_element);
    out.set_attribute("quantized_positions", std::vector<int64_t>{result.first_quantized, result.end_quantized});
    out.set_attribute("relative_mse", relative_mse);
    out.write("dequantized", to_vector<float>(result.dequantized), shape_of(result.dequantized), 4);
    if (result.stored.codes.defined() && result.stored.codes.numel() > 0) {
      auto codes = result.stored.codes.reshape({x.size(0), -1, x.size(2)});  // codes are token-major
      auto dataset = out.write("codes", to_vector<uint8_t>(codes), shape_of(codes), 4);
      dataset.set_attribute("bits", result.stored.bits);
    }
    for (const auto& [name, param] : result.stored.params) {
      auto values32 = param.values.to(torch::kFloat32);
      auto dataset = out.write("params/" + name, to_vector<float>(values32), shape_of(values32), 4);
      dataset.set_attribute("storage_dtype", stored_dtype_name(param.dtype));
      dataset.set_attribute("layout", "[tiles, ...]: tile = head * tiles_per_head + block");
      dataset.set_attribute("saturated", param.saturated);
      dataset.set_attribute("flushed_to_zero", param.flushed_to_zero);
    }
    for (const auto& [name, tensor] : {std::pair{"E_M", error.magnitude}, std::pair{"E_D", error.direction},
                                       std::pair{"E_T", error.total}, std::pair{"norm_ratio", error.norm_ratio}})
      out.write(std::string("rows/") + name, to_vector<double>(tensor), shape_of(tensor), 4);
  });
  // A parameter its storage dtype cannot hold gives a plausible-looking but wrong dequantization.
  for (const auto& [name, param] : result.stored.params)
    if (param.saturated + param.flushed_to_zero > 0)
      spdlog::warn("{}: {} of {} stored parameters '{}' exceed {}'s largest finite value (saturated or inf) and {} "
                   "rounded to 0; see params/{} in {}",
                   quantizer->method(), param.saturated, param.values.numel(), name, stored_dtype_name(param.dtype),
                   param.flushed_to_zero, name, options.output);
  spdlog::info("{} {} ({}): {:.4f} bits/element, relative MSE {:.3e}; wrote {}", quantizer->method(), role_name(role),
               options.cache_policy, result.bits_per_element, relative_mse, options.output);
}

struct DumpOptions {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  std::string output;
  bool overwrite = false;
};

// Records the keys and values of each layer as the model writes them.
class RecordingCache final : public KVCache {
 public:
  explicit RecordingCache(int64_t layers) : keys_(layers), values_(layers) {}
  using KVCache::update;
  std::pair<torch::Tensor, torch::Tensor> update(int64_t layer, const RowSpans& spans, const torch::Tensor& keys,
                                                 const torch::Tensor& values) override {
    if (!spans.is_aligned() || spans.start(0) != 0) fail("dump-kv records a single prefill");
    keys_[layer] = keys;
    values_[layer] = values;
    return {keys, values};
  }
  int64_t capacity() const override { return std::numeric_limits<int64_t>::max(); }
  std::vector<torch::Tensor> keys_, values_;
};

void run_dump(const DumpOptions& options) {
  check_output_path("--output", options.output, {options.model, options.tokenizer}, options.overwrite);
  auto tokenizer = load_tokenizer(options.tokenizer);
  auto model = load_model(options.model, torch::kCPU, torch::kFloat32);
  require_tokenizer_fits(model, *tokenizer, options.tokenizer);
  auto tokens = tokenizer->encode(options.prompt, tokenizer->bos_id().has_value());
  RecordingCache cache(model.config().n_layers);
  model.forward(torch::tensor(tokens).unsqueeze(0), 0, cache);
  h5::write_new_file(options.output, options.overwrite, [&](h5::File& out) {
    out.set_attribute("model", options.model);
    out.set_attribute("prompt", options.prompt);
    out.write("tokens", tokens, {tokens.size()});
    for (int64_t l = 0; l < model.config().n_layers; ++l) {
      for (const auto& [name, tensor] : {std::pair{"keys", cache.keys_[l]}, std::pair{"values", cache.values_[l]}}) {
        auto heads = tensor[0].to(torch::kFloat32).contiguous();  // [kv_heads, tokens, head_dim]
        out.write(fmt::format("layer{}/{}", l, name), to_vector<float>(heads), shape_of(heads));
      }
    }
  });
  spdlog::info("wrote keys and values of {} layers for {} tokens to {}", model.config().n_layers, tokens.size(),
               options.output);
}

}  // namespace

void register_quantize(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<QuantizeOptions>();
  auto* sub = app.add_subcommand("quantize", "quantize one [heads, tokens, head_dim] tensor and write what is stored");
  sub->add_option("--input", options->input, "HDF5 file")->required();
  sub->add_option("--dataset", options->dataset, "float32 dataset [heads, tokens, head_dim]")->required();
  sub->add_option("--role", options->role, "key or value")->required()->check(CLI::IsMember({"key", "value"}));
  sub->add_option("--method", options->method, "quantizer method")->required();
  sub->add_option("--set", options->settings, "method parameter key=value (repeatable)");
  sub->add_option("--cache-policy", options->cache_policy,
                  "tiles: every token in complete tiles; full: the method's sink/tail/residual after a prefill")
      ->check(CLI::IsMember({"tiles", "full"}))
      ->capture_default_str();
  sub->add_option("--output", options->output, "output HDF5 file")->required();
  sub->add_flag("--overwrite", options->overwrite, "replace the output file if it exists");
  sub->callback([options, &command] { command = [options] { run_quantize(*options); }; });

  auto dump = std::make_shared<DumpOptions>();
  auto* dump_sub = app.add_subcommand("dump-kv", "write the keys/values of a prompt's prefill (input for quantize)");
  dump_sub->add_option("--model", dump->model, "model")->required();
  dump_sub->add_option("--tokenizer", dump->tokenizer, "tokenizer")->required();
  dump_sub->add_option("--prompt", dump->prompt, "prompt text")->required();
  dump_sub->add_option("--output", dump->output, "output HDF5 file")->required();
  dump_sub->add_flag("--overwrite", dump->overwrite, "replace the output file if it exists");
  dump_sub->callback([dump, &command] { command = [dump] { run_dump(*dump); }; });
}

}  // namespace kvdrift::cli
