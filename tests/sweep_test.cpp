// `kvdrift sweep` through the real command line: planning (ids, zip/exclude, change detection, bad
// sweep files), the local launcher with status, collect and --rerun-failed on stories260K, and the
// Slurm launcher against stand-in sbatch/squeue scripts (the real single-node Slurm scenario is
// tests/sweep_slurm_test.cpp).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "io/hdf5.h"
#include "io/run_config.h"
#include "support.h"
#include "sweep/plan.h"
#include "sweep/point_run.h"
#include "sweep/sweep_file.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

// A fast base config: one short prompt, 16 new tokens, two quantizers sized for stories260K.
std::string write_base(const std::string& dir, const std::string& prompts_yaml = "") {
  const std::string model = test::stories260k_dir();
  const std::string path = dir + "/base.yaml";
  test::write_file(
      path,
      fmt::format(R"(model:
  path: {0}/stories260K.bin
  tokenizer: {0}/tok512.bin
prompts:
{1}
decoding:
  max_new_tokens: 16
  stop_at_eos: false
quantizers:
  - {{name: kivi-2bit, method: kivi, params: {{group_size: 8, residual_length: 16}}}}
  - {{name: kvarn, method: kvarn, params: {{preset: k2v2, tile_size: 8}}}}
output:
  path: unused.h5
)",
                  model, prompts_yaml.empty() ? "  source: inline\n  texts: [\"Once upon a time\"]" : prompts_yaml));
  return path;
}

std::string write_sweep(const std::string& dir, const std::string& body, const std::string& name = "sweep.yaml") {
  const std::string path = dir + "/" + name;
  test::write_file(path, body);
  return path;
}

nlohmann::json manifest_of(const std::string& sweep_dir) {
  return nlohmann::json::parse(test::read_file(sweep_dir + "/manifest.json"));
}

std::vector<std::string> ids_of(const nlohmann::json& manifest) {
  std::vector<std::string> ids;
  for (const auto& point : manifest["points"]) ids.push_back(point["id"]);
  return ids;
}

// Each point's values as "k=v" joined by ", ", in manifest order.
std::vector<std::string> value_rows(const nlohmann::json& manifest) {
  std::vector<std::string> rows;
  for (const auto& point : manifest["points"]) {
    std::string row;
    for (const auto& key : manifest["keys"])
      row += (row.empty() ? "" : ", ") + key.get<std::string>() + "=" +
             point["values"][key.get<std::string>()].get<std::string>();
    rows.push_back(row);
  }
  return rows;
}

// The CLI with PATH replaced, stdout and stderr captured.
test::CliResult run_cli_with_path(const std::vector<std::string>& args, const std::string& path_value,
                                  const std::map<std::string, std::string>& extra_env = {}) {
  const std::string dir = (fs::path(KVDRIFT_TEST_TMP) / "cli").string();
  fs::create_directories(dir);
  const std::string out_path = dir + "/path-stdout." + std::to_string(::getpid());
  const std::string err_path = dir + "/path-stderr." + std::to_string(::getpid());
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 1);
    ::dup2(::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 2);
    ::setenv("PATH", path_value.c_str(), 1);
    for (const auto& [name, value] : extra_env) ::setenv(name.c_str(), value.c_str(), 1);
    test::exec_cli(args);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), test::read_file(out_path),
          test::read_file(err_path)};
}

std::string status_word(const std::string& status_out, const std::string& id) {
  std::istringstream lines(status_out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string first, second;
    if (fields >> first >> second && first == id) return second;
  }
  return "(no line for " + id + ")";
}

bool complete(const std::string& path) {
  if (!fs::exists(path)) return false;
  return h5::File::open_read(path).attribute<int64_t>("complete") == 1;
}

TEST(SweepPlan, WritesLoadableConfigsAndStableIds) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string body = R"(name: plan
root: out
base: base.yaml
grid:
  decoding.max_new_tokens: [8, 12]
  quantizers.1.params.tile_size: [8, 16]
launcher: {kind: local, workers: 2}
)";
  const std::string sweep = write_sweep(dir, body);
  const auto first = test::run_cli({"sweep", "plan", sweep});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_NE(first.out.find("planned 4 points in "), std::string::npos) << first.out;
  EXPECT_NE(first.out.find("(4 configs written, 0 unchanged)"), std::string::npos) << first.out;

  const std::string sweep_dir = dir + "/out/plan";
  const auto manifest = manifest_of(sweep_dir);
  EXPECT_EQ(manifest["name"], "plan");
  EXPECT_EQ(manifest["keys"], nlohmann::json({"decoding.max_new_tokens", "quantizers.1.params.tile_size"}));
  EXPECT_EQ(manifest["numeric"], nlohmann::json({true, true}));
  EXPECT_EQ(value_rows(manifest),
            (std::vector<std::string>{"decoding.max_new_tokens=8, quantizers.1.params.tile_size=8",
                                      "decoding.max_new_tokens=8, quantizers.1.params.tile_size=16",
                                      "decoding.max_new_tokens=12, quantizers.1.params.tile_size=8",
                                      "decoding.max_new_tokens=12, quantizers.1.params.tile_size=16"}));
  const std::vector<std::string> ids = ids_of(manifest);

  // The id is the documented function of the values: checked against Python's hashlib.
  std::string expected_ids;
  ASSERT_EQ(test::run_python(dir, "ids", R"(import hashlib, json, re, sys
m = json.load(open(sys.argv[1]))
for p in m["points"]:
    v = p["values"]
    canonical = "".join(f"{k}={v[k]}\n" for k in sorted(v))
    slug = "_".join(re.sub(r"[^A-Za-z0-9.-]", "", v[k]) for k in sorted(v))[:40].lstrip("-._").rstrip("_")
    print(slug + "-" + hashlib.sha256(canonical.encode()).hexdigest()[:12])
)",
                             {sweep_dir + "/manifest.json"}, &expected_ids),
            0)
      << expected_ids;
  EXPECT_EQ(expected_ids, fmt::format("{}\n", fmt::join(ids, "\n")));
  EXPECT_EQ(ids[1].substr(0, 5), "8_16-");

  // Each config is the run config of its point: it loads, holds the point's values and its own output.
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string run_dir = sweep_dir + "/runs/" + ids[i];
    const RunConfig config = load_run_config(run_dir + "/config.yaml", {});
    EXPECT_EQ(config.decoding.max_new_tokens, i < 2 ? 8 : 12);
    EXPECT_EQ(config.quantizers[1].params.at("tile_size"), i % 2 == 0 ? "8" : "16");
    EXPECT_EQ(config.quantizers[0].params.at("residual_length"), "16");
    EXPECT_EQ(config.output.path, run_dir + "/run.h5");
    EXPECT_EQ(config.model.path, test::stories260k_dir() + "/stories260K.bin");
    EXPECT_EQ(test::read_file(run_dir + "/config.yaml"), config.resolved_yaml());
    EXPECT_EQ(std::distance(fs::directory_iterator(run_dir), fs::directory_iterator()),
              1);  // plan writes config.yaml only
  }

  // Re-planning, with the keys in another order, gives the same ids and rewrites nothing.
  const auto config_time = fs::last_write_time(sweep_dir + "/runs/" + ids[0] + "/config.yaml");
  const auto manifest_time = fs::last_write_time(sweep_dir + "/manifest.json");
  const std::string reordered = write_sweep(dir, R"(name: plan
root: out
base: base.yaml
grid:
  quantizers.1.params.tile_size: [8, 16]
  decoding.max_new_tokens: [8, 12]
launcher: {kind: local, workers: 2}
)",
                                            "reordered.yaml");
  const auto again = test::run_cli({"sweep", "plan", sweep});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("(0 configs written, 4 unchanged)"), std::string::npos) << again.out;
  EXPECT_EQ(fs::last_write_time(sweep_dir + "/runs/" + ids[0] + "/config.yaml"), config_time);
  EXPECT_EQ(fs::last_write_time(sweep_dir + "/manifest.json"), manifest_time);
  const auto other_order = test::run_cli({"sweep", "plan", reordered});
  ASSERT_EQ(other_order.exit_code, 0) << other_order.err;
  auto sorted_ids = ids, reordered_ids = ids_of(manifest_of(sweep_dir));
  std::sort(sorted_ids.begin(), sorted_ids.end());
  std::sort(reordered_ids.begin(), reordered_ids.end());
  EXPECT_EQ(reordered_ids, sorted_ids);
}

