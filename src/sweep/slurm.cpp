#include "sweep/slurm.h"

#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "sweep/process.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

std::string slurm_directory(const std::string& sweep_directory) {
  return (fs::path(sweep_directory) / "slurm").string();
}

std::string script_path(const std::string& sweep_directory, int number) {
  return fmt::format("{}/array-{}.sbatch", slurm_directory(sweep_directory), number);
}

std::string tasks_path(const std::string& sweep_directory, int number) {
  return fmt::format("{}/array-{}.tasks", slurm_directory(sweep_directory), number);
}

std::string jobs_path(const std::string& sweep_directory) { return slurm_directory(sweep_directory) + "/jobs.txt"; }

// A word for the shell: single-quoted, with embedded single quotes spelled '\''.
std::string shell_quoted(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::string batch_script(const SweepFile& sweep, int number, size_t tasks) {
  const SlurmLauncher& slurm = sweep.slurm;
  const std::string dir = sweep.directory();
  std::string text = "#!/bin/bash\n";
  const auto option = [&text](const std::string& line) { text += "#SBATCH " + line + "\n"; };
  option("--job-name=" + sweep.name);
  option(
      fmt::format("--array=0-{}{}", tasks - 1, slurm.max_parallel > 0 ? fmt::format("%{}", slurm.max_parallel) : ""));
  option(fmt::format("--output={}/array-{}-%a.log", slurm_directory(dir), number));
  if (!slurm.partition.empty()) option("--partition=" + slurm.partition);
  if (!slurm.account.empty()) option("--account=" + slurm.account);
  if (!slurm.time.empty()) option("--time=" + slurm.time);
  if (!slurm.mem.empty()) option("--mem=" + slurm.mem);
  if (slurm.cpus_per_task > 0) option(fmt::format("--cpus-per-task={}", slurm.cpus_per_task));
  if (slurm.gpus_per_task > 0) option(fmt::format("--gres=gpu:{}", slurm.gpus_per_task));
  for (const std::string& extra : slurm.extra) {
    if (extra.rfind("#SBATCH", 0) == 0) {
      text += extra + "\n";
    } else {
      option(extra);
    }
  }
  text +=
      fmt::format("# kvdrift sweep {} ({}), submission {}: array task i runs the point on line i+1 of the task list.\n",
                  sweep.name, sweep.path, number);
  if (!slurm.setup.empty()) {
    text += "# launcher.setup, as written in the sweep file:\n" + slurm.setup;
    if (slurm.setup.back() != '\n') text += "\n";
  }
  const std::string task_list = shell_quoted(tasks_path(dir, number));
  text += "set -euo pipefail\n";
  text += "point=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" " + task_list + ")\n";
  text += "if [ -z \"$point\" ]; then\n  echo \"kvdrift sweep: no point for array task $SLURM_ARRAY_TASK_ID in \"" +
          task_list + " >&2\n  exit 1\nfi\n";
  text +=
      "exec " + shell_quoted(self_executable()) + " sweep run-point " + shell_quoted(dir + "/runs/") + "\"$point\"\n";
  return text;
}

std::string user_name() {
  if (const passwd* entry = ::getpwuid(::getuid())) return entry->pw_name;
  return std::to_string(::getuid());
}

}  // namespace

void require_sbatch() {
  if (find_on_path("sbatch").empty())
    fail(
        "launcher: slurm needs sbatch on PATH; Slurm is not installed or not loaded here (PATH={}); "
        "use launcher kind local to run the points on this machine",
        std::getenv("PATH") ? std::getenv("PATH") : "");
}

Submission submit_array(const SweepFile& sweep, const std::vector<const Point*>& points) {
  require_sbatch();
  const std::string dir = sweep.directory();
  fs::create_directories(slurm_directory(dir));
  Submission submission;
  submission.number = static_cast<int>(read_submissions(dir).size()) + 1;
  std::string task_list;
  for (const Point* point : points) {
    submission.point_ids.push_back(point->id);
    task_list += point->id + "\n";
  }
  write_atomically(tasks_path(dir, submission.number), task_list);
  const std::string script = script_path(dir, submission.number);
  write_atomically(script, batch_script(sweep, submission.number, points.size()));

  const CommandResult result = run_command({"sbatch", "--parsable", script});
  std::string job_id = result.out.substr(0, result.out.find_first_of(";\n"));
  if (result.exit_code != 0 || job_id.empty() || job_id.find_first_not_of("0123456789") != std::string::npos)
    fail("sbatch {} failed (exit status {}): {}", script, result.exit_code,
         result.err.empty() ? result.out : result.err);
  submission.job_id = job_id;
  std::ofstream jobs(jobs_path(dir), std::ios::app);
  jobs << fmt::format("{} array-{}.sbatch {}\n", job_id, submission.number, points.size());
  if (!jobs.flush()) fail("cannot write {}: job {} was submitted but is not recorded", jobs_path(dir), job_id);
  return submission;
}

std::vector<Submission> read_submissions(const std::string& sweep_directory) {
  std::vector<Submission> submissions;
  std::ifstream jobs(jobs_path(sweep_directory));
  for (std::string line; std::getline(jobs, line);) {
    std::istringstream fields(line);
    Submission submission;
    std::string script;
    if (!(fields >> submission.job_id >> script)) continue;
    if (std::sscanf(script.c_str(), "array-%d.sbatch", &submission.number) != 1) continue;
    std::ifstream tasks(tasks_path(sweep_directory, submission.number));
    for (std::string id; std::getline(tasks, id);) submission.point_ids.push_back(id);
    submissions.push_back(std::move(submission));
  }
  return submissions;
}

std::string task_log_path(const std::string& sweep_directory, int number, size_t task) {
  return fmt::format("{}/array-{}-{}.log", slurm_directory(sweep_directory), number, task);
}

std::optional<std::map<std::string, std::string>> queued_array_tasks() {
  if (find_on_path("squeue").empty()) return std::nullopt;
  const CommandResult result =
      run_command({"squeue", "--noheader", "--array", "--user=" + user_name(), "--format=%i %t"});
  if (result.exit_code != 0) return std::nullopt;
  std::map<std::string, std::string> tasks;
  std::istringstream lines(result.out);
  for (std::string task, state; lines >> task >> state;) tasks[task] = state;
  return tasks;
}

std::map<std::string, std::string> accounted_array_tasks(const std::vector<std::string>& job_ids) {
  std::map<std::string, std::string> tasks;
  if (job_ids.empty() || find_on_path("sacct").empty()) return tasks;
  std::string jobs;
  for (const std::string& id : job_ids) jobs += (jobs.empty() ? "" : ",") + id;
  const CommandResult result =
      run_command({"sacct", "--noheader", "--parsable2", "--allocations", "--jobs=" + jobs, "--format=JobID,State"});
  if (result.exit_code != 0) return tasks;
  std::istringstream lines(result.out);
  for (std::string line; std::getline(lines, line);) {
    const size_t bar = line.find('|');
    if (bar != std::string::npos) tasks[line.substr(0, bar)] = line.substr(bar + 1);
  }
  return tasks;
}

}  // namespace kvdrift::sweep
