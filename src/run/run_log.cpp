#include "run/run_log.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <limits>
#include <string_view>
#include <thread>

#include "core/error.h"
#include "core/line_difference.h"
#include "metrics/sample_result.h"
#include "io/hdf5.h"
#include "metrics/metric_table.h"
#include "metrics/statistics.h"

namespace kvdrift {

namespace {

constexpr int64_t kSchemaVersion = 1;  // docs/hdf5-schema.md; bump on any incompatible change
constexpr int kGzipLevel = 4;
// Per-step arrays: 256 steps per chunk keeps chunks few for typical runs (max_new_tokens 256).
const h5::AppendableOptions kStepArrays{256, kGzipLevel, true};
// How long a write waits for readers holding the file open before giving up.
constexpr std::chrono::seconds kReaderWait{60};
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
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

// The rows `kvdrift run` prints, read back from a finished log's /summary.
std::vector<RunSummaryRow> summary_rows(const std::string& path, const std::vector<std::string>& quantizer_names) {
  const h5::File file = h5::File::open_read(path);
  std::vector<RunSummaryRow> rows;
  for (const std::string& name : quantizer_names) {
    check_group_name(path, "quantizer", name);
    const h5::Group summary = file.open_group("summary/" + name);
    const auto lane_value = [&](Lane lane, const char* attribute) {
      const char* lane_group = lane_name(lane);
      return summary.exists(lane_group) ? summary.open_group(lane_group).attribute<double>(attribute) : kNaN;
    };
    rows.push_back({name, lane_value(Lane::TeacherForced, "kl_mean"),
                    lane_value(Lane::FreeRunning, "first_divergence_km_median"),
                    summary.attribute<double>("bits_per_element_mean")});
  }
  return rows;
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

// --- Summary ---
//
// Per quantizer and lane, over the finished samples (docs/hdf5-schema.md): means pooled over steps,
// slopes per step, the Kaplan–Meier median of the first divergence, and for every figure that
// compares methods a 95% percentile bootstrap interval over samples (prompts are the independent
// units; steps of one sample are not). Means start at `first_step`: with a full-precision prefill,
// step 0's logits come from the shared prefill and cannot differ.

constexpr int64_t kBootstrapResamples = 1000;
constexpr uint64_t kBootstrapSeed = 0;
constexpr double kBootstrapLevel = 0.95;

using Weights = std::vector<double>;

class Mean {
 public:
  void add(double value) {
    sum_ += value;
    ++count_;
  }
  void add_all(const std::vector<float>& values) {
    for (float value : values) add(value);
  }
  double value() const { return count_ > 0 ? sum_ / static_cast<double>(count_) : kNaN; }

 private:
  double sum_ = 0;
  int64_t count_ = 0;
};

void add_array_if_present(Mean& mean, const h5::Group& lane, const std::string& name) {
  if (lane.exists(name)) mean.add_all(lane.read<float>(name));
}

// One quantity per sample as (x, y) points: a mean pools the y of every point of the drawn samples;
// a slope fits y against x (step) within samples (least squares with each sample's own level
// removed), so prompts that differ in level but not in growth show no slope.
struct PerSample {
  std::vector<stats::LineSums> samples;

  stats::LineSums& next() { return samples.emplace_back(); }
  stats::LineSums merged(const Weights& weights) const {
    stats::LineSums all;
    for (size_t i = 0; i < samples.size(); ++i)
      if (weights[i] > 0) all.add(samples[i], weights[i]);
    return all;
  }
  double mean(const Weights& weights) const { return merged(weights).mean_y(); }
  double slope(const Weights& weights) const {
    double sxy = 0, sxx = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      const stats::LineSums& s = samples[i];
      if (weights[i] == 0 || s.n < 2) continue;
      sxy += weights[i] * (s.sxy - s.sx * s.sy / s.n);
      sxx += weights[i] * (s.sxx - s.sx * s.sx / s.n);
    }
    return sxx > 1e-12 ? sxy / sxx : kNaN;
  }
  int64_t count() const { return static_cast<int64_t>(samples.size()); }
};

// `name` = the statistic on every sample, and `name`_ci_low / _ci_high its bootstrap interval.
void set_with_interval(h5::Group& group, const std::string& name, int64_t samples,
                       const std::function<double(const Weights&)>& statistic) {
  group.set_attribute(name, samples > 0 ? statistic(Weights(samples, 1.0)) : kNaN);
  const stats::Interval interval = samples > 0
                                       ? stats::bootstrap(samples, statistic, kBootstrapResamples, kBootstrapSeed,
                                                          kBootstrapLevel)
                                       : stats::Interval{kNaN, kNaN};
  group.set_attribute(name + "_ci_low", interval.low);
  group.set_attribute(name + "_ci_high", interval.high);
}

void set_mean_with_interval(h5::Group& group, const std::string& name, const PerSample& values) {
  set_with_interval(group, name, values.count(), [&](const Weights& w) { return values.mean(w); });
}

void set_slope_with_interval(h5::Group& group, const std::string& name, const PerSample& values) {
  set_with_interval(group, name, values.count(), [&](const Weights& w) { return values.slope(w); });
}

// Per logged step of a lane: its attention-output error, mean over layers (none when not logged).
std::vector<double> attention_by_step(const h5::Group& lane) {
  if (!lane.exists(metric::attn_rel_l2)) return {};
  std::vector<hsize_t> shape;
  const std::vector<float> values = lane.read<float>(metric::attn_rel_l2, &shape);
  std::vector<double> means;
  if (shape.size() != 2 || shape[1] == 0) return means;
  for (hsize_t step = 0; step < shape[0]; ++step) {
    double sum = 0;
    for (hsize_t layer = 0; layer < shape[1]; ++layer) sum += values[step * shape[1] + layer];
    means.push_back(sum / static_cast<double>(shape[1]));
  }
  return means;
}

// One sample's values per logged step as (step, value) points, from step `from` on.
void add_by_step(stats::LineSums& sample, const std::vector<double>& by_step, const std::vector<int64_t>& logged_steps,
                 int64_t from = 0) {
  for (size_t i = 0; i < by_step.size() && i < logged_steps.size(); ++i)
    if (logged_steps[i] >= from) sample.add(static_cast<double>(logged_steps[i]), by_step[i]);
}

// Growth after the onset (docs/hdf5-schema.md): a lane's values from `onset_margin` steps after its
// first quantized read, in samples that have at least `min_steps` such steps.
struct PostOnset {
  AnalysisSettings settings;