// Outputs are written by replacing, never through a link: a point's config.yaml that is a link to
// another file is replaced by the point's config, and that file is left as it was.
TEST(SweepPlan, ALinkedConfigIsReplacedNotWrittenThrough) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, "name: linked\nroot: out\nbase: base.yaml\ngrid: {decoding.seed: [0]}\n"
                                             "launcher: {kind: local}\n");
  ASSERT_EQ(test::run_cli({"sweep", "plan", sweep}).exit_code, 0);
  const std::string config = dir + "/out/linked/runs/" + ids_of(manifest_of(dir + "/out/linked"))[0] + "/config.yaml";
  const std::string planned = test::read_file(config);
  test::write_file(dir + "/elsewhere.yaml", "keep me\n");
  fs::remove(config);
  fs::create_symlink(dir + "/elsewhere.yaml", config);
  const auto again = test::run_cli({"sweep", "plan", sweep});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("(1 configs written, 0 unchanged)"), std::string::npos) << again.out;
  EXPECT_EQ(test::read_file(dir + "/elsewhere.yaml"), "keep me\n");
  EXPECT_FALSE(fs::is_symlink(config));
  EXPECT_EQ(test::read_file(config), planned);
}

TEST(SweepPlan, ZipAndExcludeSemantics) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: zip
root: out
base: base.yaml
grid:
  decoding.max_new_tokens: [8, 16, 24]
zip:
  - quantizers.1.method: [kvarn, quarot]
    quantizers.1.params: [{tile_size: 8, preset: k2v2}, {k_bits: 4, v_bits: 4}]
exclude:
  - {decoding.max_new_tokens: 16, quantizers.1.method: quarot}
  - {decoding.max_new_tokens: 24}
launcher: {kind: local}
)");
  const auto result = test::run_cli({"sweep", "plan", sweep});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.out.find("planned 3 points"), std::string::npos) << result.out;
  const auto manifest = manifest_of(dir + "/out/zip");
  EXPECT_EQ(manifest["numeric"], nlohmann::json({true, false, false}));
  // Map keys come sorted (canonical), so {tile_size, preset} reads back as {preset, tile_size}.
  EXPECT_EQ(
      value_rows(manifest),
      (std::vector<std::string>{
          "decoding.max_new_tokens=8, quantizers.1.method=kvarn, quantizers.1.params={preset: k2v2, tile_size: 8}",
          "decoding.max_new_tokens=8, quantizers.1.method=quarot, quantizers.1.params={k_bits: 4, v_bits: 4}",
          "decoding.max_new_tokens=16, quantizers.1.method=kvarn, quantizers.1.params={preset: k2v2, tile_size: 8}"}));
  const RunConfig quarot = load_run_config(dir + "/out/zip/runs/" + ids_of(manifest)[1] + "/config.yaml", {});
  EXPECT_EQ(quarot.quantizers[1].method, "quarot");
  EXPECT_EQ(quarot.quantizers[1].params, (std::map<std::string, std::string>{{"k_bits", "4"}, {"v_bits", "4"}}));
  EXPECT_EQ(quarot.quantizers[1].name, "kvarn");  // names are the base's unless a key sets them
}

TEST(SweepPlan, ChangedBaseIsRefusedUnlessForced) {
  const std::string dir = test::scratch_dir();
  const std::string base = write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: change
root: out
base: base.yaml
grid:
  quantizers.1.params.tile_size: [8, 16]
launcher: {kind: local}
)");
  ASSERT_EQ(test::run_cli({"sweep", "plan", sweep}).exit_code, 0);
  const auto ids = ids_of(manifest_of(dir + "/out/change"));
  const std::string with_results = dir + "/out/change/runs/" + ids[1];
  test::write_file(with_results + "/log.txt", "an earlier attempt\n");
  test::write_file(with_results + "/exit_status", "1\n");
  const std::string old_config = test::read_file(with_results + "/config.yaml");

  std::string text = test::read_file(base);
  text.replace(text.find("max_new_tokens: 16"), 18, "max_new_tokens: 20");
  test::write_file(base, text);
  const auto refused = test::run_cli({"sweep", "plan", sweep});
  test::expect_one_error_line(refused,
                              fmt::format("point {} (quantizers.1.params.tile_size=16): its config changed", ids[1]));
  EXPECT_NE(refused.err.find("line 14: `  max_new_tokens: 16` before, `  max_new_tokens: 20` now"), std::string::npos)
      << refused.err;
  EXPECT_NE(refused.err.find("--force"), std::string::npos) << refused.err;
  EXPECT_EQ(test::read_file(with_results + "/config.yaml"), old_config);  // nothing written

  const auto forced = test::run_cli({"sweep", "plan", sweep, "--force"});
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_NE(forced.out.find("(2 configs written, 0 unchanged, 1 reset by --force)"), std::string::npos) << forced.out;
  EXPECT_FALSE(fs::exists(with_results + "/log.txt"));
  EXPECT_FALSE(fs::exists(with_results + "/exit_status"));
  EXPECT_EQ(load_run_config(with_results + "/config.yaml", {}).decoding.max_new_tokens, 20);
}

