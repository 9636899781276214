#include "metrics/metric_table.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <map>

#include "core/error.h"

namespace kvdrift {

namespace {

const std::vector<std::string> kStep = {"step"};
const std::vector<std::string> kLoggedStepLayer = {"logged_step", "layer"};
const std::vector<std::string> kPositionLayer = {"position", "layer"};
const std::vector<std::string> kLayer = {"layer"};
const std::vector<std::string> kScalar = {};
const std::vector<Lane> kAllLanes = {Lane::Static, Lane::TeacherForced, Lane::OneStep, Lane::FreeRunning};
// The lanes fed the reference's tokens, so their logits compare with its at every step.
const std::vector<Lane> kTeacherForced = {Lane::TeacherForced, Lane::OneStep};
const std::vector<Lane> kAttentionLanes = {Lane::Static, Lane::TeacherForced, Lane::OneStep};
const std::vector<Lane> kDecodingLanes = {Lane::TeacherForced, Lane::FreeRunning};

std::vector<MetricSpec> build_table() {
  std::vector<MetricSpec> table = {
      {metric::kl, kStep, "float32", kTeacherForced, "KL(p_ref || p_lane) over the full vocabulary, nats"},
      {metric::top1_agree, kStep, "float32", kTeacherForced, "1 where the lane's argmax equals the reference's, else 0"},
      {metric::logp_delta, kStep, "float32", kTeacherForced,
       "log p_ref(r_t) - log p_lane(r_t), r_t the reference's token"},
      {metric::kl_sampled, kStep, "float32", kTeacherForced,
       "KL between the tempered, truncated distributions the lanes sample from, nats; +inf where the reference "
       "keeps a token the lane cuts (only when sampling reshapes the distribution)"},
      {metric::attn_rel_l2, kLoggedStepLayer, "float32", kAttentionLanes,
       "||a - a_ref|| / ||a_ref|| of the attention output (with metrics.attention_error)"},
      {metric::attn_cos, kLoggedStepLayer, "float32", kAttentionLanes,
       "cosine of the attention output a and a_ref (with metrics.attention_error)"},
      {metric::match, kStep, "float32", {Lane::FreeRunning}, "1 where the lane's token equals the reference's"},
      {metric::bits_per_element, kScalar, "float64", kAllLanes, "bits per element the lane's cache actually stores"},
      {metric::fraction_quantized, kScalar, "float64", kAllLanes, "fraction of the cache's tokens held quantized"},
      {metric::quantize_seconds, kScalar, "float64", kAllLanes,
       "wall time spent quantizing and dequantizing the lane's blocks (host time)"},
      {metric::onset_step, kScalar, "float64", kAllLanes,
       "the first step whose forward read at least one quantized key or value position (any layer); -1: none"},
      {metric::onset_step_per_layer, kLayer, "float32", kAllLanes,
       "per layer, the first step whose forward read a quantized position of that layer; -1: none"},
      {metric::fraction_read_quantized, kStep, "float32", kAllLanes,
       "fraction of the key and value positions the step's forward read (over layers) that were quantized"},
  };
  const std::map<std::string, std::string> component_meanings = {
      {"E_M", "magnitude error (||x|| - ||x_hat||)^2"},
      {"E_D", "direction error 2 ||x|| ||x_hat|| (1 - cos theta)"},
      {"E_T", "total error ||x - x_hat||^2 = E_M + E_D"},
      {"norm_ratio", "||x_hat|| / ||x|| - 1"}};
  const std::map<std::string, std::string> against_meanings = {
      {"quant", "what attention reads against what the lane wrote"},
      {"drift", "the lane's cache rows against the reference's"}};
  for (const char* tensor : {"key", "value"}) {
    for (const char* against : {"quant", "drift"}) {
      const std::string group = metric::token_scale_group(tensor, against);
      const std::vector<Lane>& lanes = std::string(against) == "quant" ? kAllLanes : kDecodingLanes;
      for (const char* component : metric::token_scale_components)
        table.push_back({group + "/" + component, kPositionLayer, "float32", lanes,
                         fmt::format("token-scale {} of the {}s, {}, mean over KV heads (with metrics.token_scale)",
                                     component_meanings.at(component), tensor, against_meanings.at(against))});
      table.push_back({group + "/" + metric::worst5_shares[0], kScalar, "float64", lanes,
                       "share of E_M in E_T among the worst 5% of rows (layer, kv-head, position) by E_T, as a ratio "
                       "of sums"});
      table.push_back({group + "/" + metric::worst5_shares[1], kScalar, "float64", lanes,
                       "the same share as the mean over those rows of E_M / E_T (rows with E_T = 0 left out)"});
      table.push_back({group + "/" + metric::worst5_relative_per_layer, kLayer, "float32", lanes,
                       "per layer, over the rows read quantized: share of E_M in E_T among the worst 5% of rows "
                       "(kv-head, position) by relative error E_T / |x|^2, as sum E_M/|x|^2 over sum E_T/|x|^2; NaN "
                       "where the layer read nothing quantized"});
      table.push_back({group + "/" + metric::worst5_relative_pooled, kScalar, "float64", lanes,
                       "the same share over every layer's worst 5% rows together (each layer ranked on its own)"});
      if (std::string(against) != "quant") continue;
      table.push_back({group + "/" + metric::norm_mean_per_layer, kLayer, "float32", lanes,
                       fmt::format("per layer, mean token norm |x| of the {} rows read quantized; NaN where none",
                                   tensor)});
      table.push_back({group + "/" + metric::norm_max_per_layer, kLayer, "float32", lanes,
                       fmt::format("per layer, largest token norm |x| of the {} rows read quantized; NaN where none",
                                   tensor)});
      table.push_back({group + "/" + metric::saturated_params, kScalar, "float64", lanes,
                       "stored parameters beyond their storage dtype's largest finite value (float16: 65504, "
                       "becoming inf; float8_e4m3: 448, saturating), over the lane's blocks and layers"});
      table.push_back({group + "/" + metric::flushed_to_zero_params, kScalar, "float64", lanes,
                       "nonzero stored parameters that their storage dtype rounded to 0"});
    }
  }
  return table;
}

}  // namespace

std::string metric::token_scale_group(const std::string& tensor, const std::string& against) {
  return tensor + "/" + against;
}

bool MetricSpec::grows_along_steps() const {
  return !axes.empty() && (axes.front() == "step" || axes.front() == "logged_step");
}

std::string MetricSpec::axes_text() const { return fmt::format("{}", fmt::join(axes, ",")); }

const std::vector<MetricSpec>& metric_table() {
  static const std::vector<MetricSpec> table = build_table();
  return table;
}

const MetricSpec& metric_spec(const std::string& name) {
  for (const MetricSpec& spec : metric_table())
    if (spec.name == name) return spec;
  throw InternalError(fmt::format("the metric table (metrics/metric_table.cpp) has no entry '{}'", name));
}

std::string metric_table_json() {
  nlohmann::ordered_json table = nlohmann::ordered_json::array();
  for (const MetricSpec& spec : metric_table()) {
    std::vector<std::string> lanes;
    for (Lane lane : spec.lanes) lanes.emplace_back(lane_name(lane));
    table.push_back({{"name", spec.name}, {"axes", spec.axes}, {"dtype", spec.dtype}, {"lanes", lanes},
                     {"meaning", spec.meaning}});
  }
  return table.dump(1);
}

}  // namespace kvdrift
