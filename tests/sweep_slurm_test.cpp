// `kvdrift sweep` on a real single-node Slurm (scripts/slurm/start.sh): a 6-point stories260K sweep
// as one job array, one array task cancelled mid-run and rerun alone, the collected summary against
// each run's own /summary, and the same sweep under the local launcher giving identical runs.
// One TEST: there is one cluster, and ctest runs the tests of this binary in parallel processes.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

const std::string kSlurmScripts = std::string(KVDRIFT_SOURCE_DIR) + "/scripts/slurm";

std::string shell_quoted(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs `command` with /bin/sh; stdout and stderr together in *output; returns the exit status.
int shell(const std::string& command, std::string* output) {
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("popen failed: " + command);
  output->clear();
  char buffer[4096];
  size_t n = 0;
  while ((n = ::fread(buffer, 1, sizeof buffer, pipe)) > 0) output->append(buffer, n);
  const int status = ::pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Polls `condition` every 200 ms for at most `limit`; whether it became true.
bool wait_until(std::chrono::seconds limit, const std::function<bool()>& condition) {
  const auto deadline = Clock::now() + limit;
  while (!condition()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return true;
}

// The cluster of scripts/slurm/start.sh, stopped by scripts/slurm/stop.sh (by the PIDs start.sh
// recorded) when the test ends, however it ends. Exports SLURM_CONF to this process, so that the
// kvdrift processes the test starts (and their Slurm clients) talk to this cluster.
class SlurmCluster {
 public:
  explicit SlurmCluster(std::string state_dir) : state_dir_(std::move(state_dir)) {
    std::string output;
    const int status =
        shell("bash " + shell_quoted(kSlurmScripts + "/start.sh") + " " + shell_quoted(state_dir_), &output);
    if (status != 0) {
      stop();
      throw std::runtime_error("scripts/slurm/start.sh failed (exit " + std::to_string(status) + "):\n" + output);
    }
    const std::string conf = state_dir_ + "/slurm.conf";
    if (output.find("SLURM_CONF=" + conf) == std::string::npos) {
      stop();
      throw std::runtime_error("scripts/slurm/start.sh did not print SLURM_CONF=" + conf + ":\n" + output);
    }
    ::setenv("SLURM_CONF", conf.c_str(), 1);
  }
  ~SlurmCluster() {
    const std::string output = stop();
    ::unsetenv("SLURM_CONF");
    EXPECT_FALSE(fs::exists(state_dir_ + "/pids")) << "scripts/slurm/stop.sh left the cluster up:\n" << output;
  }
  SlurmCluster(const SlurmCluster&) = delete;
  SlurmCluster& operator=(const SlurmCluster&) = delete;

  // Job ids (array tasks as JOB_TASK, pending ranges as JOB_[A-B]) squeue lists; "" when idle.
  std::string queue() const {
    std::string output;
    const int status = shell("squeue -h -o %i", &output);
    if (status != 0) throw std::runtime_error("squeue failed: " + output);
    return output;
  }

  // Waits until the queue is empty; the jobs still listed when `limit` runs out otherwise.
  std::string drain(std::chrono::seconds limit) const {
    std::string left;
    wait_until(limit, [&] { return (left = queue()).empty(); });
    return left;
  }

 private:
  std::string stop() {
    std::string output;
    shell("bash " + shell_quoted(kSlurmScripts + "/stop.sh") + " " + shell_quoted(state_dir_), &output);
    return output;
  }

  std::string state_dir_;
};

// The sweep file: stories260K on one prompt, a `none` baseline and one quantizer per point. Three
// methods (a zip axis) × three lengths, minus exclusions, leaves six points; one of them (kvarn at
// kSlowTokens with 64 VarN iterations, ~7 s alone on a fast 2-core machine; 8 iterations took 2 s
// there, too short to be caught reliably) decodes long enough to be caught running and cancelled. A long
// output.flush_seconds keeps run.h5 closed while the sample decodes (it is written when the sample
// starts and when it ends), so a cancel a second into decoding does not land in an HDF5 write and
// the rerun resumes a readable file.
constexpr int kSlowTokens = 440;
std::string write_sweep_file(const std::string& path, const std::string& root, const std::string& launcher) {
  const std::string model = test::stories260k_dir();
  test::write_file(path, fmt::format(R"(name: grid
root: {root}
base:
  model: {{path: {model}/stories260K.bin, tokenizer: {model}/tok512.bin}}
  prompts: {{source: inline, texts: ["Once upon a time there was a little boy named Ben."]}}
  decoding: {{max_new_tokens: 16, stop_at_eos: false}}
  quantizers:
    - {{name: none, method: none}}
    - {{name: kivi-2bit, method: kivi, params: {{group_size: 8, residual_length: 16}}}}
  output: {{flush_seconds: 600}}
grid:
  decoding.max_new_tokens: [16, 32, {slow}]
zip:
  - quantizers.1.name: [kivi-2bit, quarot-2bit, kvarn-k2v2]
    quantizers.1.method: [kivi, quarot, kvarn]
    quantizers.1.params:
      - {{group_size: 8, residual_length: 16}}
      - {{k_bits: 2, v_bits: 2}}
      - {{preset: k2v2, tile_size: 8, iters: 64}}
exclude:
  - {{decoding.max_new_tokens: {slow}, quantizers.1.method: kivi}}
  - {{decoding.max_new_tokens: {slow}, quantizers.1.method: quarot}}
  - {{decoding.max_new_tokens: 32, quantizers.1.method: kvarn}}
launcher:
{launcher}
)",
                                     fmt::arg("root", root), fmt::arg("model", model), fmt::arg("slow", kSlowTokens),
                                     fmt::arg("launcher", launcher)));
  return path;
}

struct Point {
  std::string id;
  nlohmann::json values;
};

std::vector<Point> manifest_points(const std::string& sweep_dir) {
  const auto manifest = nlohmann::json::parse(test::read_file(sweep_dir + "/manifest.json"));
  std::vector<Point> points;
  for (const auto& point : manifest.at("points")) points.push_back({point.at("id"), point.at("values")});
  return points;
}

// `sweep status` lines "<id>  <state>  ..." as id -> state, and the "# N points: ..." count line.
struct Status {
  std::map<std::string, std::string> states;
  std::string counts;
  std::string text;
};

Status sweep_status(const std::string& sweep_file) {
  const auto result = test::run_cli({"sweep", "status", sweep_file});
  EXPECT_EQ(result.exit_code, 0) << result.err;
  Status status;
  status.text = result.out;
  std::istringstream lines(result.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# ", 0) == 0) {
      status.counts = line;
    } else if (!line.empty() && line[0] != ' ') {
      std::istringstream fields(line);
      std::string id, state;
      fields >> id >> state;
      status.states[id] = state;
    }
  }
  return status;
}

// The line number (0-based) of `id` in a submission's task list: its array task index.
int task_index(const std::string& tasks_file, const std::string& id) {
  std::istringstream lines(test::read_file(tasks_file));
  int index = 0;
  for (std::string line; std::getline(lines, line); ++index) {
    if (line == id) return index;
  }
  return -1;
}

// collect's rows against each run's /summary read directly with h5py: every (point, quantizer) of
// the runs has exactly one row in summary.h5 and in summary.csv, and each metric column equals the
// run's attribute (`attr` of /summary/<quantizer>, `lane.attr` of its lane subgroups), NaN where the
// run has none.
const char* kCheckSummary = R"PY(import csv, json, math, sys, h5py
sweep = sys.argv[1]
points = [p["id"] for p in json.load(open(f"{sweep}/manifest.json"))["points"]]

def run_rows(point):
    rows = {}
    with h5py.File(f"{sweep}/runs/{point}/run.h5", "r") as f:
        assert f.attrs["complete"] == 1, point
        for quantizer, group in f["summary"].items():
            values = {name: float(value) for name, value in group.attrs.items()}
            for lane, sub in group.items():
                values.update({f"{lane}.{name}": float(value) for name, value in sub.attrs.items()})
            rows[(point, quantizer)] = values
    return rows

expected = {}
for point in points:
    expected.update(run_rows(point))

def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b

with h5py.File(f"{sweep}/summary.h5", "r") as f:
    rows = f["rows"]
    columns = rows.attrs["columns"].split("\n")
    grid_keys = f.attrs["grid_keys"].split("\n")
    table = {c: (rows[c].asstr()[...] if rows[c].dtype.kind == "O" else rows[c][...]) for c in columns}
metrics = columns[4 + len(grid_keys):]
assert columns[:4] == ["point", "status", "quantizer", "method"], columns[:4]
keys = [(table["point"][i], table["quantizer"][i]) for i in range(len(table["point"]))]
assert sorted(keys) == sorted(expected), (keys, sorted(expected))
for i, key in enumerate(keys):
    assert table["status"][i] == "done", (key, table["status"][i])
    run = expected[key]
    assert set(run) <= set(metrics), (key, set(run) - set(metrics))
    for c in metrics:
        assert same(float(table[c][i]), run.get(c, math.nan)), (key, c, table[c][i], run.get(c))

with open(f"{sweep}/summary.csv", newline="") as f:
    csv_rows = list(csv.DictReader(f))
assert [(r["point"], r["quantizer"]) for r in csv_rows] == keys
for r in csv_rows:
    run = expected[(r["point"], r["quantizer"])]
    for c in metrics:
        value = float(r[c]) if r[c] != "" else math.nan
        assert same(value, run.get(c, math.nan)), (r["point"], r["quantizer"], c, r[c], run.get(c))
print(f"{len(keys)} rows match {len(points)} runs")
)PY";