// Nine levels of lists of nine aliases to the level below: 9^9 scalars once expanded.
std::string alias_bomb() {
  std::string text = "bomb:\n  - &l1 [0, 0, 0, 0, 0, 0, 0, 0, 0]\n";
  for (int level = 2; level <= 9; ++level) {
    const std::string below = fmt::format("*l{}", level - 1);
    text += fmt::format("  - &l{} [{}]\n", level,
                        fmt::join(std::vector<std::string>(9, below), ", "));
  }
  return text;
}

TEST(SweepPlan, BadSweepFilesGetOneClearErrorAndWriteNothing) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string head = "name: bad\nroot: out\nbase: base.yaml\n";
  const std::string local = "launcher: {kind: local}\n";
  struct Case {
    std::string body, fragment;
  };
  const std::vector<Case> cases = {
      {head + "grid: {decoding.seed: [0]}\n" + local + "colour: blue\n", "sweep.yaml:6: unknown key 'colour'"},
      {head + "grid:\n  decoding.max_new_tokenz: [4, 8]\n" + local,
       "sweep.yaml:5: point 4-"},  // then the run config's own message:
      {head + "grid:\n  decoding.max_new_tokenz: [4, 8]\n" + local, "unknown key 'decoding.max_new_tokenz'"},
      {head + "grid: {}\n" + local, "sweep.yaml:4: grid is empty"},
      {head + "grid:\n  decoding.seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n  decoding.top_k: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
                  "zip:\n  - {decoding.max_new_tokens: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],"
                  " decoding.top_p: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}\n"
                  "  - {decoding.temperature: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}\n"
                  "  - {prompts.limit: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n" + local,
       "sweep.yaml: the grid has more than 100000 points (10 (decoding.seed) x 10 (decoding.top_k) x "
       "10 (decoding.max_new_tokens, decoding.top_p) x 10 (decoding.temperature) x 11 (prompts.limit)); split it "
       "into several sweeps, or zip axes that vary together"},
      {head + "grid:\n  decoding.seed: []\n" + local,
       "sweep.yaml:5: grid key 'decoding.seed': the list of values is empty"},
      {head + local, "the sweep has no axes"},
      {head + "zip:\n  - decoding.seed: [0, 1]\n    decoding.max_new_tokens: [4]\n" + local,
       "sweep.yaml:6: zip group 1: key 'decoding.max_new_tokens' has 1 values, but key 'decoding.seed' has 2"},
      {head + "grid:\n  decoding.seed: [0, 1]\nzip:\n  - decoding.seed: [2, 3]\n" + local,
       "sweep.yaml:7: key 'decoding.seed' is given twice in grid and zip (first on line 5)"},
      {head + "grid:\n  quantizers.1.params: [{}]\n  quantizers.1.params.k_bits: [2]\n" + local,
       "key 'quantizers.1.params.k_bits' overlaps key 'quantizers.1.params'"},
      {head + "grid:\n  decoding.seed: [0, 1]\nexclude:\n  - {decoding.top_k: 3}\n" + local,
       "sweep.yaml:7: exclude rule 1: 'decoding.top_k' is not a grid or zip key"},
      {head + "grid:\n  decoding.seed: [0, 1]\nexclude:\n  - {decoding.seed: 5}\n" + local,
       "exclude rule 1: key 'decoding.seed' never takes the value 5"},
      {head + "grid:\n  decoding.seed: [0, 1]\nexclude:\n  - {decoding.seed: 0}\n  - {decoding.seed: 1}\n" + local,
       "the exclude rules exclude every point"},
      {head + "grid:\n  decoding.seed: [0, 1, 0]\n" + local,
       "sweep.yaml:5: grid key 'decoding.seed': entries 1 and 3 are the same (decoding.seed=0)"},
      {head + "zip:\n  - decoding.seed: [0, 1, 0]\n    decoding.max_new_tokens: [4, 8, 4]\n" + local,
       "zip group 1: entries 1 and 3 are the same (decoding.seed=0, decoding.max_new_tokens=4), so their points "
       "would be duplicates"},
      {head + "grid: {decoding.seed: [0]}\nlauncher: {kind: pbs}\n", "launcher.kind: unknown launcher 'pbs'"},
      // An alias bomb: 9 levels of 9 aliases each stand for 9^9 values in ~300 bytes.
      {head + alias_bomb() + "grid: {decoding.seed: *l9}\n" + local,
       "sweep.yaml: expands to more than 100000 YAML nodes (aliases that repeat aliases?); write the values out"},
      {head + "grid: {decoding.seed: [0]}\nlauncher: {kind: local, workers: 0}\n",
       "launcher.workers must be >= 1, got 0"},
      {head + "grid: {decoding.seed: [0]}\nlauncher: {kind: local, partition: gpu}\n",
       "launcher.partition belongs to launcher kind slurm, not local"},
      {head + "grid: {decoding.seed: [0]}\nlauncher: {kind: local, devices: [gpu0]}\n",
       "launcher.devices: expected cpu or cuda:N, got 'gpu0'"},
      {head + "grid:\n  quantizers.1.params.tile_size: [8, 7]\n" + local, "quantizers 'kvarn': "},
      // The checks `kvdrift run` makes against the model, each naming the sweep line of the value behind it.
      {head + "grid:\n  quantizers.1.params.tile_size: [8, 7]\n" + local, "sweep.yaml:5: point 7-"},
      {head + "grid:\n  quantizers.0.params.sink_tokens: [100000]\n" + local,
       "(quantizers.0.params.sink_tokens=100000): quantizers 'kivi-2bit': its full-precision sink of 100000 tokens is "
       "larger than the model's context of 512 positions"},
      {head + "grid:\n  quantizers.0.params.sink_tokens: [100000]\n" + local, "sweep.yaml:5: point 100000-"},
      {head + "zip:\n  - {decoding.prefill: [chunked], decoding.prefill_chunk: [513]}\n" + local,
       "decoding.prefill_chunk = 513 is larger than the model's context of 512 positions"},
      {head + "grid:\n  model.path: [missing.bin]\n" + local,
       "sweep.yaml:5: point missing.bin-"},
      {head + "grid:\n  model.path: [missing.bin]\n" + local, "model file not found: " + dir + "/missing.bin"},
      {head + "grid:\n  decoding.top_p: [0.9]\n" + local, "decoding.top_p only applies when sampling"},
      {"name: bad/name\nroot: out\nbase: base.yaml\ngrid: {decoding.seed: [0]}\n" + local,
       "sweep.yaml:1: name 'bad/name'"},
      {"name: bad\nroot: out\nbase: missing.yaml\ngrid: {decoding.seed: [0]}\n" + local,
       "sweep.yaml:3: base: config file not found: " + dir + "/missing.yaml"},
  };
  // In process (a CLI start costs about a second each); the CLI's handling is checked below.
  for (const Case& c : cases) {
    const std::string sweep = write_sweep(dir, c.body);
    const std::string message = test::error_message([&] { sweep::write_plan(sweep::load_sweep_file(sweep), false); });
    EXPECT_NE(message.find(c.fragment), std::string::npos) << "expected '" << c.fragment << "' in: " << message;
    EXPECT_FALSE(fs::exists(dir + "/out")) << c.fragment;
  }
  // Through the CLI: one error line, exit status 1, nothing on stdout, nothing written. A value the
  // run config cannot take names the key's line and the point.
  write_sweep(dir, head + "grid:\n  decoding.seed: [0]\n  decoding.max_new_tokens: [8, many]\n" + local);
  const auto typed = test::run_cli({"sweep", "plan", dir + "/sweep.yaml"});
  test::expect_one_error_line(typed, "sweep.yaml:6: point many_0-");
  EXPECT_NE(typed.err.find("(decoding.seed=0 decoding.max_new_tokens=many): decoding.max_new_tokens: expected an "
                           "integer, got 'many'"),
            std::string::npos)
      << typed.err;
  EXPECT_EQ(typed.out, "");
  write_sweep(dir, cases.front().body);
  for (const std::string& command : {"plan", "submit", "status", "collect"}) {
    const auto result = test::run_cli({"sweep", command, dir + "/sweep.yaml"});
    test::expect_one_error_line(result, cases.front().fragment);
    EXPECT_EQ(result.out, "") << command;
  }
  EXPECT_FALSE(fs::exists(dir + "/out"));
}

