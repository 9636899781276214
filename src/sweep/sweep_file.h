#pragma once
// The sweep file of `kvdrift sweep` (docs/sweep.md): a base run config, the axes of a grid of `--set`
// overrides (grid keys and zip groups), exclude rules and how to launch the points. Loading checks
// the file's own structure; whether the keys and values make valid run configs is the plan's job
// (sweep/plan.h), which loads every point through the run config.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kvdrift::sweep {

// One axis of the product: a grid key (one key) or a zip group (several keys varying together).
// values[i][k] is the i-th point's value of keys[k], as canonical flow-style YAML: text
// that reads back as the same value (a quoted "2" stays quoted), and the same text for equal values.
struct Axis {
  std::vector<std::string> keys;
  std::vector<int> key_lines;  // 1-based line of each key in the sweep file
  std::vector<std::vector<std::string>> values;
};

struct ExcludeRule {
  std::vector<std::pair<std::string, std::string>> matches;  // key -> value (canonical YAML)
  int line = 0;
};

struct LocalLauncher {
  int64_t workers = 1;
  std::vector<std::string> devices = {"cpu"};  // cpu | cuda:N
  int64_t threads = 0;                         // intra-op threads per worker; 0: the cores / workers
};

struct SlurmLauncher {
  std::string partition, account, time, mem;  // "" when not given
  int64_t cpus_per_task = 0;                  // 0: not given
  int64_t gpus_per_task = 0;                  // 0: no --gres line
  int64_t max_parallel = 0;                   // 0: no %M throttle
  std::vector<std::string> extra;             // #SBATCH options, verbatim
  std::string setup;                          // shell text run before each point
};

struct SweepFile {
  std::string path;  // absolute
  std::string text;
  std::string text_sha256;
  std::string name;
  std::string root;         // absolute
  std::string base_path;    // absolute; "" when the base is inline
  bool inline_base = false;  // the base is a run config written in the sweep file, under `base`
  std::vector<Axis> axes;
  std::vector<ExcludeRule> excludes;
  std::string launcher_kind;  // local | slurm
  LocalLauncher local;
  SlurmLauncher slurm;

  std::string directory() const;              // ROOT/NAME
  std::string file_directory() const;         // the sweep file's directory: relative paths resolve there
  std::vector<std::string> keys() const;      // every grid and zip key, in file order
  int line_of(const std::string& key) const;  // 0 when `key` is not a grid/zip key
};

// Reads and checks the sweep file. Throws Error naming the file, line and key on the first problem.
SweepFile load_sweep_file(const std::string& path);

// Whether canonical YAML text is a plain YAML number (an integer or a decimal float).
bool is_yaml_number(const std::string& canonical_text);

}  // namespace kvdrift::sweep