// Two sweeps' runs of the same points: every dataset under /samples (dtype, shape, values) and every
// attribute under /samples and /summary are identical. Wall-clock timings (*_seconds) are skipped.
const char* kCompareRuns = R"PY(import json, sys, h5py, numpy as np
a_dir, b_dir = sys.argv[1], sys.argv[2]
points = [p["id"] for p in json.load(open(f"{a_dir}/manifest.json"))["points"]]
b_points = [p["id"] for p in json.load(open(f"{b_dir}/manifest.json"))["points"]]
assert points == b_points, (points, b_points)

def contents(path):
    objects = {}
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] == 1, path
        for top in ("samples", "summary"):
            def visit(name, obj, top=top):
                attrs = {k: v for k, v in obj.attrs.items() if not k.endswith("_seconds")}
                data = obj[...] if isinstance(obj, h5py.Dataset) else None
                objects[f"{top}/{name}"] = (attrs, data)
            f[top].visititems(visit)
    return objects

datasets = attributes = 0
for point in points:
    a = contents(f"{a_dir}/runs/{point}/run.h5")
    b = contents(f"{b_dir}/runs/{point}/run.h5")
    assert sorted(a) == sorted(b), (point, sorted(set(a) ^ set(b)))
    assert "samples/0/reference_tokens" in a and "samples/0/none/teacher_forced/kl" in a, point
    for name, (a_attrs, a_data) in a.items():
        b_attrs, b_data = b[name]
        assert sorted(a_attrs) == sorted(b_attrs), (point, name)
        for k in a_attrs:
            same_nan = np.asarray(a_attrs[k]).dtype.kind == "f"  # a NaN share (nothing quantized) is NaN in both
            assert np.array_equal(a_attrs[k], b_attrs[k], equal_nan=same_nan), (point, name, k, a_attrs[k], b_attrs[k])
        attributes += len(a_attrs)
        if a_data is not None:
            assert a_data.dtype == b_data.dtype and a_data.shape == b_data.shape, (point, name)
            assert np.array_equal(a_data, b_data, equal_nan=a_data.dtype.kind == "f"), (point, name)
            datasets += 1
