#pragma once
// The local launcher: runs points on this machine with a fixed number of worker processes, worker w
// pinned to devices[w % devices.size()] (cuda:N: CUDA_VISIBLE_DEVICES=N).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "sweep/plan.h"
#include "sweep/sweep_file.h"

namespace kvdrift::sweep {

struct LocalRunSummary {
  size_t done = 0;
  size_t failed = 0;
  bool interrupted = false;  // SIGINT/SIGTERM: the running points were stopped, the rest not started
};

// Each worker's intra-op threads: $KVDRIFT_THREADS when set (passed on as it is), else launcher.threads,
// else the cores this process may use divided among the workers (at least 1).
struct WorkerThreads {
  enum class From { Environment, Launcher, CoreShare } from;
  int64_t count;          // 0 when From::Environment (each run reads the variable itself)
  std::string described;  // for the status line, e.g. "1 (2 cores / 2 workers)"
};
WorkerThreads worker_threads(const LocalLauncher& launcher);

// Runs `points` and waits for them, printing one line per finished point to stdout.
LocalRunSummary run_local(const Manifest& manifest, const std::vector<const Point*>& points,
                          const LocalLauncher& launcher);

}  // namespace kvdrift::sweep