TEST(SweepPlan, InlineBaseResolvesPathsAgainstTheSweepFile) {
  const std::string dir = test::scratch_dir();
  const std::string model = test::stories260k_dir();
  fs::create_directories(dir + "/studies/prompts");
  test::write_file(dir + "/studies/prompts/p.txt", "Once upon a time\n");
  const std::string sweep = write_sweep(dir + "/studies", fmt::format(R"(name: inline
root: ../out
base:
  model: {{path: {0}/stories260K.bin, tokenizer: {0}/tok512.bin}}
  prompts: {{source: text_file, path: prompts/p.txt}}
  decoding: {{max_new_tokens: 4}}
  quantizers: [{{name: q, method: rtn}}]
  output: {{path: x.h5}}
grid:
  quantizers.0.params: [{{k_bits: 2}}, {{k_bits: 4}}]
launcher: {{kind: local}}
)",
                                                                      model));
  const auto result = test::run_cli({"sweep", "plan", sweep});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  const auto manifest = manifest_of(dir + "/out/inline");
  const RunConfig config = load_run_config(dir + "/out/inline/runs/" + ids_of(manifest)[0] + "/config.yaml", {});
  EXPECT_EQ(config.prompts.path, dir + "/studies/prompts/p.txt");
  EXPECT_EQ(config.quantizers[0].params.at("k_bits"), "2");

  // A bad key in an inline base: the error names its line in the sweep file.
  std::string text = test::read_file(sweep);
  text.replace(text.find("max_new_tokens"), 14, "max_new_tokenz");
  test::write_file(sweep, text);
  test::expect_one_error_line(test::run_cli({"sweep", "plan", sweep}), "sweep.yaml:6: point ");
}

// Status without Slurm, from the files alone: a live marker, a dead one, one from another host.
// run-point takes a planned point's folder; anything else is named as given.
TEST(SweepPoint, RunPointRefusesAFolderThatIsNotAPlannedPoint) {
  const std::string dir = test::scratch_dir();
  fs::create_directories(dir + "/runs/x");
  for (const std::string& given : {dir, dir + "/runs/x", dir + "/runs/x/"}) {
    test::expect_one_error_line(test::run_cli({"sweep", "run-point", given}),
                                given + ": not a planned point of a sweep: expected ROOT/NAME/runs/<id> holding "
                                        "config.yaml (kvdrift sweep plan writes it)");
  }
}

