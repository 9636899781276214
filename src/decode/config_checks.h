#pragma once
// What a run checks of its config against its model before it decodes: the engine when it starts, and
// `kvdrift sweep plan` for every point, so that a sweep refuses what its runs would refuse.
#include <memory>
#include <vector>

#include "io/run_config.h"
#include "model/config.h"
#include "quant/quantizer.h"

namespace kvdrift {

// One quantizer of the config, built for the model's head_dim; errors name where the entry was set
// and the quantizer ("demo.yaml:12: quantizers 'kivi': ..."), also a sink longer than the model's context.
std::shared_ptr<const Quantizer> make_config_quantizer(const QuantizerSettings& settings, const ModelConfig& model);

// The config's quantizers, in its order.
std::vector<std::shared_ptr<const Quantizer>> make_config_quantizers(const RunConfig& config,
                                                                    const ModelConfig& model);

// A chunked prefill's chunk must fit in the model's context.
void check_prefill_fits(const RunConfig& config, const ModelConfig& model);

}  // namespace kvdrift
