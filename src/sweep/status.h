#pragma once
// `kvdrift sweep status`: the state of every planned point, from its run directory and, for points
// submitted to Slurm, from squeue (rules: docs/sweep.md, "Status").
#include <string>
#include <vector>

#include "sweep/plan.h"

namespace kvdrift::sweep {

enum class State { Done, Running, Failed, Pending };
const char* state_name(State state);  // "done", "running", "failed", "pending"

struct PointStatus {
  State state = State::Pending;
  std::string log;          // the log to show for a failed point: log.txt, else the Slurm task log
  std::string exit_status;  // of the latest attempt, "" when none was recorded
  std::string slurm;        // "job 12 task 3: PD" while queued, or sacct's state of a failed task
  std::string problem;      // a failed point's run.h5 that exists but is not its result: why (check_run_log)
};

// Whether a point's run.h5 is its finished run log: root attribute complete = 1, and written for the
// point's config (the config the log records equals the point's, as a resume requires: a run.h5
// copied from another point is not this point's result). `problem` says why a run.h5 that exists is
// not done when it is not merely unfinished: unreadable, or another config's. Opens it read-only.
struct RunLogCheck {
  bool done = false;
  std::string problem;
};
RunLogCheck check_run_log(const PointFiles& files);

// One status per manifest point, in manifest order.
std::vector<PointStatus> point_statuses(const Manifest& manifest);

// The last `count` lines of a text file (fewer if it is shorter; none if it cannot be read).
std::vector<std::string> last_lines(const std::string& path, size_t count);

}  // namespace kvdrift::sweep
