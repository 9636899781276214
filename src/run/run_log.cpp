#include "run/run_log.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <string_view>
#include <thread>

#include "core/error.h"
#include "core/line_difference.h"
#include "metrics/sample_result.h"
#include "io/hdf5.h"
#include "metrics/metric_table.h"

namespace kvdrift {

namespace {

constexpr int64_t kSchemaVersion = 1;  // docs/hdf5-schema.md; bump on any incompatible change
constexpr int kGzipLevel = 4;
// Per-step arrays: 256 steps per chunk keeps chunks few for typical runs (max_new_tokens 256).
const h5::AppendableOptions kStepArrays{256, kGzipLevel, true};
// How long a write waits for readers holding the file open before giving up.
constexpr std::chrono::seconds kReaderWait{60};
// Where each log keeps the metric table (metrics/metric_table.h) its samples follow.
constexpr const char* kMetricTablePath = "schema/metrics";

// --- Array layout ---

// Checks that `values` fill `shape` and that the shape has one axis per name in `axes` ("a,b");
// returns the shape as HDF5 dimensions.
std::vector<hsize_t> checked_dims(const h5::Group& group, const std::string& name, size_t value_count,
                                  const std::vector<int64_t>& shape, const std::string& axes) {
  std::vector<hsize_t> dims;
  for (int64_t dim : shape) {
    if (dim < 0)
      fail("{}: dataset '{}/{}': shape [{}] has a negative dimension", group.file_path(), group.path(), name,
           fmt::join(shape, ", "));
    dims.push_back(static_cast<hsize_t>(dim));
  }
  if (h5::Dataset::element_count(dims) != value_count) {
    fail("{}: dataset '{}/{}': {} values do not fill shape [{}]", group.file_path(), group.path(), name, value_count,
         fmt::join(shape, ", "));
  }
  const size_t axis_count = static_cast<size_t>(std::count(axes.begin(), axes.end(), ',')) + 1;
  if (dims.size() != axis_count) {
    fail("{}: dataset '{}/{}': shape [{}] does not match the schema's axes [{}]", group.file_path(), group.path(), name,
         fmt::join(shape, ", "), axes);
  }
  return dims;
}

// Writes a fixed-size array as `group`/`name`.
template <typename T>
void write_array(h5::Group& group, const std::string& name, const std::vector<T>& values,
                 const std::vector<int64_t>& shape, const std::string& axes) {
  const auto dims = checked_dims(group, name, values.size(), shape, axes);
  group.write(name, values, dims, kGzipLevel).set_attribute("axes", axes);
}

// Appends the rows of `values` (shape [rows, ...]) beyond those `group`/`name` holds already,
// creating the growing dataset when it is missing (which SWMR mode does not allow: every array is
// created by the first append of a sample).
template <typename T>
void append_new_rows(h5::Group& group, const std::string& name, const std::vector<T>& values,
                     const std::vector<int64_t>& shape, const std::string& axes) {
  const auto dims = checked_dims(group, name, values.size(), shape, axes);
  const std::vector<hsize_t> row_shape(dims.begin() + 1, dims.end());
  if (!group.exists(name)) {
    group.create_appendable<T>(name, row_shape, kStepArrays).set_attribute("axes", axes);
  }
  h5::AppendableDataset dataset = group.open_appendable(name);
  const hsize_t stored = dataset.rows();
  if (dataset.row_shape() != row_shape || stored > dims[0]) {
    fail("{}: dataset '{}/{}' holds {} rows of another shape or more rows than the sample's {}", group.file_path(),
         group.path(), name, stored, dims[0]);
  }
  const size_t row_values = static_cast<size_t>(h5::Dataset::element_count(row_shape));
  dataset.append(values.data() + stored * row_values, dims[0] - stored);
}

template <typename T>
void append_new_values(h5::Group& group, const std::string& name, const std::vector<T>& values,
                       const std::string& axes) {
  append_new_rows(group, name, values, {static_cast<int64_t>(values.size())}, axes);
}

// Quantizer and lane names become group names.
void check_group_name(const std::string& file_path, const char* what, const std::string& name) {
  if (name.empty() || name == "." || name.find('/') != std::string::npos) {
    fail("{}: {} name '{}' cannot name an HDF5 group", file_path, what, name);
  }
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

// --- Opening ---

// HDF5 locks a file while it is open; a reader's lock makes a writer's open fail with this message.
bool is_lock_failure(const Error& error) {
  return std::string_view(error.what()).find("unable to lock file") != std::string_view::npos;
}

// `open()`, retried while readers hold the file open (they may read between samples).
template <typename OpenFile>
h5::File open_waiting_for_readers(const std::string& path, OpenFile&& open) {
  const auto deadline = std::chrono::steady_clock::now() + kReaderWait;
  for (;;) {
    try {
      return open();
    } catch (const Error& error) {
      if (!is_lock_failure(error)) throw;
      if (std::chrono::steady_clock::now() >= deadline) {
        fail(
            "{}; another process kept {} open for {} s (readers must close it between samples); close it, then "
            "resume the run",
            error.what(), path, kReaderWait.count());
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

h5::File open_for_writing(const std::string& path) {
  return open_waiting_for_readers(path, [&] { return h5::File::open_read_write(path); });
}

h5::File open_to_resume(const std::string& path) {
  // Not "cannot be resumed; pass --overwrite", which would destroy a log that is only protected.
  if (::access(path.c_str(), W_OK) != 0)
    fail("{} cannot be written ({}): make it writable to resume the run, or name another output", path,
         std::strerror(errno));
  if (!h5::is_hdf5_file(path))
    fail("{} exists and is not an HDF5 file, so not a run log to resume: name another output, or pass --overwrite to "
         "replace it",
         path);
  try {
    try {
      return open_for_writing(path);
    } catch (const Error& error) {
      if (is_lock_failure(error)) throw;
    }
    // A writer killed while it had the file open left it marked as open for writing.
    return open_waiting_for_readers(path, [&] { return h5::File::recover_read_write(path); });
  } catch (const Error& error) {
    if (is_lock_failure(error)) throw;
    fail("{} cannot be resumed: {}; pass --overwrite to replace it", path, error.what());
  }
}

void write_header(h5::File& file, const std::string& resolved_config_yaml, const RunMetadata& metadata) {
  file.set_attribute("schema_version", kSchemaVersion);
  file.set_attribute("kvdrift_version", metadata.tool_version);
  file.set_attribute("git_revision", metadata.git_revision);
  file.set_attribute("created_utc", utc_now());
  file.set_attribute("device", metadata.device);
  file.set_attribute("dtype", metadata.dtype);
  file.set_attribute("gemm", metadata.gemm);
  file.set_attribute("threads", metadata.threads);
  file.set_uint64_attribute("decoding_seed", metadata.decoding_seed);
  file.set_uint64_attribute("weights_seed", metadata.weights_seed);
  file.set_attribute("prompts_sha256", metadata.prompts_sha256);
  file.set_attribute("prefill", prefill_mode_name(metadata.prefill));
  file.set_attribute("prefill_chunk", metadata.prefill_chunk);
  file.set_attribute("complete", 0);
  file.write_string("config/yaml", resolved_config_yaml);
  file.write_string(kMetricTablePath, metric_table_json());

  h5::Group model = file.create_group("model");
  model.set_attribute("path", metadata.model_path);
  model.set_attribute("format", metadata.model_format);
  model.set_attribute("sha256", metadata.model_sha256);
  h5::Group shapes = model.create_group("shapes");
  for (const auto& [name, shape] : metadata.model_shapes) shapes.set_attribute(name, shape);
  h5::Group model_config = model.create_group("config");
  for (const auto& [key, value] : metadata.model_config) model_config.set_attribute(key, value);

  h5::Group quantizers = file.create_group("quantizers");
  for (const std::string& name : metadata.quantizer_names) {
    check_group_name(file.file_path(), "quantizer", name);
    quantizers.create_group(name);
  }
  for (const auto& [name, params] : metadata.quantizer_params) {
    check_group_name(file.file_path(), "quantizer", name);
    h5::Group quantizer = quantizers.require_group(name);
    for (const auto& [key, value] : params) quantizer.set_attribute(key, value);
  }
  file.create_group("samples");
}

void check_resumable(const h5::File& file, const std::string& resolved_config_yaml, const RunMetadata& metadata) {
  const std::string& path = file.file_path();
  if (!file.has_attribute("schema_version") || !file.exists("config/yaml") || !file.exists("samples")) {
    fail("{} is not a kvdrift run log; pass --overwrite to replace it", path);
  }
  const int64_t version = file.attribute<int64_t>("schema_version");
  if (version != kSchemaVersion) {
    fail("{} has run-log schema version {}, this kvdrift writes {}; pass --overwrite to replace it", path, version,
         kSchemaVersion);
  }
  const std::string stored_yaml = file.read_string("config/yaml");
  if (stored_yaml != resolved_config_yaml) {
    fail("{} was written with a different config; pass --overwrite to replace it ({})", path,
         "first difference at " + describe_line_difference(stored_yaml, resolved_config_yaml, "in the file", "now"));
  }
  // The config names the model file; the checksum tells whether that file still holds the same weights.
  const std::string stored_sha256 = file.open_group("model").attribute<std::string>("sha256");
  if (stored_sha256 != metadata.model_sha256) {
    fail("{} was written with a different model (sha256 '{}', now '{}'); pass --overwrite to replace it", path,
         stored_sha256, metadata.model_sha256);
  }
  // The config names a prompt file; the digest tells whether it still gives the same prompts.
  const std::string stored_prompts =
      file.has_attribute("prompts_sha256") ? file.attribute<std::string>("prompts_sha256") : "";
  if (stored_prompts != metadata.prompts_sha256) {
    fail("{} was written with different prompts (sha256 '{}', now '{}': did a prompt file change?); pass --overwrite "
         "to replace it",
         path, stored_prompts, metadata.prompts_sha256);
  }
  // Samples logged by another metric table would mix two meanings under one schema.
  if (file.exists(kMetricTablePath) && file.read_string(kMetricTablePath) != metric_table_json())
    fail("{} was written by a kvdrift that logs other metrics ({} differs); pass --overwrite to replace it", path,
         kMetricTablePath);
}

bool is_complete(const h5::Object& object) {
  return object.has_attribute("complete") && object.attribute<int64_t>("complete") == 1;
}

// The indices of the samples marked complete. Incomplete ones, from a write that was cut short, are deleted.
std::set<int64_t> finished_samples(h5::Group& samples) {
  std::set<int64_t> finished;
  for (const std::string& name : samples.children()) {
    // Decimal, as std::to_string writes it, and short enough for int64.
    const bool is_index = !name.empty() && name.size() < 19 &&
                          std::all_of(name.begin(), name.end(), [](unsigned char c) { return std::isdigit(c); }) &&
                          (name == "0" || name.front() != '0');
    if (!is_index) fail("{}: '{}/{}' is not a sample of a run log", samples.file_path(), samples.path(), name);
    if (is_complete(samples.open_group(name))) {
      finished.insert(std::stoll(name));
    } else {
      samples.remove(name);
    }
  }
  return finished;
}

// The summary, the task scores (analysis/score.py) and the completion mark describe a finished run; a
// resumed or finishing run drops them (finishing rewrites the summary; new samples make scores stale).
void mark_unfinished(h5::File& file) {
  file.set_attribute("complete", 0);
  for (const char* name : {"summary", "scores"})
    if (file.exists(name)) file.remove(name);
}

// Before a log's first change in this process: no longer complete, and the metric table its new
// samples follow (an older log lacks it).
void prepare_for_changes(h5::File& file) {
  mark_unfinished(file);
  if (!file.exists(kMetricTablePath)) file.write_string(kMetricTablePath, metric_table_json());
}

// --- Samples ---

h5::Group lane_group(h5::Group& sample, const LaneResult& lane) {
  check_group_name(sample.file_path(), "quantizer", lane.quantizer);
  return sample.require_group(lane.quantizer + "/" + lane_name(lane.lane));
}

// The arrays that grow while the sample decodes: what the file lacks of them is appended.
void append_step_arrays(h5::Group& sample, const SampleResult& result) {
  append_new_values(sample, "reference_tokens", result.reference_tokens, "step");
  append_new_values(sample, "logged_steps", result.logged_steps, "logged_step");
  for (const LaneResult& lane : result.lanes) {
    h5::Group group = lane_group(sample, lane);
    for (const auto& [name, array] : lane.arrays) {
      const MetricSpec& spec = metric_spec(name);
      KVDRIFT_CHECK(spec.is_array());
      if (spec.grows_along_steps()) append_new_rows(group, name, array.values, array.shape, spec.axes_text());
    }
    if (lane.lane == Lane::FreeRunning) append_new_values(group, "tokens", lane.tokens, "step");
  }
}

// Everything else, known once the sample has finished.
void write_final_contents(h5::Group& sample, const SampleResult& result) {
  sample.set_attribute("reference_text", result.reference_text);
  sample.set_attribute("reference_continuation", result.reference_continuation);
  sample.set_attribute("reference_reply", result.reference_reply);
  sample.set_attribute("reference_stopped", result.reference_stopped ? 1 : 0);
  sample.set_attribute("prefill_seconds", result.prefill_seconds);
  sample.set_attribute("decode_seconds", result.decode_seconds);
  sample.set_attribute("metric_seconds", result.metric_seconds);
  sample.set_attribute("decode_row_steps", result.decode_row_steps);
  sample.set_attribute("batch_prompts", result.batch_prompts);
  for (const LaneResult& lane : result.lanes) {
    h5::Group group = lane_group(sample, lane);
    for (const auto& [name, array] : lane.arrays) {
      const MetricSpec& spec = metric_spec(name);
      if (!spec.grows_along_steps()) write_array(group, name, array.values, array.shape, spec.axes_text());
    }
    for (const auto& [name, value] : lane.scalars) {
      KVDRIFT_CHECK(!metric_spec(name).is_array());
      // "key/quant/worst5_magnitude_share" goes to group key/quant, beside the arrays it summarizes.
      const size_t slash = name.rfind('/');
      if (slash == std::string::npos) {
        group.set_attribute(name, value);
      } else {
        group.require_group(name.substr(0, slash)).set_attribute(name.substr(slash + 1), value);
      }
    }
    if (lane.lane == Lane::FreeRunning) {
      group.set_attribute("first_divergence", lane.first_divergence);
      group.set_attribute("outcome", outcome_name(lane.outcome));
      group.set_attribute("continuation", lane.text);
      group.set_attribute("reply", lane.reply);
    }
  }
}

}  // namespace

RunLog RunLog::open(const std::string& path, const std::string& resolved_config_yaml, const RunMetadata& metadata,
                    bool overwrite) {
  std::error_code error;
  if (overwrite || !std::filesystem::exists(path, error)) {
    h5::File file = open_waiting_for_readers(path, [&] { return h5::File::create(path, overwrite); });
    try {
      write_header(file, resolved_config_yaml, metadata);
      file.close();
    } catch (const Error&) {
      // The header session is too small to reserve for; a file it left half-written holds no sample.
      std::filesystem::remove(path, error);
      throw;
    }
    return RunLog(path, {});
  }
  std::set<int64_t> finished;
  bool complete = false;
  {
    h5::File file = open_to_resume(path);
    check_resumable(file, resolved_config_yaml, metadata);
    h5::Group samples = file.open_group("samples");
    finished = finished_samples(samples);
    complete = is_complete(file);
    file.close();
  }
  RunLog log(path, std::move(finished));
  // Until a sample is written here, the samples already there (with the header) bound what one takes.
  if (!log.finished_.empty()) log.sample_bytes_ = log.file_bytes() / log.finished_.size();
  // A finished run is left as it is until a sample is added: rerunning it changes nothing.
  log.finished_run_ = complete;
  if (complete) return log;
  log.reserve_for(0);
  h5::File file = open_for_writing(path);
  prepare_for_changes(file);
  file.close();
  return log;
}

uint64_t RunLog::file_bytes() const {
  std::error_code error;
  const uintmax_t bytes = std::filesystem::file_size(path_, error);
  if (error) fail("{}: cannot read the file's size: {}", path_, error.message());
  return bytes;
}

void RunLog::reserve_for(size_t samples) const {
  try {
    h5::reserve_space(path_, std::max(kMinReserveBytes, 2 * samples * sample_bytes_));
  } catch (const Error& error) {
    fail("{}; the log is as the last finished sample left it: free some space, then rerun the same command to resume",
         error.what());
  }
}

SampleWriter RunLog::begin_samples(const std::vector<int64_t>& indices, const std::vector<Prompt>& prompts) {
  KVDRIFT_CHECK(indices.size() == prompts.size());
  const uint64_t bytes_before = file_bytes();
  reserve_for(indices.size());
  h5::File file = open_for_writing(path_);
  if (finished_run_) {
    prepare_for_changes(file);
    finished_run_ = false;
  }
  {
    h5::Group samples = file.open_group("samples");
    for (size_t i = 0; i < indices.size(); ++i) {
      if (indices[i] < 0) fail("{}: sample index {} is negative", path_, indices[i]);
      const std::string name = std::to_string(indices[i]);
      if (samples.exists(name)) {
        if (is_complete(samples.open_group(name))) {
          fail("{}: sample {} is already written (is another kvdrift run writing this file?)", path_, indices[i]);
        }
        samples.remove(name);
      }
      const Prompt& prompt = prompts[i];
      h5::Group sample = samples.create_group(name);
      sample.set_attribute("complete", 0);
      sample.set_attribute("prompt_id", prompt.id);
      sample.set_attribute("prompt_text", prompt.text);
      sample.set_attribute("answer", prompt.answer);
      write_array(sample, "prompt_tokens", prompt.tokens, {static_cast<int64_t>(prompt.tokens.size())}, "position");
    }
  }
  file.close();
  return SampleWriter(*this, indices, bytes_before);
}

void RunLog::write_sample(int64_t index, const SampleResult& result) {
  begin_samples({index}, {result.prompt}).finish({result});
}

void SampleWriter::check_count(size_t results) const { KVDRIFT_CHECK(results == indices_.size()); }

void SampleWriter::append(const std::vector<SampleResult>& so_far) {
  check_count(so_far.size());
  const bool first = !live_;
  if (first) {
    log_.reserve_for(indices_.size());
    live_ = open_for_writing(log_.path_);
  }
  for (size_t i = 0; i < indices_.size(); ++i) {
    h5::Group sample = live_->open_group("samples/" + std::to_string(indices_[i]));
    append_step_arrays(sample, so_far[i]);
  }
  // From here on SWMR readers see every flushed row; no object may be created until finish.
  if (first) live_->start_swmr_write();
  live_->flush();
}

void SampleWriter::finish(const std::vector<SampleResult>& results) {
  check_count(results.size());
  auto name = [&](size_t i) { return "samples/" + std::to_string(indices_[i]); };
  if (live_) {
    for (size_t i = 0; i < indices_.size(); ++i) {
      h5::Group sample = live_->open_group(name(i));
      append_step_arrays(sample, results[i]);
    }
    live_->close();
    live_.reset();
  }
  log_.reserve_for(indices_.size());
  h5::File file = open_for_writing(log_.path_);
  for (size_t i = 0; i < indices_.size(); ++i) {
    h5::Group sample = file.open_group(name(i));
    append_step_arrays(sample, results[i]);  // creates them when the sample had no append
    write_final_contents(sample, results[i]);
    file.flush();  // every array is in the file before the mark that says so
    sample.set_attribute("complete", 1);
    log_.finished_.insert(indices_[i]);
  }
  file.close();
  const uint64_t bytes_after = log_.file_bytes();
  if (bytes_after > bytes_before_)
    log_.sample_bytes_ = std::max(log_.sample_bytes_, (bytes_after - bytes_before_) / indices_.size());
}

std::vector<RunSummaryRow> RunLog::finish(const std::vector<std::string>& quantizer_names,
                                          const SummarySettings& settings) {
  for (const std::string& name : quantizer_names) check_group_name(path_, "quantizer", name);
  if (finished_run_) return read_summary_rows(path_, quantizer_names);  // its summary and scores stay
  reserve_for(0);
  h5::File file = open_for_writing(path_);
  std::vector<RunSummaryRow> rows;
  {
    h5::Group samples = file.open_group("samples");
    finished_ = finished_samples(samples);
    mark_unfinished(file);
    h5::Group summary = file.create_group("summary");
    rows = write_summary(samples, finished_, quantizer_names, settings, summary);
    file.flush();  // the summary is in the file before the mark that says the run is complete
    file.set_attribute("complete", 1);
  }
  file.close();
  return rows;
}

}  // namespace kvdrift
