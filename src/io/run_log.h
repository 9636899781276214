#pragma once
// The HDF5 run log of `kvdrift run` (SPEC §4): one file per run holding the resolved config, the
// run's identity, every finished sample's tokens, texts and metric arrays, and a per-quantizer
// summary. The layout is documented, and versioned by the root attribute schema_version, in
// docs/hdf5-schema.md.
//
// Between samples the file is closed and consistent, so any reader (h5py, HDF5 tools) can open it.
// While a sample decodes, its per-step arrays grow in the file with the writer in SWMR mode, flushed
// at every append, so a SWMR reader watches them grow and a killed run leaves consistent data. A
// sample counts as written only once its completion mark is set, so a run killed at any point
// resumes by redoing the sample it was writing.
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io/hdf5.h"

namespace kvdrift {

struct SampleResult;  // decode/engine.h: included by run_log.cpp only, so this header needs no LibTorch
struct Prompt;        // io/prompts.h
class RunLog;

// Who made the run and with what: written once, when the file is created.
struct RunMetadata {
  std::string tool_version;
  std::string git_revision;
  std::string model_path;
  std::string model_format;
  std::string model_sha256;  // empty for synthetic models
  std::string device;
  std::string dtype;
  std::vector<std::pair<std::string, std::vector<int64_t>>> model_shapes;  // name -> shape
  std::map<std::string, std::string> model_config;
  uint64_t decoding_seed = 0;
  uint64_t weights_seed = 0;
  std::vector<std::string> quantizer_names;
  std::map<std::string, std::map<std::string, std::string>> quantizer_params;  // name -> param -> value
};

// One quantizer's line of the table `kvdrift run` prints; NaN where the run has no such lane.
struct RunSummaryRow {
  std::string quantizer;
  double mean_kl;                  // teacher_forced KL, mean over samples and steps
  double first_divergence_median;  // free_running
  double bits_per_element;         // mean over samples and lanes
};

// Writes one sample of a run log while it decodes (RunLog::begin_sample).
class SampleWriter {
 public:
  // The sample so far (decode/engine.h's progress): appends the per-step rows the file does not hold
  // yet and flushes them. The first call creates the sample's arrays and switches the file to SWMR
  // mode; later calls must carry the same arrays.
  void append(const SampleResult& so_far);
  // The finished sample: its remaining rows, every other array and attribute, then its completion
  // mark. The file is closed afterwards.
  void finish(const SampleResult& result);

 private:
  friend class RunLog;
  SampleWriter(RunLog& log, int64_t index) : log_(log), index_(index) {}

  RunLog& log_;
  int64_t index_;
  std::optional<h5::File> live_;  // open in SWMR mode between the first append and finish
};

class RunLog {
 public:
  // Creates the log at `path`, or resumes the one there. A new file (or any file, with `overwrite`)
  // gets the config and `metadata`. An existing one must hold the same resolved config (and model
  // checksum) or this fails, suggesting --overwrite; resuming drops the samples a killed writer left
  // incomplete, recovering the file first when that writer died with it open.
  static RunLog open(const std::string& path, const std::string& resolved_config_yaml, const RunMetadata& metadata,
                     bool overwrite);

  const std::string& path() const { return path_; }
  bool has_sample(int64_t index) const { return finished_.count(index) > 0; }

  // Starts sample `index` (prompt order, from 0): its group, marked incomplete, with the prompt. An
  // incomplete group of that index (a write that failed earlier) is replaced; a complete one is an
  // error. Arrays must fit their shapes and, for the names the schema knows, its axes; a failed write
  // leaves the sample incomplete, to be replaced.
  SampleWriter begin_sample(int64_t index, const Prompt& prompt);
  // A whole sample at once: begin_sample, then finish.
  void write_sample(int64_t index, const SampleResult& result);

  // Summarizes the finished samples per quantizer, read back from the file, writes /summary and marks
  // the run complete. Rows come in the order of `quantizer_names`.
  std::vector<RunSummaryRow> finish(const std::vector<std::string>& quantizer_names);

 private:
  friend class SampleWriter;
  RunLog(std::string path, std::set<int64_t> finished) : path_(std::move(path)), finished_(std::move(finished)) {}

  std::string path_;
  std::set<int64_t> finished_;  // indices of the samples marked complete in the file
};

}  // namespace kvdrift