TEST(SweepStatus, RunningMarkersAndJson) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: markers
root: out
base: base.yaml
grid: {decoding.seed: [0, 1, 2, 3]}
launcher: {kind: local}
)");
  ASSERT_EQ(test::run_cli({"sweep", "plan", sweep}).exit_code, 0);
  const auto ids = ids_of(manifest_of(dir + "/out/markers"));
  const auto run_dir = [&](size_t i) { return dir + "/out/markers/runs/" + ids[i]; };
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const pid_t dead = ::fork();
  if (dead == 0) ::_exit(0);
  ::waitpid(dead, nullptr, 0);
  const auto started = sweep::process_start_time(::getpid());
  ASSERT_TRUE(started.has_value());
  test::write_file(run_dir(0) + "/running", fmt::format("{} {} {}\n", host, ::getpid(), *started));
  test::write_file(run_dir(0) + "/log.txt", "samples 0/1\n");
  test::write_file(run_dir(1) + "/running", fmt::format("{} {}\n", host, dead));
  test::write_file(run_dir(1) + "/log.txt", "line 1\nkilled while writing\n");
  test::write_file(run_dir(2) + "/running", "some-other-node 12345\n");
  // This process's PID with another start time: the PID was reused, the marker is stale.
  test::write_file(run_dir(3) + "/running", fmt::format("{} {} {}\n", host, ::getpid(), *started + 1));

  const auto status = run_cli_with_path({"sweep", "status", sweep}, "/usr/bin:/bin");  // no squeue
  ASSERT_EQ(status.exit_code, 0) << status.err;
  EXPECT_EQ(status.out, fmt::format(R"({0}  running  decoding.seed=0
{1}  failed  decoding.seed=1
    log: {4}/log.txt (no exit status recorded: the attempt was killed)
    | line 1
    | killed while writing
{2}  running  decoding.seed=2
{3}  pending  decoding.seed=3
# 4 points: 0 done, 1 failed, 2 running, 1 pending
)",
                                    ids[0], ids[1], ids[2], ids[3], run_dir(1)));
  const auto json = test::run_cli({"sweep", "status", sweep, "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.err;
  const auto parsed = nlohmann::json::parse(json.out);
  EXPECT_EQ(parsed["counts"], nlohmann::json({{"done", 0}, {"failed", 1}, {"pending", 1}, {"running", 2}}));
  EXPECT_EQ(parsed["points"][1]["state"], "failed");
  EXPECT_EQ(parsed["points"][1]["log"], run_dir(1) + "/log.txt");
  EXPECT_EQ(parsed["points"][3]["values"], nlohmann::json({{"decoding.seed", "3"}}));
}

TEST(SweepSlurm, MissingSbatchIsAClearErrorBeforeAnythingIsWritten) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: slurm
root: out
base: base.yaml
grid: {decoding.seed: [0, 1]}
launcher: {kind: slurm, partition: debug}
)");
  fs::create_directories(dir + "/empty-bin");
  const auto result = run_cli_with_path({"sweep", "submit", sweep}, dir + "/empty-bin");
  test::expect_one_error_line(result,
                              "launcher: slurm needs sbatch on PATH; Slurm is not installed or not loaded here");
  EXPECT_FALSE(fs::exists(dir + "/out"));
}

void write_script(const std::string& path, const std::string& text) {
  test::write_file(path, text);
  fs::permissions(path, fs::perms::owner_all);
}

// The batch script, task list and status logic against stand-in sbatch and squeue; one array task
// is run by executing the batch script as Slurm would.
TEST(SweepSlurm, ArrayScriptTasksAndQueueStates) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: array
root: out
base: base.yaml
grid: {quantizers.1.params.tile_size: [8, 16]}
launcher:
  kind: slurm
  partition: debug
  account: lab
  time: "00:10:00"
  mem: 2G
  cpus_per_task: 2
  gpus_per_task: 1
  max_parallel: 1
  extra: ["--qos=low", "#SBATCH --exclusive"]
  setup: |
    export SETUP_RAN=yes
)");
  const std::string bin = dir + "/bin";
  fs::create_directories(bin);
  write_script(bin + "/sbatch", "#!/bin/sh\necho \"$@\" >> " + dir + "/sbatch.args\necho 4242\n");
  write_script(bin + "/squeue", "#!/bin/sh\ncat " + dir + "/queue 2>/dev/null\n");
  const std::string path = bin + ":/usr/bin:/bin";

  const auto submitted = run_cli_with_path({"sweep", "submit", sweep}, path);
  ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
  const std::string sweep_dir = dir + "/out/array";
  EXPECT_NE(submitted.out.find("submitted job 4242: 2 points as array-1 (" + sweep_dir + "/slurm/array-1.sbatch)"),
            std::string::npos)
      << submitted.out;
  EXPECT_EQ(test::read_file(dir + "/sbatch.args"), "--parsable " + sweep_dir + "/slurm/array-1.sbatch\n");
  EXPECT_EQ(test::read_file(sweep_dir + "/slurm/jobs.txt"), "4242 array-1.sbatch 2\n");
  const auto ids = ids_of(manifest_of(sweep_dir));
  EXPECT_EQ(test::read_file(sweep_dir + "/slurm/array-1.tasks"), ids[0] + "\n" + ids[1] + "\n");
  const std::string script = test::read_file(sweep_dir + "/slurm/array-1.sbatch");
  const std::string expected_head = fmt::format(R"(#!/bin/bash
#SBATCH --job-name=array
#SBATCH --array=0-1%1
#SBATCH --output={0}/slurm/array-1-%a.log
#SBATCH --partition=debug
#SBATCH --account=lab
#SBATCH --time=00:10:00
#SBATCH --mem=2G
#SBATCH --cpus-per-task=2
#SBATCH --gres=gpu:1
#SBATCH --qos=low
#SBATCH --exclusive
)",
                                                sweep_dir);
  EXPECT_EQ(script.substr(0, expected_head.size()), expected_head);
  EXPECT_NE(script.find("export SETUP_RAN=yes\nset -euo pipefail\n"), std::string::npos) << script;
  EXPECT_NE(script.find(" sweep run-point '" + sweep_dir + "/runs/'\"$point\""), std::string::npos) << script;

  test::write_file(dir + "/queue", "4242_0 R\n4242_1 PD\n999_0 R\n");
  const auto queued = run_cli_with_path({"sweep", "status", sweep}, path);
  ASSERT_EQ(queued.exit_code, 0) << queued.err;
  EXPECT_EQ(status_word(queued.out, ids[0]), "running");
  EXPECT_EQ(status_word(queued.out, ids[1]), "pending");
  EXPECT_NE(queued.out.find("    slurm: job 4242 (4242_1): PD"), std::string::npos) << queued.out;
  // Queued points are not submitted twice.
  const auto nothing = run_cli_with_path({"sweep", "submit", sweep, "--rerun-failed"}, path);
  ASSERT_EQ(nothing.exit_code, 0) << nothing.err;
  EXPECT_NE(nothing.out.find("nothing to submit: 0 done, 2 running or queued"), std::string::npos) << nothing.out;

  // Array task 0 as Slurm runs it: the task maps to the first point, which runs to completion with
  // its output both in the task's stdout and in the point's log.txt.
  const std::string task_log = sweep_dir + "/slurm/array-1-0.log";
  const std::string command = fmt::format("SLURM_ARRAY_TASK_ID=0 PATH='{}' bash '{}/slurm/array-1.sbatch' > '{}' 2>&1",
                                          path, sweep_dir, task_log);
  ASSERT_EQ(std::system(command.c_str()), 0) << test::read_file(task_log);
  const std::string point_dir = sweep_dir + "/runs/" + ids[0];
  EXPECT_TRUE(complete(point_dir + "/run.h5"));
  EXPECT_EQ(test::read_file(point_dir + "/exit_status"), "0\n");
  EXPECT_FALSE(fs::exists(point_dir + "/running"));
  EXPECT_NE(test::read_file(point_dir + "/log.txt").find("output: " + point_dir + "/run.h5"), std::string::npos);
  EXPECT_NE(test::read_file(task_log).find("output: " + point_dir + "/run.h5"), std::string::npos);

  // Task 1 left the queue without running (its Slurm log is all there is): failed, with that log.
  test::write_file(dir + "/queue", "");
  test::write_file(sweep_dir + "/slurm/array-1-1.log", "slurmstepd: error: *** JOB 4243 CANCELLED ***\n");
  const auto after = run_cli_with_path({"sweep", "status", sweep}, path);
  EXPECT_EQ(status_word(after.out, ids[0]), "done");
  EXPECT_EQ(status_word(after.out, ids[1]), "failed");
  EXPECT_NE(after.out.find("    log: " + sweep_dir + "/slurm/array-1-1.log (no exit status recorded"),
            std::string::npos)
      << after.out;
  EXPECT_NE(after.out.find("    | slurmstepd: error: *** JOB 4243 CANCELLED ***"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("# 2 points: 1 done, 1 failed, 0 running, 0 pending"), std::string::npos) << after.out;

  const auto rerun = run_cli_with_path({"sweep", "submit", sweep, "--rerun-failed"}, path);
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  EXPECT_NE(rerun.out.find("submitted job 4242: 1 points as array-2"), std::string::npos) << rerun.out;
  EXPECT_EQ(test::read_file(sweep_dir + "/slurm/array-2.tasks"), ids[1] + "\n");
  EXPECT_NE(test::read_file(sweep_dir + "/slurm/array-2.sbatch").find("#SBATCH --array=0-0%1\n"), std::string::npos);
}

