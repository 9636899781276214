// `kvdrift sweep plan|submit|status|collect FILE` and `kvdrift sweep run-point RUNDIR`: grids of runs
// (docs/sweep.md). The sweep library (src/sweep/) does the work; this file parses options and prints.
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "core/error.h"
#include "sweep/collect.h"
#include "sweep/local_launcher.h"
#include "sweep/plan.h"
#include "sweep/point_run.h"
#include "sweep/slurm.h"
#include "sweep/status.h"
#include "sweep/sweep_file.h"

namespace kvdrift::cli {

namespace {

namespace fs = std::filesystem;
using namespace kvdrift::sweep;

constexpr size_t kLogTailLines = 10;

struct SweepOptions {
  std::string file;
  std::string run_dir;
  bool force = false;
  bool rerun_failed = false;
  bool json = false;
};

// `lock`: the sweep's lock, held by the caller after the plan (see write_plan).
Manifest plan(const SweepFile& sweep, bool force, std::optional<WriterLock>& lock) {
  Manifest manifest;
  const PlanSummary summary = write_plan(sweep, force, &manifest, &lock);
  std::cout << fmt::format("planned {} points in {:.2f} s ({} configs written, {} unchanged{}): {}/manifest.json\n",
                           summary.points, summary.seconds, summary.written, summary.unchanged,
                           summary.reset ? fmt::format(", {} reset by --force", summary.reset) : "",
                           manifest.directory);
  return manifest;
}

void submit(const SweepOptions& options) {
  const SweepFile sweep = load_sweep_file(options.file);
  if (sweep.launcher_kind == "slurm") require_sbatch();  // before writing anything
  std::optional<WriterLock> lock;  // from the plan until every point has been launched (and run, locally)
  const Manifest manifest = plan(sweep, /*force=*/false, lock);
  const std::vector<PointStatus> statuses = point_statuses(manifest);
  std::vector<const Point*> chosen;
  size_t done = 0, active = 0, failed_skipped = 0;
  for (size_t i = 0; i < manifest.points.size(); ++i) {
    const State state = statuses[i].state;
    if (state == State::Done) ++done;
    // A pending point with a Slurm state is queued already: submitting it again would run it twice.
    if (state == State::Running || (state == State::Pending && !statuses[i].slurm.empty())) ++active;
    if (state == State::Failed && !options.rerun_failed) ++failed_skipped;
    if ((state == State::Pending && statuses[i].slurm.empty()) || (state == State::Failed && options.rerun_failed))
      chosen.push_back(&manifest.points[i]);
  }
  const std::string skipped =
      fmt::format("{} done, {} running or queued{}", done, active,
                  failed_skipped ? fmt::format(", {} failed (not rerun without --rerun-failed)", failed_skipped) : "");
  if (chosen.empty()) {
    std::cout << "nothing to submit: " << skipped << "\n";
    return;
  }
  std::cout << fmt::format("submitting {} of {} points ({})\n", chosen.size(), manifest.points.size(), skipped);
  if (sweep.launcher_kind == "slurm") {
    const Submission submission = submit_array(sweep, chosen);
    std::cout << fmt::format("submitted job {}: {} points as array-{} ({}/slurm/array-{}.sbatch)\n", submission.job_id,
                             chosen.size(), submission.number, manifest.directory, submission.number);
    return;
  }
  const LocalRunSummary summary = run_local(manifest, chosen, sweep.local);
  std::cout << fmt::format("{} points: {} done, {} failed{}\n", chosen.size(), summary.done, summary.failed,
                           summary.interrupted ? ", interrupted" : "");
  if (summary.interrupted) fail("interrupted: {} points did not finish", chosen.size() - summary.done);
  if (summary.failed > 0)
    fail("{} of {} points failed; `kvdrift sweep status {}` shows their logs", summary.failed, chosen.size(),
         options.file);
}

void print_status(const SweepOptions& options) {
  const SweepFile sweep = load_sweep_file(options.file);
  const Manifest manifest = read_manifest(sweep);
  const std::vector<PointStatus> statuses = point_statuses(manifest);
  std::map<std::string, size_t> counts = {{"done", 0}, {"failed", 0}, {"running", 0}, {"pending", 0}};
  for (const PointStatus& status : statuses) ++counts[state_name(status.state)];

  if (options.json) {
    nlohmann::ordered_json json;
    json["points"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < statuses.size(); ++i) {
      const Point& point = manifest.points[i];
      nlohmann::ordered_json values = nlohmann::ordered_json::object();
      for (size_t k = 0; k < manifest.keys.size(); ++k) values[manifest.keys[k]] = point.values[k];
      json["points"].push_back({{"id", point.id},
                                {"state", state_name(statuses[i].state)},
                                {"values", values},
                                {"log", statuses[i].log},
                                {"exit_status", statuses[i].exit_status},
                                {"slurm", statuses[i].slurm},
                                {"problem", statuses[i].problem}});
    }
    json["counts"] = counts;
    std::cout << json.dump(1) << "\n";
    return;
  }
  for (size_t i = 0; i < statuses.size(); ++i) {
    const PointStatus& status = statuses[i];
    std::cout << fmt::format("{}  {}  {}\n", manifest.points[i].id, state_name(status.state),
                             manifest.describe(manifest.points[i]));
    if (!status.slurm.empty()) std::cout << "    slurm: " << status.slurm << "\n";
    if (status.state != State::Failed) continue;
    std::cout << fmt::format("    log: {}{}\n", status.log.empty() ? "(none)" : status.log,
                             status.exit_status.empty() ? " (no exit status recorded: the attempt was killed)"
                                                        : fmt::format(" (exit status {})", status.exit_status));
    if (!status.problem.empty()) std::cout << "    " << status.problem << "\n";
    for (const std::string& line : last_lines(status.log, kLogTailLines)) std::cout << "    | " << line << "\n";
  }
  std::cout << fmt::format("# {} points: {} done, {} failed, {} running, {} pending\n", statuses.size(), counts["done"],
                           counts["failed"], counts["running"], counts["pending"]);
}

void print_collect(const SweepOptions& options) {
  const SweepFile sweep = load_sweep_file(options.file);
  const Manifest manifest = read_manifest(sweep);
  const CollectSummary summary = collect(manifest);
  for (const auto& [id, state] : summary.incomplete) std::cerr << fmt::format("incomplete point {}: {}\n", id, state);
  std::cout << fmt::format("collected {} of {} points ({} incomplete), {} rows: {} and {}\n", summary.complete_points,
                           manifest.points.size(), summary.incomplete.size(), summary.rows, summary.csv_path,
                           summary.h5_path);
}

void run_one_point(const SweepOptions& options) {
  const fs::path dir = fs::absolute(options.run_dir).lexically_normal();
  const fs::path run_dir = dir.has_filename() ? dir : dir.parent_path();  // "runs/<id>/" names the same point
  std::error_code error;
  if (run_dir.parent_path().filename() != "runs" || !fs::is_regular_file(run_dir / "config.yaml", error)) {
    fail("{}: not a planned point of a sweep: expected ROOT/NAME/runs/<id> holding config.yaml (kvdrift sweep plan "
         "writes it)",
         options.run_dir);
  }
  const PointFiles files = point_files(run_dir.parent_path().parent_path().string(), run_dir.filename().string());
  const int code = run_point(files);
  if (code != 0) fail("{}: kvdrift run exited with status {}; log: {}", files.dir, code, files.log);
}

}  // namespace

void register_sweep(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<SweepOptions>();
  auto* sweep = app.add_subcommand("sweep", "grids of runs: plan, submit (local workers or Slurm), status, collect");
  sweep->require_subcommand(1);

  auto* plan_command =
      sweep->add_subcommand("plan", "expand the grid into ROOT/NAME/runs/<id>/config.yaml and manifest.json");
  plan_command->add_option("file", options->file, "sweep file (YAML, docs/sweep.md)")->required();
  plan_command->add_flag("--force", options->force, "replace the configs of changed points and delete their results");
  plan_command->callback([options, &command] {
    command = [options] {
      std::optional<WriterLock> lock;
      plan(load_sweep_file(options->file), options->force, lock);
    };
  });

  auto* submit_command =
      sweep->add_subcommand("submit", "plan, then run the points not done (local workers or sbatch)");
  submit_command->add_option("file", options->file, "sweep file")->required();
  submit_command->add_flag("--rerun-failed", options->rerun_failed, "also run the failed points again");
  submit_command->callback([options, &command] { command = [options] { submit(*options); }; });

  auto* status_command = sweep->add_subcommand("status", "done / running / failed / pending per point");
  status_command->add_option("file", options->file, "sweep file")->required();
  status_command->add_flag("--json", options->json, "machine-readable output");
  status_command->callback([options, &command] { command = [options] { print_status(*options); }; });

  auto* collect_command = sweep->add_subcommand("collect", "summary.csv and summary.h5 over the completed points");
  collect_command->add_option("file", options->file, "sweep file")->required();
  collect_command->callback([options, &command] { command = [options] { print_collect(*options); }; });

  auto* run_point_command =
      sweep->add_subcommand("run-point", "run one planned point (what a worker or Slurm array task runs)");
  run_point_command->add_option("run_dir", options->run_dir, "ROOT/NAME/runs/<id>")->required();
  run_point_command->callback([options, &command] { command = [options] { run_one_point(*options); }; });
}

}  // namespace kvdrift::cli
