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
// resumes by redoing the sample it was writing. Before each session that writes, disk space for it is
// reserved (h5::reserve_space): a full disk stops the run with the file as the last session left it,
// so its finished samples stay and the run resumes once there is space.
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io/hdf5.h"
#include "io/run_config.h"
#include "run/run_summary.h"

namespace kvdrift {

struct SampleResult;  // metrics/sample_result.h
struct Prompt;        // io/prompts.h
class RunLog;

// Who made the run and with what: written once, when the file is created.
struct RunMetadata {
  std::string tool_version;
  std::string git_revision;
  std::string model_path;
  std::string model_format;
  std::string model_sha256;  // empty for synthetic models
  std::string prompts_sha256;  // of every prompt's id and token ids, in order: a resume must see the same
  std::string device;
  std::string dtype;
  std::string gemm;     // the weight GEMMs' path (model/linear.h): "packed" or "plain"
  int64_t threads = 0;  // intra-op threads
  std::vector<std::pair<std::string, std::vector<int64_t>>> model_shapes;  // name -> shape
  std::map<std::string, std::string> model_config;
  uint64_t decoding_seed = 0;
  uint64_t weights_seed = 0;
  PrefillMode prefill = PrefillMode::Full;  // decoding.prefill
  int64_t prefill_chunk = 0;                // its chunk size; 0 with a full prefill
  std::vector<std::string> quantizer_names;
  std::map<std::string, std::map<std::string, std::string>> quantizer_params;  // name -> param -> value
};

// Writes the samples of one batch of a run log while they decode (RunLog::begin_samples).
class SampleWriter {
 public:
  // The samples so far (decode/engine.h's progress), in the order they were begun: appends the
  // per-step rows the file does not hold yet and flushes them. The first call creates the samples'
  // arrays and switches the file to SWMR mode; later calls must carry the same arrays.
  void append(const std::vector<SampleResult>& so_far);
  // The finished samples: their remaining rows, every other array and attribute, then each one's
  // completion mark. The file is closed afterwards.
  void finish(const std::vector<SampleResult>& results);

 private:
  friend class RunLog;
  SampleWriter(RunLog& log, std::vector<int64_t> indices, uint64_t bytes_before)
      : log_(log), indices_(std::move(indices)), bytes_before_(bytes_before) {}
  void check_count(size_t results) const;

  RunLog& log_;
  std::vector<int64_t> indices_;
  uint64_t bytes_before_;         // the file's size before the samples began
  std::optional<h5::File> live_;  // open in SWMR mode between the first append and finish
};

class RunLog {
 public:
  // Creates the log at `path`, or resumes the one there. A new file (or any file, with `overwrite`)
  // gets the config and `metadata`. An existing one must hold the same resolved config (and model
  // checksum) or this fails, suggesting --overwrite; resuming drops the samples a killed writer left
  // incomplete, recovering the file first when that writer died with it open. A finished run is left
  // byte for byte as it is (its summary and task scores included) unless a sample is added.
  static RunLog open(const std::string& path, const std::string& resolved_config_yaml, const RunMetadata& metadata,
                     bool overwrite);

  const std::string& path() const { return path_; }
  bool has_sample(int64_t index) const { return finished_.count(index) > 0; }

  // Starts samples `indices` (prompt order, from 0) that decode together: each one's group, marked
  // incomplete, with its prompt. An incomplete group of such an index (a write that failed earlier)
  // is replaced; a complete one is an error. Arrays must fit their shapes and, for the names the
  // schema knows, its axes; a failed write leaves the sample incomplete, to be replaced.
  SampleWriter begin_samples(const std::vector<int64_t>& indices, const std::vector<Prompt>& prompts);
  // A whole sample at once: begin_samples, then finish.
  void write_sample(int64_t index, const SampleResult& result);

  // Summarizes the finished samples per quantizer, read back from the file (run/run_summary.h), writes
  // /summary and marks the run complete; `settings` come from the run's config (summary_settings).
  // Rows come in the order of `quantizer_names`. For a finished run this process added no sample to,
  // only reads the rows back from /summary.
  std::vector<RunSummaryRow> finish(const std::vector<std::string>& quantizer_names,
                                    const SummarySettings& settings = {});

 private:
  friend class SampleWriter;
  RunLog(std::string path, std::set<int64_t> finished) : path_(std::move(path)), finished_(std::move(finished)) {}
  // Reserves the disk space a session writing `samples` samples may need (none: the summary or
  // marks): twice what the largest sample so far took, and at least kMinReserveBytes.
  void reserve_for(size_t samples) const;
  uint64_t file_bytes() const;

  std::string path_;
  std::set<int64_t> finished_;  // indices of the samples marked complete in the file
  uint64_t sample_bytes_ = 0;   // the most a finished sample has added to the file
  bool finished_run_ = false;   // the file is a finished run, unchanged by this process so far
};

// The least disk space reserved before a session writes (RunLog::reserve_for): more than a sample of
// the demo (about 5 MiB) or a run's summary needs.
inline constexpr uint64_t kMinReserveBytes = uint64_t{16} << 20;

}  // namespace kvdrift
