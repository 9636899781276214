#include "sweep/status.h"

#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/line_difference.h"
#include "io/hdf5.h"
#include "io/run_config.h"
#include "sweep/point_run.h"
#include "sweep/slurm.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

// The point's latest Slurm submission.
struct SlurmTask {
  std::string job_id;
  std::string key;  // "JOBID_TASK", as squeue and sacct name array tasks
  std::string log;
};

bool queued_as_running(const std::string& state) {
  static const std::set<std::string> kRunning = {"R", "CG", "CF", "S", "ST", "SO", "RS"};
  return kRunning.count(state) > 0;
}

bool queued_as_pending(const std::string& state) {
  static const std::set<std::string> kPending = {"PD", "RQ", "RH", "RF", "RD", "SE"};
  return kPending.count(state) > 0;
}

std::string first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Whether `path` exists and was modified no earlier than `reference`: a Slurm log older than the
// point's config belongs to an attempt at a config that plan --force has since replaced.
bool exists_since(const std::string& path, const std::string& reference) {
  std::error_code error;
  const auto time = fs::last_write_time(path, error);
  if (error) return false;
  const auto reference_time = fs::last_write_time(reference, error);
  return error || time >= reference_time;
}

}  // namespace

const char* state_name(State state) {
  switch (state) {
    case State::Done:
      return "done";
    case State::Running:
      return "running";
    case State::Failed:
      return "failed";
    case State::Pending:
      return "pending";
  }
  return "?";
}

RunLogCheck check_run_log(const PointFiles& files) {
  std::error_code error;
  if (!fs::exists(files.output, error)) return {};
  try {
    const h5::File file = h5::File::open_read(files.output);
    if (!file.has_attribute("complete") || file.attribute<int64_t>("complete") != 1) return {};
    const std::string recorded = file.read_string("config/yaml");
    const std::string expected = load_run_config(files.config, {}).resolved_yaml();
    if (recorded == expected) return {true, ""};
    return {false, fmt::format("run.h5 is complete but was written for another config than {} ({})", files.config,
                               describe_line_difference(recorded, expected, "in run.h5", "in config.yaml"))};
  } catch (const Error& e) {
    return {false, fmt::format("run.h5 cannot be read: {}", e.what())};
  }
}

std::vector<PointStatus> point_statuses(const Manifest& manifest) {
  std::map<std::string, SlurmTask> latest_task;  // point id -> its latest Slurm submission
  std::vector<std::string> job_ids;
  for (const Submission& submission : read_submissions(manifest.directory)) {
    job_ids.push_back(submission.job_id);
    for (size_t task = 0; task < submission.point_ids.size(); ++task)
      latest_task[submission.point_ids[task]] = {submission.job_id, fmt::format("{}_{}", submission.job_id, task),
                                                 task_log_path(manifest.directory, submission.number, task)};
  }
  const auto queue = latest_task.empty() ? std::nullopt : queued_array_tasks();

  std::vector<PointStatus> statuses;
  std::vector<size_t> failed_in_slurm;
  for (const Point& point : manifest.points) {
    const PointFiles files = manifest.files(point);
    PointStatus& status = statuses.emplace_back();
    std::error_code error;
    if (fs::exists(files.exit_status, error)) status.exit_status = first_line(files.exit_status);
    const RunLogCheck run_log = check_run_log(files);
    if (run_log.done) {
      status.state = State::Done;
      continue;
    }
    const auto task = latest_task.find(point.id);
    const bool submitted = task != latest_task.end();
    if (submitted && queue) {
      const auto queued = queue->find(task->second.key);
      if (queued != queue->end() && (queued_as_running(queued->second) || queued_as_pending(queued->second))) {
        status.state = queued_as_running(queued->second) ? State::Running : State::Pending;
        status.slurm = fmt::format("job {} ({}): {}", task->second.job_id, task->second.key, queued->second);
        continue;
      }
    }
    if (fs::exists(files.running, error)) {
      // A marker from another host is trusted unless squeue has just said the point's task is gone.
      const std::optional<bool> live = marker_is_live(first_line(files.running));
      if (live.value_or(!(submitted && queue))) {
        status.state = State::Running;
        continue;
      }
    }
    const bool slurm_log = submitted && exists_since(task->second.log, files.config);
    if (fs::exists(files.log, error) || !status.exit_status.empty() || slurm_log || !run_log.problem.empty()) {
      status.state = State::Failed;
      status.problem = run_log.problem;
      status.log = fs::exists(files.log, error) ? files.log : slurm_log ? task->second.log : "";
      if (submitted) failed_in_slurm.push_back(statuses.size() - 1);
    }
  }

  if (!failed_in_slurm.empty()) {
    const auto accounted = accounted_array_tasks(job_ids);
    for (size_t index : failed_in_slurm) {
      const SlurmTask& task = latest_task.at(manifest.points[index].id);
      const auto state = accounted.find(task.key);
      statuses[index].slurm = fmt::format("job {} ({}){}, Slurm log {}", task.job_id, task.key,
                                          state != accounted.end() ? ": " + state->second : "", task.log);
    }
  }
  return statuses;
}

std::vector<std::string> last_lines(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary);
  std::deque<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    lines.push_back(line);
    if (lines.size() > count) lines.pop_front();
  }
  return {lines.begin(), lines.end()};
}

}  // namespace kvdrift::sweep