// Four points with two local workers; one fails at run time (its prompts file is missing), shows
// as failed with its log, and --rerun-failed runs only it once the file exists.
// One attempt per point and one plan or submit per sweep. A second run-point of a point that is
// running stops with one line naming the first, before it touches the point's log, marker or exit
// status; a second submit or plan while a submit runs stops the same way. The first ones (held still
// by SIGSTOP meanwhile) finish.
TEST(SweepLocal, ASecondRunPointOrSubmitWhileOneRunsIsRefused) {
  const std::string dir = test::scratch_dir();
  write_base(dir, R"(  source: inline
  texts: ["Once upon a time, there was a little girl named Lily.", "One day, a boy named Tim went to the park.",
          "The sun was shining and the birds were singing."])");
  const std::string sweep = write_sweep(dir, R"(name: locks
root: out
base: base.yaml
grid: {decoding.max_new_tokens: [24, 25]}
launcher: {kind: local}
)");
  ASSERT_EQ(test::run_cli({"sweep", "plan", sweep}).exit_code, 0);
  const std::string sweep_dir = dir + "/out/locks";
  const auto ids = ids_of(manifest_of(sweep_dir));
  const std::string point = sweep_dir + "/runs/" + ids[0];

  const pid_t first = test::start_cli({"sweep", "run-point", point}, dir + "/first.txt");
  ASSERT_TRUE(test::wait_for_lock_holder(point + "/point.lock", first)) << test::read_file(dir + "/first.txt");
  for (int tries = 0; tries < 6000 && !fs::exists(point + "/running"); ++tries) ::usleep(10000);
  ::kill(first, SIGSTOP);
  const std::string marker = test::read_file(point + "/running");
  const auto second = test::run_cli({"sweep", "run-point", point});
  EXPECT_EQ(second.exit_code, 1);
  EXPECT_EQ(second.err, fmt::format("kvdrift: error: point {0} is held by another kvdrift (pid {1} on host {2}; lock "
                                    "file {0}/point.lock): wait for its run to end\n",
                                    point, first, test::host_name()));
  EXPECT_EQ(test::read_file(point + "/running"), marker);
  EXPECT_FALSE(fs::exists(point + "/exit_status"));
  ::kill(first, SIGCONT);
  ASSERT_EQ(test::wait_exit_code(first), 0) << test::read_file(dir + "/first.txt");
  EXPECT_TRUE(complete(point + "/run.h5"));
  EXPECT_EQ(test::read_file(point + "/exit_status"), "0\n");
  EXPECT_NE(test::read_file(point + "/log.txt").find("output: " + point + "/run.h5"), std::string::npos);
  EXPECT_FALSE(fs::exists(point + "/point.lock"));

  // The submit runs the other point; meanwhile neither another submit nor a plan may start.
  const pid_t submit = test::start_cli({"sweep", "submit", sweep}, dir + "/submit.txt");
  ASSERT_TRUE(test::wait_for_lock_holder(sweep_dir + "/sweep.lock", submit)) << test::read_file(dir + "/submit.txt");
  ::kill(submit, SIGSTOP);
  for (const std::string command : {"submit", "plan"}) {
    const auto refused = test::run_cli({"sweep", command, sweep});
    EXPECT_EQ(refused.exit_code, 1) << command;
    EXPECT_EQ(refused.err, fmt::format("kvdrift: error: sweep {0} is held by another kvdrift (pid {1} on host {2}; "
                                       "lock file {0}/sweep.lock): one `kvdrift sweep plan` or `submit` of a sweep at "
                                       "a time; wait for it to end\n",
                                       sweep_dir, submit, test::host_name()));
    EXPECT_EQ(refused.out, "") << command;
  }
  ::kill(submit, SIGCONT);
  ASSERT_EQ(test::wait_exit_code(submit), 0) << test::read_file(dir + "/submit.txt");
  EXPECT_NE(test::read_file(dir + "/submit.txt").find("submitting 1 of 2 points (1 done, 0 running or queued)"),
            std::string::npos)
      << test::read_file(dir + "/submit.txt");
  EXPECT_TRUE(complete(sweep_dir + "/runs/" + ids[1] + "/run.h5"));
  EXPECT_FALSE(fs::exists(sweep_dir + "/sweep.lock"));
}

