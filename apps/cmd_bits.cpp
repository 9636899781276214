// `kvdrift bits`: each quantizer of a config, its bits per element at stated sequence lengths for the
// config's model (codes + parameters + full-precision regions), so that methods are compared at
// matched storage before anything runs.
#include <fmt/format.h>

#include <iostream>

#include "commands.h"
#include "core/error.h"
#include "decode/config_checks.h"
#include "io/run_config.h"
#include "model/checkpoint.h"
#include "quant/storage.h"

namespace kvdrift::cli {

namespace {

constexpr int64_t kMaxBitsLength = int64_t{1} << 53;

struct BitsOptions {
  std::string config;
  std::vector<std::string> overrides;
  std::vector<int64_t> lengths = {512, 4096, 32768};
};

void run_bits(const BitsOptions& options) {
  const RunConfig config = load_run_config(options.config, options.overrides);
  const ModelConfig model = read_model_config(config.model.path);
  std::cout << fmt::format("{}: head_dim {}; bits per element of K and V at each length (full-precision regions "
                           "at 16 bits)\n",
                           config.model.path, model.head_dim);
  std::string header = fmt::format("{:<24} {:<10} {:>6} {:>7}", "quantizer", "method", "codes", "params");
  for (int64_t length : options.lengths) header += fmt::format(" {:>9}", fmt::format("@{}", length));
  std::cout << header << "\n";
  const auto quantizers = make_config_quantizers(config, model);
  for (size_t i = 0; i < quantizers.size(); ++i) {
    const auto& q = config.quantizers[i];
    const Quantizer* quantizer = quantizers[i].get();
    const StorageCost asymptotic = storage_cost(*quantizer, model.head_dim, 1);
    std::string line = fmt::format("{:<24} {:<10} {:>6.3f} {:>7.4f}", q.name, q.method, asymptotic.codes,
                                   asymptotic.parameters);
    for (int64_t length : options.lengths)
      line += fmt::format(" {:>9.4f}", storage_cost(*quantizer, model.head_dim, length).bits_per_element);
    std::cout << line << "\n";
  }
}

}  // namespace

void register_bits(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<BitsOptions>();
  auto* sub = app.add_subcommand("bits", "bits per element of each quantizer of a config, at stated sequence lengths");
  sub->add_option("config", options->config, "YAML config")->required();
  sub->add_option("--set", options->overrides, "override a config key: a.b=value (repeatable)");
  // Up to 2^53 positions, where a count of positions is still exact in the double the costs are summed in.
  sub->add_option("--length", options->lengths, "sequence lengths (repeatable; default 512 4096 32768)")
      ->check(CLI::Range(int64_t{1}, kMaxBitsLength));
  sub->callback([options, &command] { command = [options] { run_bits(*options); }; });
}

}  // namespace kvdrift::cli
