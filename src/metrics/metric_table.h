#pragma once
// The one definition of what a run log holds per lane (SPEC §3): every metric array and scalar the
// engine reports, with its axes, dtype, the lanes that log it and what it means. The engine names what
// it reports by the constants below, the run log takes each array's axes from the table, refuses names
// it lacks and writes the whole table into every log (/schema/metrics, JSON), and analysis/ reads it
// from there. docs/hdf5-schema.md explains the same entries in prose (a test keeps them in step).
#include <string>
#include <vector>

#include "io/run_config.h"

namespace kvdrift {

struct MetricSpec {
  std::string name;               // an array's dataset path in its lane's group, or a scalar's attribute path
  std::vector<std::string> axes;  // an array's axes, outermost first (step | logged_step | position, layer); a scalar none
  std::string dtype;              // float32 (arrays) | float64 (scalars)
  std::vector<Lane> lanes;        // the lanes that report it
  std::string meaning;

  bool is_array() const { return !axes.empty(); }
  // Arrays whose outermost axis counts decoding steps grow while a sample decodes.
  bool grows_along_steps() const;
  std::string axes_text() const;  // "logged_step,layer": the datasets' `axes` attribute
};

const std::vector<MetricSpec>& metric_table();
// The entry named `name`. The engine reports only what the table defines, so a missing name is an
// InternalError naming it.
const MetricSpec& metric_spec(const std::string& name);
// The table as JSON: [{"name", "axes", "dtype", "lanes", "meaning"}, ...] in table order.
std::string metric_table_json();

// The names the engine reports.
namespace metric {
inline constexpr const char* kl = "kl";
inline constexpr const char* top1_agree = "top1_agree";
inline constexpr const char* logp_delta = "logp_delta";
inline constexpr const char* kl_sampled = "kl_sampled";
inline constexpr const char* attn_rel_l2 = "attn_rel_l2";
inline constexpr const char* attn_cos = "attn_cos";
inline constexpr const char* match = "match";
inline constexpr const char* bits_per_element = "bits_per_element";
inline constexpr const char* fraction_quantized = "fraction_quantized";
inline constexpr const char* quantize_seconds = "quantize_seconds";
inline constexpr const char* onset_step = "onset_step";
inline constexpr const char* onset_step_per_layer = "onset_step_per_layer";
inline constexpr const char* fraction_read_quantized = "fraction_read_quantized";
// Token-scale error of `tensor` (key | value) compared `against` (quant: what attention reads vs what
// the lane wrote; drift: the lane's cache vs the reference's): "key/quant" and so on.
std::string token_scale_group(const std::string& tensor, const std::string& against);
inline constexpr const char* token_scale_components[] = {"E_M", "E_D", "E_T", "norm_ratio"};
inline constexpr const char* worst5_shares[] = {"worst5_magnitude_share", "worst5_magnitude_share_mean_of_ratios"};
// The like-for-like worst-rows share (metrics::worst_rows_relative_share), per layer and pooled.
inline constexpr const char* worst5_relative_per_layer = "worst5_relative_share_per_layer";
inline constexpr const char* worst5_relative_pooled = "worst5_relative_share_pooled";
// Of what a lane's cache quantized, per layer (key/quant and value/quant only).
inline constexpr const char* norm_mean_per_layer = "norm_mean_per_layer";
inline constexpr const char* norm_max_per_layer = "norm_max_per_layer";
inline constexpr const char* saturated_params = "saturated_params";
inline constexpr const char* flushed_to_zero_params = "flushed_to_zero_params";
}  // namespace metric

}  // namespace kvdrift
