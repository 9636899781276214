#include "decode/config_checks.h"

#include "core/error.h"

namespace kvdrift {

std::shared_ptr<const Quantizer> make_config_quantizer(const QuantizerSettings& settings, const ModelConfig& model) {
  try {
    std::shared_ptr<const Quantizer> quantizer = make_quantizer(settings.method, settings.params, model.head_dim);
    // A sink the context cannot hold would leave the method unmeasured: nothing is ever quantized.
    const int64_t sink = quantizer->policy(Role::Key).sink;
    if (sink > model.max_seq_len)
      fail("its full-precision sink of {} tokens is larger than the model's context of {} positions", sink,
           model.max_seq_len);
    return quantizer;
  } catch (const Error& e) {
    fail("{}: quantizers '{}': {}", settings.origin, settings.name, e.what());
  }
}

std::vector<std::shared_ptr<const Quantizer>> make_config_quantizers(const RunConfig& config,
                                                                    const ModelConfig& model) {
  std::vector<std::shared_ptr<const Quantizer>> quantizers;
  for (const QuantizerSettings& settings : config.quantizers)
    quantizers.push_back(make_config_quantizer(settings, model));
  return quantizers;
}

void check_prefill_fits(const RunConfig& config, const ModelConfig& model) {
  if (config.decoding.prefill == PrefillMode::Chunked && config.decoding.prefill_chunk > model.max_seq_len)
    fail("{}: decoding.prefill_chunk = {} is larger than the model's context of {} positions", config.source_path,
         config.decoding.prefill_chunk, model.max_seq_len);
}

}  // namespace kvdrift
