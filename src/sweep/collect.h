#pragma once
// `kvdrift sweep collect`: one table over a sweep, ROOT/NAME/summary.csv and ROOT/NAME/summary.h5,
// with a row per (completed point, quantizer) and a row per incomplete point. The format is agreed
// with analysis/plot_sweep.py and documented in docs/sweep.md ("Collected summary").
#include <string>
#include <utility>
#include <vector>

#include "sweep/plan.h"

namespace kvdrift::sweep {

struct CollectSummary {
  size_t complete_points = 0;
  std::vector<std::pair<std::string, std::string>> incomplete;  // point id, state
  std::string csv_path, h5_path;
  size_t rows = 0;
};

// Reads every point's state and, for finished ones, /summary/<quantizer> of its run.h5; writes both
// files atomically (temporary file, then rename).
CollectSummary collect(const Manifest& manifest);

}  // namespace kvdrift::sweep