  // The first step counted, or -1 where the lane never read anything quantized (a log without onsets
  // counts nothing either).
  int64_t first(const h5::Group& lane) const {
    if (!lane.has_attribute(metric::onset_step)) return -1;
    const double onset = lane.attribute<double>(metric::onset_step);
    return onset < 0 ? -1 : static_cast<int64_t>(onset) + settings.onset_margin;
  }
  // (step, value) points of `values` (one per step) from `from` on, when there are enough of them.
  stats::LineSums points(const std::vector<double>& values, int64_t from) const {
    stats::LineSums sums;
    if (from < 0 || static_cast<int64_t>(values.size()) - from < settings.min_post_onset_steps) return sums;
    for (size_t step = static_cast<size_t>(from); step < values.size(); ++step)
      sums.add(static_cast<double>(step), values[step]);
    return sums;
  }
};

std::vector<double> widened(const std::vector<float>& values) { return {values.begin(), values.end()}; }

// Samples whose PerSample entry has points (those that qualified for a post-onset slope).
int64_t with_points(const PerSample& values) {
  return std::count_if(values.samples.begin(), values.samples.end(), [](const stats::LineSums& s) { return s.n > 0; });
}

// Per sample, per role: the worst-5% magnitude share of what attention reads, in both definitions
// (docs/hdf5-schema.md).
struct Worst5Shares {
  std::map<std::string, PerSample> worst5;

