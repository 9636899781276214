#pragma once
// The Slurm launcher: one job array per submission (ROOT/NAME/slurm/array-<n>.sbatch with its task
// list array-<n>.tasks, recorded in slurm/jobs.txt), and what squeue/sacct say about recorded jobs.
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "sweep/plan.h"
#include "sweep/sweep_file.h"

namespace kvdrift::sweep {

struct Submission {
  std::string job_id;
  int number = 0;                      // n of array-<n>
  std::vector<std::string> point_ids;  // array task i runs point_ids[i]
};

// Fails with a clear message unless sbatch is on PATH.
void require_sbatch();

// Writes the batch script and task list of the next submission for `points`, submits it with
// `sbatch --parsable` and records the job id in slurm/jobs.txt.
Submission submit_array(const SweepFile& sweep, const std::vector<const Point*>& points);

// The recorded submissions, oldest first.
std::vector<Submission> read_submissions(const std::string& sweep_directory);

// Slurm's log of array task `task` of submission `number`.
std::string task_log_path(const std::string& sweep_directory, int number, size_t task);

// "JOBID_TASK" -> squeue's compact state (R, PD, CG, ...) for the current user's array tasks;
// nullopt when squeue is not on PATH or fails.
std::optional<std::map<std::string, std::string>> queued_array_tasks();

// "JOBID_TASK" -> sacct's state (CANCELLED, FAILED, TIMEOUT, ...) for the array tasks of `job_ids`;
// empty when sacct is missing or accounting is off (the usual case on small clusters).
std::map<std::string, std::string> accounted_array_tasks(const std::vector<std::string>& job_ids);

}  // namespace kvdrift::sweep
