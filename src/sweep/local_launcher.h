#pragma once
// The local launcher: runs points on this machine with a fixed number of worker processes, worker w
// pinned to devices[w % devices.size()] (cuda:N: CUDA_VISIBLE_DEVICES=N).
#include <cstddef>
#include <vector>

#include "sweep/plan.h"
#include "sweep/sweep_file.h"

namespace kvdrift::sweep {

struct LocalRunSummary {
  size_t done = 0;
  size_t failed = 0;
  bool interrupted = false;  // SIGINT/SIGTERM: the running points were stopped, the rest not started
};

// Runs `points` and waits for them, printing one line per finished point to stdout.
LocalRunSummary run_local(const Manifest& manifest, const std::vector<const Point*>& points,
                          const LocalLauncher& launcher);

}  // namespace kvdrift::sweep
