#pragma once
// `kvdrift sweep plan`: expands a sweep file into its points, validates each point as the run config
// it becomes, and writes ROOT/NAME/runs/<id>/config.yaml plus ROOT/NAME/manifest.json (layout and id
// rules: docs/sweep.md). The manifest is what the other sweep commands read.
#include <optional>
#include <string>
#include <vector>

#include "core/writer_lock.h"
#include "sweep/sweep_file.h"

namespace kvdrift::sweep {

struct Point {
  std::string id;
  std::vector<std::string> values;  // canonical YAML, one per Manifest::keys entry
};

// The files of one point's run directory.
struct PointFiles {
  std::string dir, config, log, exit_status, running;
  std::string output;  // run.h5
  std::string lock;    // point.lock: held by the attempt that runs the point (sweep/point_run.h)
};
PointFiles point_files(const std::string& sweep_directory, const std::string& id);

// Writes `text` to `path` through a temporary file and a rename, so readers never see half of it and a
// link at `path` is replaced rather than written through; fails naming the file.
void write_atomically(const std::string& path, const std::string& text);
// The whole file ("" when it cannot be read).
std::string read_text(const std::string& path);

struct Manifest {
  std::string name;
  std::string sweep_file;
  std::string sweep_sha256;       // of the sweep file's text when it was planned
  std::string directory;          // ROOT/NAME
  std::vector<std::string> keys;  // grid and zip keys, in sweep-file order
  std::vector<bool> numeric;      // per key: every value of it in the sweep is a YAML number
  std::vector<Point> points;      // in expansion order (the last axis fastest)

  PointFiles files(const Point& point) const { return point_files(directory, point.id); }
  // "k1=v1 k2=v2", for messages and status lines.
  std::string describe(const Point& point) const;
};

// The points of the product of the sweep's axes, less the excluded ones, with their ids.
Manifest expand(const SweepFile& sweep);

struct PlanSummary {
  size_t points = 0;
  size_t written = 0;    // configs written (new or changed)
  size_t unchanged = 0;  // configs already there with the same text
  size_t reset = 0;      // changed points whose results --force deleted
  double seconds = 0;
};

// Expands, validates every point (its run config built in memory from the base and the point's values,
// and checked against the model as a run checks it: decode/config_checks.h), then writes what changed. A point
// whose config changed while its directory holds results is an error naming the point and the first
// differing line, unless `force` (then its results are deleted). Nothing is written when any point
// fails. Once every point is valid, the plan takes the sweep's lock (ROOT/NAME/sweep.lock: one plan
// or submit of a sweep at a time) before it reads what is there; given `lock`, it is left there for
// the caller to hold on (submit, while its points run), else released on return.
PlanSummary write_plan(const SweepFile& sweep, bool force, Manifest* manifest_out = nullptr,
                       std::optional<WriterLock>* lock = nullptr);

// The manifest written by write_plan; fails (suggesting `kvdrift sweep plan`) when there is none.
// Warns when the sweep file changed since.
Manifest read_manifest(const SweepFile& sweep);

}  // namespace kvdrift::sweep