  void add(const h5::Group& lane) {
    for (const char* role : {"key", "value"}) {
      const std::string group = metric::token_scale_group(role, "quant");
      if (!lane.exists(group)) continue;
      const h5::Group quant = lane.open_group(group);
      for (const char* name : metric::worst5_shares)
        if (quant.has_attribute(name))
          worst5[fmt::format("{}_quant_{}_mean", role, name)].next().add(0, quant.attribute<double>(name));
    }
  }
  void write(h5::Group& group) const {
    for (const auto& [name, values] : worst5) {
      if (name.find("mean_of_ratios") == std::string::npos) {
        set_mean_with_interval(group, name, values);
      } else {
        group.set_attribute(name, values.mean(Weights(values.count(), 1.0)));
      }
    }
  }
};

struct StaticTotals {
  Worst5Shares worst5;
  PerSample attn_rel_l2;  // (logged step, error)

  void add(const h5::Group& lane, const std::vector<int64_t>& logged_steps) {
    worst5.add(lane);
    add_by_step(attn_rel_l2.next(), attention_by_step(lane), logged_steps);
  }
  void write(h5::Group& group) const {
    set_mean_with_interval(group, "attn_rel_l2_mean", attn_rel_l2);
    set_slope_with_interval(group, "attn_rel_l2_slope", attn_rel_l2);
    worst5.write(group);
  }
};

// The teacher-forced lane, and the one-step lane (the same arrays).
struct TeacherForcedTotals {
  Worst5Shares worst5;
  int64_t first_step = 1;
  PostOnset post_onset;
  std::vector<double> kl;  // every compared step of every sample, for percentiles
  PerSample kl_by_step, final_kl, top1_disagreement, logp_delta, attn_rel_l2, kl_sampled;
  PerSample post_onset_kl, post_onset_attn_rel_l2;
  Mean kl_sampled_infinite;
  bool has_kl_sampled = false;

  void add(const h5::Group& lane, const std::vector<int64_t>& logged_steps) {
    worst5.add(lane);
    const std::vector<float> sample_kl = lane.read<float>(metric::kl);
    const std::vector<float> agree = lane.read<float>(metric::top1_agree);
    const std::vector<float> delta = lane.read<float>(metric::logp_delta);
    stats::LineSums &kl_sample = kl_by_step.next(), &agree_sample = top1_disagreement.next(),
                    &delta_sample = logp_delta.next(), &final_sample = final_kl.next();
    for (size_t step = static_cast<size_t>(first_step); step < sample_kl.size(); ++step) {
      kl.push_back(sample_kl[step]);
      kl_sample.add(static_cast<double>(step), sample_kl[step]);
      agree_sample.add(static_cast<double>(step), 1.0 - agree[step]);
      delta_sample.add(static_cast<double>(step), delta[step]);
    }
    if (sample_kl.size() > static_cast<size_t>(first_step)) final_sample.add(0, sample_kl.back());
    if (lane.exists(metric::kl_sampled)) {
      has_kl_sampled = true;
      stats::LineSums& sampled = kl_sampled.next();
      const std::vector<float> values = lane.read<float>(metric::kl_sampled);
      for (size_t step = static_cast<size_t>(first_step); step < values.size(); ++step) {
        kl_sampled_infinite.add(std::isinf(values[step]) ? 1.0 : 0.0);
        sampled.add(static_cast<double>(step), values[step]);  // LineSums skips the infinite ones
      }
    }
    add_by_step(attn_rel_l2.next(), attention_by_step(lane), logged_steps);
    const int64_t from = post_onset.first(lane);
    post_onset_kl.samples.push_back(post_onset.points(widened(sample_kl), from));
    stats::LineSums& attention = post_onset_attn_rel_l2.next();
    const auto logged_after = std::count_if(logged_steps.begin(), logged_steps.end(), [&](int64_t s) { return s >= from; });
    if (from >= 0 && static_cast<int64_t>(sample_kl.size()) - from >= post_onset.settings.min_post_onset_steps &&
        logged_after >= 2)
      add_by_step(attention, attention_by_step(lane), logged_steps, from);
  }
  void write(h5::Group& group) const {
    set_slope_with_interval(group, "post_onset_kl_slope", post_onset_kl);
    set_slope_with_interval(group, "post_onset_attn_rel_l2_slope", post_onset_attn_rel_l2);
    group.set_attribute("post_onset_samples", with_points(post_onset_kl));
    set_mean_with_interval(group, "kl_mean", kl_by_step);
    group.set_attribute("kl_median", stats::percentile(kl, 50));
    group.set_attribute("kl_p90", stats::percentile(kl, 90));
    group.set_attribute("kl_p99", stats::percentile(kl, 99));
    set_mean_with_interval(group, "final_kl_mean", final_kl);
    set_mean_with_interval(group, "top1_disagreement_mean", top1_disagreement);
    group.set_attribute("logp_delta_mean", logp_delta.mean(Weights(logp_delta.count(), 1.0)));
    set_slope_with_interval(group, "kl_slope", kl_by_step);
    set_mean_with_interval(group, "attn_rel_l2_mean", attn_rel_l2);
    set_slope_with_interval(group, "attn_rel_l2_slope", attn_rel_l2);
    if (has_kl_sampled) {
      set_mean_with_interval(group, "kl_sampled_mean", kl_sampled);
      group.set_attribute("kl_sampled_infinite_fraction", kl_sampled_infinite.value());
    }
    worst5.write(group);
  }
};

struct FreeRunningTotals {
  Worst5Shares worst5;
  // Kaplan–Meier: a token mismatch or a length difference is a divergence at first_divergence; an
  // identical or censored lane was seen not to diverge for first_divergence steps.
  std::vector<double> times;
  std::vector<bool> diverged;
  // Every class the spec names is counted, even when no sample falls in it.
  std::map<Outcome, int64_t> outcomes = {
      {Outcome::Identical, 0}, {Outcome::TokenMismatch, 0}, {Outcome::LengthOnly, 0}, {Outcome::Censored, 0}};