print(f"{len(points)} points identical ({datasets} datasets, {attributes} attributes)")
)PY";

TEST(SweepOnSlurm, ArrayCancelRerunCollectAndLocalLauncherAgree) {
  const std::string dir = test::scratch_dir();
  // Not under scratch_dir(), which is wiped first: start.sh must find a cluster that a killed earlier
  // run left (its pids file) to stop it.
  SlurmCluster cluster(std::string(KVDRIFT_TEST_TMP) + "/slurm-cluster");

  const std::string slurm_sweep = write_sweep_file(dir + "/slurm.yaml", "out-slurm", "  kind: slurm");
  const std::string slurm_dir = dir + "/out-slurm/grid";

  const auto plan = test::run_cli({"sweep", "plan", slurm_sweep});
  ASSERT_EQ(plan.exit_code, 0) << plan.err;
  const auto points = manifest_points(slurm_dir);
  ASSERT_EQ(points.size(), 6u);
  std::string slow_id;
  for (const auto& point : points) {
    if (point.values.at("decoding.max_new_tokens") == std::to_string(kSlowTokens)) slow_id = point.id;
  }
  ASSERT_FALSE(slow_id.empty()) << "no point with decoding.max_new_tokens = " << kSlowTokens;

  // First submission: all six points as one array.
  const auto submit = test::run_cli({"sweep", "submit", slurm_sweep});
  ASSERT_EQ(submit.exit_code, 0) << submit.err;
  std::smatch match;
  ASSERT_TRUE(std::regex_search(submit.out, match, std::regex(R"(submitted job (\d+): 6 points as array-1)")))
      << submit.out;
  const std::string job = match[1];
  EXPECT_EQ(test::read_file(slurm_dir + "/slurm/jobs.txt").rfind(job + " array-1.sbatch", 0), 0u);

  // Cancel the slow point's task once its kvdrift run is decoding: its log has the run's first line
  // (written once run.h5 is open), and a second later the sample is decoding.
  const int slow_task = task_index(slurm_dir + "/slurm/array-1.tasks", slow_id);
  ASSERT_GE(slow_task, 0) << slow_id << " not in array-1.tasks";
  const std::string slow_log = slurm_dir + "/runs/" + slow_id + "/log.txt";
  const auto slow_run_started = [&] {
    return fs::exists(slow_log) && test::read_file(slow_log).find("1 prompts, 2 quantizers") != std::string::npos;
  };
  ASSERT_TRUE(wait_until(std::chrono::seconds(90), slow_run_started))
      << "the slow point never started; queue: " << cluster.queue();
  EXPECT_EQ(sweep_status(slurm_sweep).states[slow_id], "running");
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const std::string slow_task_id = job + "_" + std::to_string(slow_task);
  std::string output;
  ASSERT_EQ(shell("scancel " + slow_task_id, &output), 0) << output;
  ASSERT_EQ(cluster.drain(std::chrono::seconds(90)), "") << "jobs still queued";

  Status status = sweep_status(slurm_sweep);
  EXPECT_EQ(status.counts, "# 6 points: 5 done, 1 failed, 0 running, 0 pending") << status.text;
  for (const auto& point : points) {
    EXPECT_EQ(status.states[point.id], point.id == slow_id ? "failed" : "done") << status.text;
  }
  // The failed point names its Slurm task, its log and how it ended, and shows the log's tail.
  for (const std::string& line : {"    slurm: job " + job + " (" + slow_task_id + "), Slurm log " + slurm_dir +
                                      "/slurm/array-1-" + std::to_string(slow_task) + ".log\n",
                                  "    log: " + slow_log + " (exit status signal 15)\n    | "}) {
    EXPECT_NE(status.text.find(line), std::string::npos) << "no '" << line << "' in\n" << status.text;
  }

  // Rerun: only the failed point is submitted, as a one-task array.
  const auto rerun = test::run_cli({"sweep", "submit", slurm_sweep, "--rerun-failed"});
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  ASSERT_TRUE(std::regex_search(rerun.out, match, std::regex(R"(submitted job (\d+): 1 points as array-2)")))
      << rerun.out;
  EXPECT_NE(test::read_file(slurm_dir + "/slurm/jobs.txt").find("\n" + match[1].str() + " array-2.sbatch 1\n"),
            std::string::npos);
  EXPECT_EQ(test::read_file(slurm_dir + "/slurm/array-2.tasks"), slow_id + "\n");
  EXPECT_NE(test::read_file(slurm_dir + "/slurm/array-2.sbatch").find("#SBATCH --array=0-0\n"), std::string::npos);
  ASSERT_EQ(cluster.drain(std::chrono::seconds(120)), "") << "jobs still queued";
  status = sweep_status(slurm_sweep);
  EXPECT_EQ(status.counts, "# 6 points: 6 done, 0 failed, 0 running, 0 pending") << status.text;

  const auto collect = test::run_cli({"sweep", "collect", slurm_sweep});
  ASSERT_EQ(collect.exit_code, 0) << collect.err;
  ASSERT_EQ(test::run_python(dir, "check_summary", kCheckSummary, {slurm_dir}, &output), 0) << output;
  EXPECT_EQ(output, "12 rows match 6 runs\n");

  // The same grid under the local launcher, 2 workers: the same points with identical results.
  const std::string local_sweep = write_sweep_file(dir + "/local.yaml", "out-local", "  kind: local\n  workers: 2");
  const auto local = test::run_cli({"sweep", "submit", local_sweep});
  ASSERT_EQ(local.exit_code, 0) << local.out << local.err;
  status = sweep_status(local_sweep);
  EXPECT_EQ(status.counts, "# 6 points: 6 done, 0 failed, 0 running, 0 pending") << status.text;
  ASSERT_EQ(test::run_python(dir, "compare_runs", kCompareRuns, {slurm_dir, dir + "/out-local/grid"}, &output), 0)
      << output;
  EXPECT_NE(output.find("6 points identical ("), std::string::npos) << output;
}

}  // namespace
}  // namespace kvdrift