// Workers share the cores: each run gets cores / workers intra-op threads (at least 1) unless
// launcher.threads or $KVDRIFT_THREADS says otherwise, and the status line says which.
TEST(SweepLocal, WorkersShareTheCores) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  const int cores = CPU_COUNT(&allowed);
  const int share = std::max(1, cores / 2);
  struct Case {
    std::string name, launcher_threads, kvdrift_threads, status, threads;
  };
  const std::vector<Case> cases = {
      {"share", "", "", fmt::format("{} ({} cores / 2 workers)", share, cores), std::to_string(share)},
      {"launcher", ", threads: 3", "", "3 (launcher.threads)", "3"},
      {"environment", ", threads: 3", "1", "KVDRIFT_THREADS=1", "1"},
  };
  for (const Case& c : cases) {
    const std::string sweep = write_sweep(dir, fmt::format(R"(name: {}
root: out
base: base.yaml
grid:
  decoding.max_new_tokens: [2, 3]
launcher: {{kind: local, workers: 2{}}}
)", c.name, c.launcher_threads), c.name + ".yaml");
    const std::string saved = std::getenv("KVDRIFT_THREADS") ? std::getenv("KVDRIFT_THREADS") : "";
    if (c.kvdrift_threads.empty()) ::unsetenv("KVDRIFT_THREADS");
    else ::setenv("KVDRIFT_THREADS", c.kvdrift_threads.c_str(), 1);
    const auto submitted = test::run_cli({"sweep", "submit", sweep});
    ::setenv("KVDRIFT_THREADS", saved.c_str(), 1);
    ASSERT_EQ(submitted.exit_code, 0) << submitted.err;
    EXPECT_NE(submitted.out.find("local: 2 worker(s), intra-op threads each: " + c.status + "\n"), std::string::npos)
        << submitted.out;
    for (const std::string& id : ids_of(manifest_of(dir + "/out/" + c.name))) {
      const std::string log = test::read_file(dir + "/out/" + c.name + "/runs/" + id + "/log.txt");
      EXPECT_NE(log.find("cpu (" + c.threads + " intra-op threads)"), std::string::npos) << c.name << ": " << log;
    }
  }
  write_sweep(dir, "name: bad\nroot: out\nbase: base.yaml\ngrid: {decoding.max_new_tokens: [2]}\n"
                   "launcher: {kind: local, threads: 5000}\n", "bad.yaml");
  EXPECT_EQ(test::error_message([&] { sweep::load_sweep_file(dir + "/bad.yaml"); }),
            dir + "/bad.yaml:5: launcher.threads must be <= 4096, got 5000");
}