  void add(const h5::Group& lane, const std::vector<int64_t>&) {
    worst5.add(lane);
    const std::string text = lane.attribute<std::string>("outcome");
    const std::optional<Outcome> outcome = parse_enum(kOutcomeNames, text);
    if (!outcome) fail("{}: '{}' has an unknown outcome '{}'", lane.file_path(), lane.path(), text);
    times.push_back(static_cast<double>(lane.attribute<int64_t>("first_divergence")));
    diverged.push_back(*outcome == Outcome::TokenMismatch || *outcome == Outcome::LengthOnly);
    ++outcomes[*outcome];
  }
  void write(h5::Group& group) const {
    const stats::Survival survival = stats::kaplan_meier(times, diverged);
    set_with_interval(group, "first_divergence_km_median", static_cast<int64_t>(times.size()),
                      [&](const Weights& w) { return stats::kaplan_meier(times, diverged, w).median; });
    group.set_attribute("first_divergence_at_risk", survival.at_risk_at_median);
    group.set_attribute("first_divergence_events", survival.events);
    group.set_attribute("first_divergence_censored", survival.censored);
    for (const auto& [outcome, count] : outcomes)
      group.set_attribute(std::string("outcome_") + outcome_name(outcome), count);
    group.set_attribute("identical_fraction",
                        static_cast<double>(outcomes.at(Outcome::Identical)) / static_cast<double>(times.size()));
    worst5.write(group);
  }
};

// One quantizer's totals over the finished samples, read back from the file.
class QuantizerTotals {
 public:
  QuantizerTotals(int64_t first_step, const AnalysisSettings& settings) : post_onset_{settings} {
    for (auto* lane : {&teacher_forced_, &one_step_}) {
      lane->totals.first_step = first_step;
      lane->totals.post_onset = post_onset_;
    }
  }

  void add(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    ++samples_;
    add_lane(quantizer, Lane::Static, static_, logged_steps);
    add_lane(quantizer, Lane::TeacherForced, teacher_forced_, logged_steps);
    add_lane(quantizer, Lane::OneStep, one_step_, logged_steps);
    add_lane(quantizer, Lane::FreeRunning, free_running_, logged_steps);
    add_gap(quantizer, logged_steps);
    add_accumulation(quantizer, logged_steps);
  }

