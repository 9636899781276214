#pragma once
// A run log's /summary (docs/hdf5-schema.md, "Summary"): per quantizer and lane, over the finished
// samples as the file holds them, means, slopes, growth after the onset, the Kaplan–Meier median of the
// first divergence, and 95% percentile bootstrap intervals over samples (prompts are the independent
// units; steps of one sample are not).
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "io/hdf5.h"
#include "io/run_config.h"

namespace kvdrift {

// One quantizer's line of the table `kvdrift run` prints; NaN where the run has no such lane.
struct RunSummaryRow {
  std::string quantizer;
  double mean_kl;                  // teacher_forced KL, mean over samples and compared steps
  double first_divergence_median;  // free_running, Kaplan–Meier (+inf: not reached)
  double bits_per_element;         // mean over samples and lanes
};

// How the summary counts steps, from the run's settings. first_step: the first step whose logits can
// differ from the reference's (1 after a full-precision prefill, whose logits all lanes share; 0 after
// a chunked one, which reads quantized caches).
struct SummarySettings {
  int64_t first_step = 1;
  AnalysisSettings analysis;  // how growth after the onset is measured
};
inline SummarySettings summary_settings(const RunConfig& config) {
  return {config.decoding.prefill == PrefillMode::Chunked ? 0 : 1, config.analysis};
}

// Writes /summary/<name> into `summary` for each of `quantizer_names` (in that order) from the samples
// `finished` of `samples`, and returns the rows.
std::vector<RunSummaryRow> write_summary(const h5::Group& samples, const std::set<int64_t>& finished,
                                         const std::vector<std::string>& quantizer_names,
                                         const SummarySettings& settings, h5::Group& summary);

// The rows of the summary a finished log at `path` holds.
std::vector<RunSummaryRow> read_summary_rows(const std::string& path, const std::vector<std::string>& quantizer_names);

}  // namespace kvdrift