// A rebuild during a sweep replaces or removes the kvdrift file: the points still start (the running
// binary, through /proc/self/exe), instead of failing with "cannot execute the point's kvdrift".
TEST(SweepLocal, PointsStartWhenTheBinaryFileIsRemovedMidSweep) {
  const std::string dir = test::scratch_dir();
  write_base(dir);
  const std::string sweep = write_sweep(dir, R"(name: removed
root: out
base: base.yaml
grid:
  decoding.max_new_tokens: [2, 3, 4]
launcher: {kind: local, workers: 1}
)");
  const std::string copy = dir + "/kvdrift-copy";
  fs::copy_file(KVDRIFT_CLI, copy);
  fs::permissions(copy, fs::perms::owner_all);
  const std::string out_path = dir + "/submit.out";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 1);
    ::dup2(::open((dir + "/submit.err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), 2);
    ::execl(copy.c_str(), copy.c_str(), "sweep", "submit", sweep.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Removed once the first point runs: the other two start after it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  bool started = false;
  while (!started && std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(dir + "/out/removed/runs"))
      for (const auto& point : fs::directory_iterator(dir + "/out/removed/runs"))
        started = started || fs::exists(point.path() / "running") || fs::exists(point.path() / "exit_status");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(started);
  fs::remove(copy);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const std::string out = test::read_file(out_path);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out << test::read_file(dir + "/submit.err");
  EXPECT_NE(out.find("3 points: 3 done, 0 failed"), std::string::npos) << out;
}

TEST(SweepLocal, TwoWorkersStatusCollectAndRerunFailed) {
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/a.txt", "Once upon a time\n");
  write_base(dir, "  source: text_file\n  path: a.txt");
  const std::string sweep = write_sweep(dir, R"(name: local
root: out
base: base.yaml
grid:
  prompts.path: [a.txt, b.txt]
  quantizers.1.params.tile_size: [8, 16, 32]
exclude:
  - {prompts.path: b.txt, quantizers.1.params.tile_size: 8}
  - {prompts.path: b.txt, quantizers.1.params.tile_size: 32}
launcher: {kind: local, workers: 2, devices: [cpu]}
)");
  const auto first = test::run_cli({"sweep", "submit", sweep});
  test::expect_one_error_line(first, "1 of 4 points failed; `kvdrift sweep status " + sweep + "` shows their logs",
                              /*empty_stdout=*/false);
  EXPECT_NE(first.out.find("submitting 4 of 4 points"), std::string::npos) << first.out;
  const std::string sweep_dir = dir + "/out/local";
  const auto manifest = manifest_of(sweep_dir);
  const auto ids = ids_of(manifest);
  ASSERT_EQ(ids.size(), 4u);
  const std::string failing = ids[3];  // b.txt with tile_size 16: the last in expansion order
  EXPECT_EQ(manifest["points"][3]["values"]["prompts.path"], "b.txt");

  const auto status = test::run_cli({"sweep", "status", sweep});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(status_word(status.out, ids[i]), "done") << status.out;
  EXPECT_EQ(status_word(status.out, failing), "failed") << status.out;
  const std::string failing_dir = sweep_dir + "/runs/" + failing;
  EXPECT_NE(status.out.find("    log: " + failing_dir + "/log.txt (exit status 1)"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("    | kvdrift: error: "), std::string::npos) << status.out;
  EXPECT_NE(status.out.find(dir + "/b.txt"), std::string::npos) << status.out;
  EXPECT_NE(status.out.find("# 4 points: 3 done, 1 failed, 0 running, 0 pending"), std::string::npos) << status.out;

  const auto collected = test::run_cli({"sweep", "collect", sweep});
  ASSERT_EQ(collected.exit_code, 0) << collected.err;
  EXPECT_NE(collected.out.find("collected 3 of 4 points (1 incomplete), 7 rows"), std::string::npos) << collected.out;
  EXPECT_NE(collected.err.find("incomplete point " + failing + ": failed"), std::string::npos) << collected.err;

  // The table against each run's /summary, read independently with h5py; summary.h5 against the CSV.
  std::string output;
  const int checked = test::run_python(dir, "check_collect", R"(import csv, json, math, os, sys, h5py, numpy as np
sweep_dir = sys.argv[1]
manifest = json.load(open(f"{sweep_dir}/manifest.json"))
rows = list(csv.DictReader(open(f"{sweep_dir}/summary.csv", newline="")))
header = next(csv.reader(open(f"{sweep_dir}/summary.csv", newline="")))
assert header[:6] == ["point", "status", "quantizer", "method", "prompts.path", "quantizers.1.params.tile_size"], header
metrics = header[6:]
assert metrics == sorted(metrics) and "teacher_forced.kl_mean" in metrics and "samples" in metrics, metrics
ids = sorted(p["id"] for p in manifest["points"])
expected = []
for pid in ids:
    f = f"{sweep_dir}/runs/{pid}/run.h5"
    if not os.path.exists(f):
        expected.append((pid, "failed", "", ""))
        continue
    h = h5py.File(f, "r")
    assert h.attrs["complete"] == 1
    for q, m in (("kivi-2bit", "kivi"), ("kvarn", "kvarn")):
        expected.append((pid, "done", q, m))
        g = h[f"summary/{q}"]
        row = next(r for r in rows if r["point"] == pid and r["quantizer"] == q)
        values = dict(g.attrs)
        for lane, sub in g.items():
            values.update({f"{lane}.{k}": v for k, v in sub.attrs.items()})
        assert set(values) == set(metrics), (set(values) ^ set(metrics))
        for k, v in values.items():
            v = float(v)
            if math.isnan(v):
                assert row[k] == "", (k, row[k])
            else:
                assert float(row[k]) == v, (pid, q, k, row[k], v)
    h.close()
assert [(r["point"], r["status"], r["quantizer"], r["method"]) for r in rows] == expected, rows
failed = next(r for r in rows if r["status"] == "failed")
assert failed["prompts.path"] == "b.txt" and failed["quantizers.1.params.tile_size"] == "16"
assert all(failed[m] == "" for m in metrics)
s = h5py.File(f"{sweep_dir}/summary.h5", "r")
assert s.attrs["sweep_schema_version"] == 1 and s.attrs["sweep_name"] == "local"
assert s.attrs["grid_keys"] == "prompts.path\nquantizers.1.params.tile_size"
assert s["rows"].attrs["columns"] == "\n".join(header)
for name in header:
    d = s["rows"][name]
    assert d.shape == (len(rows),), (name, d.shape)
    if name in metrics or name == "quantizers.1.params.tile_size":
        assert d.dtype == np.float64, (name, d.dtype)
        for r, v in zip(rows, d[...]):
            assert (r[name] == "" and math.isnan(v)) or float(r[name]) == v, (name, r[name], v)
    else:
        assert h5py.check_string_dtype(d.dtype) is not None, (name, d.dtype)
        assert [x.decode() for x in d[...]] == [r[name] for r in rows], name
print("ok", len(rows))
)",
                                       {sweep_dir}, &output);
  EXPECT_EQ(checked, 0) << output;
  EXPECT_EQ(output, "ok 7\n");

  // The missing file arrives: --rerun-failed runs that point alone.
  std::map<std::string, fs::file_time_type> finished_times;
  for (size_t i = 0; i < 3; ++i)
    finished_times[ids[i]] = fs::last_write_time(sweep_dir + "/runs/" + ids[i] + "/run.h5");
  test::write_file(dir + "/b.txt", "One day, a boy named Tim went to the park.\n");
  const auto plain = test::run_cli({"sweep", "submit", sweep});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_NE(
      plain.out.find("nothing to submit: 3 done, 0 running or queued, 1 failed (not rerun without --rerun-failed)"),
      std::string::npos)
      << plain.out;
  const auto rerun = test::run_cli({"sweep", "submit", sweep, "--rerun-failed"});
  ASSERT_EQ(rerun.exit_code, 0) << rerun.err;
  EXPECT_NE(rerun.out.find("submitting 1 of 4 points"), std::string::npos) << rerun.out;
  EXPECT_NE(rerun.out.find("[1/1] " + failing + "  done"), std::string::npos) << rerun.out;
  for (const auto& [id, time] : finished_times)
    EXPECT_EQ(fs::last_write_time(sweep_dir + "/runs/" + id + "/run.h5"), time) << id;
  const auto final_status = test::run_cli({"sweep", "status", sweep});
  EXPECT_NE(final_status.out.find("# 4 points: 4 done, 0 failed, 0 running, 0 pending"), std::string::npos)
      << final_status.out;

  // A complete run.h5 copied from another point is not this point's result, and a damaged one after
  // an exit status of 0 says what is wrong with it; collect takes neither.
  const auto run_h5 = [&](size_t i) { return sweep_dir + "/runs/" + ids[i] + "/run.h5"; };
  fs::copy_file(run_h5(0), run_h5(1), fs::copy_options::overwrite_existing);
  {
    std::fstream damaged(run_h5(2), std::ios::in | std::ios::out | std::ios::binary);
    damaged.write("\0\0\0\0\0\0\0\0", 8);  // the HDF5 signature
  }
  const auto after = test::run_cli({"sweep", "status", sweep});
  ASSERT_EQ(after.exit_code, 0) << after.err;
  EXPECT_EQ(status_word(after.out, ids[1]), "failed") << after.out;
  EXPECT_EQ(status_word(after.out, ids[2]), "failed") << after.out;
  // Points 0 and 1 differ in tile_size (8, 16).
  EXPECT_NE(after.out.find("    run.h5 is complete but was written for another config than " + sweep_dir + "/runs/" +
                           ids[1] + "/config.yaml (line "),
            std::string::npos)
      << after.out;
  EXPECT_NE(after.out.find("    params: {preset: k2v2, tile_size: 8}` in run.h5, `    params: {preset: k2v2, tile_size: 16}` in "
                           "config.yaml)"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("    run.h5 cannot be read: cannot open HDF5 file " + run_h5(2) +
                           " for reading (HDF5: file signature not found)"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("# 4 points: 2 done, 2 failed, 0 running, 0 pending"), std::string::npos) << after.out;
  const auto recollected = test::run_cli({"sweep", "collect", sweep});
  ASSERT_EQ(recollected.exit_code, 0) << recollected.err;
  EXPECT_NE(recollected.out.find("collected 2 of 4 points (2 incomplete), 6 rows"), std::string::npos)
      << recollected.out;
}

}  // namespace
}  // namespace kvdrift