  RunSummaryRow write(h5::Group group, const std::string& name) const {
    group.set_attribute("samples", samples_);
    group.set_attribute("first_step", teacher_forced_.totals.first_step);
    group.set_attribute("bootstrap_resamples", kBootstrapResamples);
    group.set_attribute("bootstrap_seed", static_cast<int64_t>(kBootstrapSeed));
    group.set_attribute("bootstrap_level", kBootstrapLevel);
    group.set_attribute("bits_per_element_mean", bits_per_element_.value());
    group.set_attribute("key_quant_E_T_mean", key_quant_E_T_.value());
    group.set_attribute("value_quant_E_T_mean", value_quant_E_T_.value());
    group.set_attribute("onset_margin", post_onset_.settings.onset_margin);
    group.set_attribute("min_post_onset_steps", post_onset_.settings.min_post_onset_steps);
    if (gap_.count() > 0) {
      set_mean_with_interval(group, "attn_gap_mean", gap_);
      set_slope_with_interval(group, "attn_gap_slope", gap_);
    }
    write_accumulation(group);
    write_lane(group, Lane::Static, static_);
    write_lane(group, Lane::TeacherForced, teacher_forced_);
    write_lane(group, Lane::OneStep, one_step_);
    write_lane(group, Lane::FreeRunning, free_running_);
    const auto& tf = teacher_forced_.totals;
    return {name, tf.kl_by_step.mean(Weights(tf.kl_by_step.count(), 1.0)),
            stats::kaplan_meier(free_running_.totals.times, free_running_.totals.diverged).median,
            bits_per_element_.value()};
  }

 private:
  template <typename Totals>
  struct LaneTotals {
    int64_t samples = 0;
    Totals totals;
  };

  template <typename Totals>
  void add_lane(const h5::Group& quantizer, Lane kind, LaneTotals<Totals>& lane_totals,
                const std::vector<int64_t>& logged_steps) {
    const char* name = lane_name(kind);
    if (!quantizer.exists(name)) return;
    const h5::Group lane = quantizer.open_group(name);
    ++lane_totals.samples;
    lane_totals.totals.add(lane, logged_steps);
    // Accounting, from every lane.
    if (lane.has_attribute("bits_per_element")) bits_per_element_.add(lane.attribute<double>("bits_per_element"));
    add_array_if_present(key_quant_E_T_, lane, "key/quant/E_T");
    add_array_if_present(value_quant_E_T_, lane, "value/quant/E_T");
  }

  // Teacher-forced minus static attention error at the same logged steps: what earlier errors add.
  void add_gap(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    const char* static_lane = lane_name(Lane::Static);
    const char* teacher_lane = lane_name(Lane::TeacherForced);
    if (!quantizer.exists(fmt::format("{}/{}", static_lane, metric::attn_rel_l2)) ||
        !quantizer.exists(fmt::format("{}/{}", teacher_lane, metric::attn_rel_l2)))
      return;
    const std::vector<double> static_error = attention_by_step(quantizer.open_group(static_lane));
    const std::vector<double> teacher_error = attention_by_step(quantizer.open_group(teacher_lane));
    std::vector<double> gap(std::min(static_error.size(), teacher_error.size()));
    for (size_t i = 0; i < gap.size(); ++i) gap[i] = teacher_error[i] - static_error[i];
    add_by_step(gap_.next(), gap, logged_steps);
  }

  // Teacher-forced against one-step, per sample: their mean KL and attention error over the compared
  // steps (the ratio says how much accumulation across steps adds to one step's propagation), and the
  // TF - one-step KL gap per step after the onset (its slope: does that part grow?).
  void add_accumulation(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    const char* teacher_lane = lane_name(Lane::TeacherForced);
    const char* one_step_lane = lane_name(Lane::OneStep);
    if (!quantizer.exists(teacher_lane) || !quantizer.exists(one_step_lane)) return;
    const h5::Group teacher = quantizer.open_group(teacher_lane), one_step = quantizer.open_group(one_step_lane);
    const std::vector<float> teacher_kl = teacher.read<float>(metric::kl), one_step_kl = one_step.read<float>(metric::kl);
    const int64_t first_step = teacher_forced_.totals.first_step;
    stats::LineSums &teacher_mean = accumulation_kl_[0].next(), &one_step_mean = accumulation_kl_[1].next();
    std::vector<double> gap(std::min(teacher_kl.size(), one_step_kl.size()));
    for (size_t step = 0; step < gap.size(); ++step) {
      gap[step] = static_cast<double>(teacher_kl[step]) - one_step_kl[step];
      if (static_cast<int64_t>(step) < first_step) continue;
      teacher_mean.add(static_cast<double>(step), teacher_kl[step]);
      one_step_mean.add(static_cast<double>(step), one_step_kl[step]);
    }
    post_onset_gap_.samples.push_back(post_onset_.points(gap, post_onset_.first(teacher)));
    add_by_step(accumulation_attention_[0].next(), attention_by_step(teacher), logged_steps);
    add_by_step(accumulation_attention_[1].next(), attention_by_step(one_step), logged_steps);
  }

  void write_accumulation(h5::Group& group) const {
    if (accumulation_kl_[0].count() == 0) return;
    const auto ratio = [](const std::array<PerSample, 2>& pair) {
      return [&pair](const Weights& w) { return pair[0].mean(w) / pair[1].mean(w); };
    };
    set_with_interval(group, "tf_over_one_step_kl_ratio", accumulation_kl_[0].count(), ratio(accumulation_kl_));
    set_with_interval(group, "tf_over_one_step_attn_rel_l2_ratio", accumulation_attention_[0].count(),
                      ratio(accumulation_attention_));
    set_slope_with_interval(group, "post_onset_tf_minus_one_step_kl_slope", post_onset_gap_);
    group.set_attribute("post_onset_gap_samples", with_points(post_onset_gap_));
  }

  template <typename Totals>
  static void write_lane(h5::Group& group, Lane kind, const LaneTotals<Totals>& lane_totals) {
    if (lane_totals.samples == 0) return;
    h5::Group lane = group.create_group(lane_name(kind));
    lane.set_attribute("samples", lane_totals.samples);
    lane_totals.totals.write(lane);
  }

  int64_t samples_ = 0;
  Mean bits_per_element_, key_quant_E_T_, value_quant_E_T_;
  PerSample gap_;
  LaneTotals<StaticTotals> static_;
  LaneTotals<TeacherForcedTotals> teacher_forced_, one_step_;
  PostOnset post_onset_;
  std::array<PerSample, 2> accumulation_kl_, accumulation_attention_;  // teacher-forced, one-step
  PerSample post_onset_gap_;
  LaneTotals<FreeRunningTotals> free_running_;
};

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
                                          const AnalysisSettings& analysis) {
  if (finished_run_) return summary_rows(path_, quantizer_names);  // its summary and scores stay
  reserve_for(0);
  h5::File file = open_for_writing(path_);
  std::vector<RunSummaryRow> rows;
  {
    h5::Group samples = file.open_group("samples");
    finished_ = finished_samples(samples);
    mark_unfinished(file);
    h5::Group summary = file.create_group("summary");
    // A chunked prefill runs the prompt through the quantized caches, so step 0 can differ too.
    const bool chunked = file.has_attribute("prefill") &&
                         file.attribute<std::string>("prefill") == prefill_mode_name(PrefillMode::Chunked);
    const int64_t first_step = chunked ? 0 : 1;
    for (const std::string& name : quantizer_names) {
      check_group_name(path_, "quantizer", name);
      QuantizerTotals totals(first_step, analysis);
      for (int64_t index : finished_) {
        const h5::Group sample = samples.open_group(std::to_string(index));
        if (!sample.exists(name)) continue;
        const std::vector<int64_t> logged_steps =
            sample.exists("logged_steps") ? sample.read<int64_t>("logged_steps") : std::vector<int64_t>{};
        totals.add(sample.open_group(name), logged_steps);
      }
      rows.push_back(totals.write(summary.create_group(name), name));
    }
    file.flush();  // the summary is in the file before the mark that says the run is complete
    file.set_attribute("complete", 1);
  }
  file.close();
  return rows;
}

}  // namespace kvdrift
