// The HDF5 run log: two hand-made samples written and read back array by array, the summary checked
// against numbers worked out by hand (and by numpy through h5py), and the resume rules: finished
// samples kept, incomplete ones dropped, a killed writer's file recovered, a different config
// refused, --overwrite starting anew, readers opening the file between samples and the writer
// waiting for a reader that holds it open.
#include "run/run_log.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <limits>
#include <thread>

#include "core/error.h"
#include "decode/engine.h"
#include "io/hdf5.h"
#include "metrics/metric_table.h"
#include "support.h"

namespace kvdrift {
namespace {

using test::error_message;
using test::scratch_dir;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const std::string kConfig = R"(model:
  path: synthetic:tiny
prompts:
  source: inline
  texts: [Once upon, The cat]
quantizers:
  - name: int4
    method: rtn
  - name: int2
    method: rtn
output:
  path: run.h5
)";
const std::vector<std::string> kQuantizers = {"int4", "int2"};
constexpr int64_t kLayers = 2;

RunMetadata metadata() {
  RunMetadata metadata;
  metadata.tool_version = "0.1.0";
  metadata.git_revision = "0123456789ab";
  metadata.model_path = "/models/tiny.bin";
  metadata.model_format = "llama2c";
  metadata.model_sha256 = "5e1f";
  metadata.prompts_sha256 = "a1a1";
  metadata.device = "cpu";
  metadata.dtype = "float32";
  metadata.gemm = "packed";
  metadata.threads = 2;
  metadata.model_shapes = {{"tok_embeddings", {512, 64}}, {"n_layers", {2}}};
  metadata.model_config = {{"dim", "64"}, {"n_kv_heads", "4"}};
  metadata.decoding_seed = std::numeric_limits<uint64_t>::max();  // beyond int64
  metadata.weights_seed = 7;
  metadata.quantizer_names = kQuantizers;
  metadata.quantizer_params = {{"int4", {{"bits", "4"}, {"method", "rtn"}}},
                               {"int2", {{"bits", "2"}, {"method", "rtn"}}}};
  return metadata;
}

// One quantizer's numbers in one sample, chosen so that the summary can be worked out by hand.
struct LaneNumbers {
  std::vector<float> kl, top1_agree, logp_delta;         // teacher_forced, per step
  float static_attn_rel_l2, teacher_forced_attn_rel_l2;  // at every logged step and layer
  std::vector<int64_t> tokens;                           // free_running
  int64_t first_divergence;
  Outcome outcome;
  double bits_per_element;               // every lane
  float key_quant_E_T, value_quant_E_T;  // at every position and layer, every lane
};

HostArray filled(std::vector<int64_t> shape, float value) {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return {std::vector<float>(count, value), std::move(shape)};
}

// Distinct values, so that an array written in another's place shows.
HostArray ramp(std::vector<int64_t> shape, float start) {
  HostArray array = filled(std::move(shape), 0);
  for (size_t i = 0; i < array.values.size(); ++i) array.values[i] = start + 0.125f * static_cast<float>(i);
  return array;
}

// The token-scale arrays and accounting scalars the engine gives every lane.
void add_token_scale(LaneResult& lane, int64_t positions, const LaneNumbers& numbers, bool drift) {
  const std::vector<std::string> against_what =
      drift ? std::vector<std::string>{"quant", "drift"} : std::vector<std::string>{"quant"};
  float start = 1;
  for (const std::string role : {"key", "value"}) {
    for (const std::string& against : against_what) {
      const std::string prefix = role + "/" + against;
      const float total = role == "key" ? numbers.key_quant_E_T : numbers.value_quant_E_T;
      lane.arrays[prefix + "/E_T"] =
          against == "quant" ? filled({positions, kLayers}, total) : ramp({positions, kLayers}, start);
      lane.arrays[prefix + "/E_M"] = ramp({positions, kLayers}, start += 10);
      lane.arrays[prefix + "/E_D"] = ramp({positions, kLayers}, start += 10);
      lane.arrays[prefix + "/norm_ratio"] = ramp({positions, kLayers}, start += 10);
    }
    lane.scalars[role + "/quant/worst5_magnitude_share"] = role == "key" ? 0.625 : 0.375;
    lane.scalars[role + "/quant/worst5_magnitude_share_mean_of_ratios"] = role == "key" ? 0.5 : 0.25;
  }
  lane.scalars["bits_per_element"] = numbers.bits_per_element;
  lane.scalars["fraction_quantized"] = 0.5;
}

void add_lanes(SampleResult& sample, const std::string& quantizer, int64_t positions, const LaneNumbers& numbers) {
  const auto logged = static_cast<int64_t>(sample.logged_steps.size());
  LaneResult static_lane{quantizer, Lane::Static};
  static_lane.arrays["attn_rel_l2"] = filled({logged, kLayers}, numbers.static_attn_rel_l2);
  static_lane.arrays["attn_cos"] = ramp({logged, kLayers}, 0.5f);
  add_token_scale(static_lane, positions, numbers, false);

  LaneResult teacher_forced{quantizer, Lane::TeacherForced};
  const auto steps = static_cast<int64_t>(numbers.kl.size());
  teacher_forced.arrays["kl"] = {numbers.kl, {steps}};
  teacher_forced.arrays["top1_agree"] = {numbers.top1_agree, {steps}};
  teacher_forced.arrays["logp_delta"] = {numbers.logp_delta, {steps}};
  teacher_forced.arrays["attn_rel_l2"] = filled({logged, kLayers}, numbers.teacher_forced_attn_rel_l2);
  teacher_forced.arrays["attn_cos"] = ramp({logged, kLayers}, 0.25f);
  add_token_scale(teacher_forced, positions, numbers, true);

  LaneResult free_running{quantizer, Lane::FreeRunning};
  free_running.tokens = numbers.tokens;
  free_running.first_divergence = numbers.first_divergence;
  free_running.outcome = numbers.outcome;
  std::vector<float> match;
  for (size_t s = 0; s < numbers.tokens.size() && s < sample.reference_tokens.size(); ++s) {
    match.push_back(numbers.tokens[s] == sample.reference_tokens[s] ? 1.0f : 0.0f);
  }
  free_running.arrays["match"] = {match, {static_cast<int64_t>(match.size())}};
  add_token_scale(free_running, positions, numbers, true);

  sample.lanes.insert(sample.lanes.end(), {static_lane, teacher_forced, free_running});
}

SampleResult make_sample(int index) {
  SampleResult sample;
  if (index == 0) {
    sample.prompt = {"inline:0", "Once upon", {1, 400, 401}, ""};
    sample.reference_tokens = {10, 11, 12};
    sample.reference_text = "Once upon a time there";
    sample.logged_steps = {0, 2};
    sample.prefill_seconds = 0.5;
    sample.decode_seconds = 1.25;
    sample.decode_row_steps = 21;
    sample.metric_seconds = 0.125;
    add_lanes(
        sample, "int4", 5,
        {{.1f, .2f, .4f}, {1, 1, 0}, {.5f, -.5f, 1}, .1f, .2f, {10, 11, 99}, 2, Outcome::TokenMismatch, 4.0, .25f, .5f});
    add_lanes(sample, "int2", 5,
              {{1, 2, 4}, {1, 0, 0}, {1, 1, 1}, 0.3f, 0.4f, {5, 11, 12}, 0, Outcome::TokenMismatch, 2.0, 1.0f, 2.0f});
  } else {
    sample.prompt = {"inline:1", "The cat", {1, 500}, "42"};
    sample.reference_tokens = {20, 21};
    sample.reference_text = "The cat sat";
    sample.reference_stopped = true;
    sample.logged_steps = {0};
    sample.prefill_seconds = 0.25;
    sample.decode_seconds = 0.75;
    sample.metric_seconds = 0.0625;
    add_lanes(sample, "int4", 3,
              {{0.3f, 0.5f}, {1, 0}, {2.0f, 0.0f}, 0.5f, 0.6f, {20, 21}, 2, Outcome::Identical, 4.5, 0.75f, 1.0f});
    add_lanes(sample, "int2", 3, {{3, 5}, {0, 0}, {3, 3}, 0.7f, 0.8f, {20}, 1, Outcome::LengthOnly, 3.0, 3.0f, 4.0f});
  }
  return sample;
}

// The summary of the two samples, worked out by hand from the numbers above. Step 0 (the shared
// prefill's logits) is left out of the teacher-forced means, percentiles and slopes.
struct ExpectedSummary {
  std::string quantizer;
  double kl_mean, kl_median, kl_p90, kl_p99, final_kl_mean, top1_disagreement_mean, logp_delta_mean, kl_slope;
  double teacher_forced_attn_rel_l2_mean, static_attn_rel_l2_mean;
  double first_divergence_km_median, first_divergence_at_risk, first_divergence_events, first_divergence_censored;
  int64_t identical, token_mismatch, length_only, censored;
  double identical_fraction, bits_per_element_mean, key_quant_E_T_mean, value_quant_E_T_mean;
};

const std::vector<ExpectedSummary> kExpectedSummaries = {
    // kl from step 1 {0.2, 0.4 | 0.5}: p90 = 0.4 + 0.8 * 0.1; top-1 agreement {1, 0 | 0}; logp delta
    // {-0.5, 1 | 0}; the slope within sample 0: 0.2 per step (sample 1 has one step). Attention errors
    // over 2x2 and 1x2 entries; E_T over 3 lanes x (5x2 and 3x2) entries: (30 * 0.25 + 18 * 0.75) / 48.
    // Free running: a mismatch at step 2 and an identical lane seen for 2 steps, censored there and so
    // not at risk at step 2: S(2) = 1 - 1/1 = 0, the median is 2 with one sample at risk.
    {"int4", 1.1 / 3, 0.4, 0.48, 0.498, 0.45, 2.0 / 3, 0.5 / 3, 0.2, (4 * 0.2 + 2 * 0.6) / 6, (4 * 0.1 + 2 * 0.5) / 6,
     2, 1, 1, 1, 1, 1, 0, 0, 0.5, 4.25, 21.0 / 48, 33.0 / 48},
    // kl from step 1 {2, 4 | 5}; top-1 agreement {0, 0 | 0}; logp delta {1, 1 | 3}; slope 2. First
    // divergence: events at 0 and 1, S(0) = 1/2: the median is step 0, both at risk.
    {"int2", 11.0 / 3, 4, 4.8, 4.98, 4.5, 1, 5.0 / 3, 2, (4 * 0.4 + 2 * 0.8) / 6, (4 * 0.3 + 2 * 0.7) / 6, 0, 2, 2, 0,
     0, 1, 1, 0, 0, 2.5, 84.0 / 48, 132.0 / 48},
};

// Creates `path` holding the two samples, finished.
std::vector<RunSummaryRow> write_run(const std::string& path) {
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  log.write_sample(0, make_sample(0));
  log.write_sample(1, make_sample(1));
  return log.finish(kQuantizers);
}

void expect_array(const h5::Group& group, const std::string& name, const HostArray& expected) {
  std::vector<hsize_t> shape;
  EXPECT_EQ(group.read<float>(name, &shape), expected.values) << group.path() << "/" << name;
  EXPECT_EQ(shape, std::vector<hsize_t>(expected.shape.begin(), expected.shape.end())) << group.path() << "/" << name;
}

// Per-step arrays grow along an unlimited first axis; the others are fixed.
void expect_appendable(const h5::Group& group, const std::string& name, bool appendable) {
  if (appendable) {
    EXPECT_NO_THROW(group.open_appendable(name)) << group.path() << "/" << name;
  } else {
    EXPECT_TRUE(contains(error_message([&] { group.open_appendable(name); }), "is not appendable"))
        << group.path() << "/" << name;
  }
}

void expect_sample(const h5::Group& samples, int index) {
  const SampleResult expected = make_sample(index);
  const h5::Group sample = samples.open_group(std::to_string(index));
  EXPECT_EQ(sample.attribute<int64_t>("complete"), 1);
  EXPECT_EQ(sample.attribute<std::string>("prompt_id"), expected.prompt.id);
  EXPECT_EQ(sample.attribute<std::string>("prompt_text"), expected.prompt.text);
  EXPECT_EQ(sample.attribute<std::string>("answer"), expected.prompt.answer);
  EXPECT_EQ(sample.attribute<std::string>("reference_text"), expected.reference_text);
  EXPECT_EQ(sample.attribute<int64_t>("reference_stopped"), expected.reference_stopped ? 1 : 0);
  EXPECT_EQ(sample.attribute<double>("prefill_seconds"), expected.prefill_seconds);
  EXPECT_EQ(sample.attribute<double>("decode_seconds"), expected.decode_seconds);
  EXPECT_EQ(sample.attribute<double>("metric_seconds"), expected.metric_seconds);
  EXPECT_EQ(sample.attribute<int64_t>("decode_row_steps"), expected.decode_row_steps);
  EXPECT_EQ(sample.read<int64_t>("prompt_tokens"), expected.prompt.tokens);
  EXPECT_EQ(sample.read<int64_t>("reference_tokens"), expected.reference_tokens);
  EXPECT_EQ(sample.read<int64_t>("logged_steps"), expected.logged_steps);
  EXPECT_EQ(sample.open_dataset("prompt_tokens").attribute<std::string>("axes"), "position");
  EXPECT_EQ(sample.open_dataset("reference_tokens").attribute<std::string>("axes"), "step");
  expect_appendable(sample, "prompt_tokens", false);
  expect_appendable(sample, "reference_tokens", true);
  expect_appendable(sample, "logged_steps", true);

  for (const LaneResult& lane : expected.lanes) {
    const h5::Group group = sample.open_group(lane.quantizer + "/" + lane_name(lane.lane));
    for (const auto& [name, array] : lane.arrays) {
      expect_array(group, name, array);
      const bool per_step = name == "kl" || name == "top1_agree" || name == "logp_delta" || name == "match" ||
                            name == "attn_rel_l2" || name == "attn_cos";
      expect_appendable(group, name, per_step);
      const h5::Dataset dataset = group.open_dataset(name);
      EXPECT_EQ(dataset.attribute<std::string>("axes"),
                per_step ? (name.rfind("attn_", 0) == 0 ? "logged_step,layer" : "step") : "position,layer")
          << group.path() << "/" << name;
    }
    EXPECT_EQ(group.attribute<double>("bits_per_element"), lane.scalars.at("bits_per_element"));
    EXPECT_EQ(group.attribute<double>("fraction_quantized"), 0.5);
    EXPECT_EQ(group.open_group("key/quant").attribute<double>("worst5_magnitude_share"), 0.625);
    EXPECT_EQ(group.open_group("value/quant").attribute<double>("worst5_magnitude_share"), 0.375);
    if (lane.lane == Lane::FreeRunning) {
      EXPECT_EQ(group.read<int64_t>("tokens"), lane.tokens);
      expect_appendable(group, "tokens", true);
      EXPECT_EQ(group.attribute<int64_t>("first_divergence"), lane.first_divergence);
      EXPECT_EQ(group.attribute<std::string>("outcome"), outcome_name(lane.outcome));
    } else {
      EXPECT_FALSE(group.exists("tokens"));
      EXPECT_FALSE(group.has_attribute("outcome"));
    }
  }
}

void expect_summary(const h5::File& file, const std::vector<RunSummaryRow>& rows) {
  ASSERT_EQ(rows.size(), kExpectedSummaries.size());
  constexpr double kTolerance = 1e-6;  // the inputs are float32
  for (size_t i = 0; i < rows.size(); ++i) {
    const ExpectedSummary& expected = kExpectedSummaries[i];
    SCOPED_TRACE(expected.quantizer);
    EXPECT_EQ(rows[i].quantizer, expected.quantizer);
    EXPECT_NEAR(rows[i].mean_kl, expected.kl_mean, kTolerance);
    EXPECT_NEAR(rows[i].first_divergence_median, expected.first_divergence_km_median, kTolerance);
    EXPECT_NEAR(rows[i].bits_per_element, expected.bits_per_element_mean, kTolerance);

    const h5::Group summary = file.open_group("summary/" + expected.quantizer);
    EXPECT_EQ(summary.attribute<int64_t>("samples"), 2);
    EXPECT_NEAR(summary.attribute<double>("bits_per_element_mean"), expected.bits_per_element_mean, kTolerance);
    EXPECT_NEAR(summary.attribute<double>("key_quant_E_T_mean"), expected.key_quant_E_T_mean, kTolerance);
    EXPECT_NEAR(summary.attribute<double>("value_quant_E_T_mean"), expected.value_quant_E_T_mean, kTolerance);
    EXPECT_EQ(summary.attribute<int64_t>("first_step"), 1);
    EXPECT_EQ(summary.attribute<int64_t>("bootstrap_resamples"), 1000);
    // Teacher-forced minus static attention error: 0.1 at every logged step of both samples.
    EXPECT_NEAR(summary.attribute<double>("attn_gap_mean"), 0.1, kTolerance);
    EXPECT_NEAR(summary.attribute<double>("attn_gap_slope"), 0.0, kTolerance);

    const h5::Group teacher_forced = summary.open_group("teacher_forced");
    EXPECT_EQ(teacher_forced.attribute<int64_t>("samples"), 2);
    EXPECT_NEAR(teacher_forced.attribute<double>("kl_mean"), expected.kl_mean, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("kl_median"), expected.kl_median, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("kl_p90"), expected.kl_p90, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("kl_p99"), expected.kl_p99, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("final_kl_mean"), expected.final_kl_mean, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("top1_disagreement_mean"), expected.top1_disagreement_mean,
                kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("logp_delta_mean"), expected.logp_delta_mean, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("attn_rel_l2_mean"), expected.teacher_forced_attn_rel_l2_mean,
                kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("kl_slope"), expected.kl_slope, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("attn_rel_l2_slope"), 0.0, kTolerance);  // constant per sample
    EXPECT_FALSE(teacher_forced.has_attribute("kl_sampled_mean"));  // greedy decoding
    // Intervals: resampling two prompts, each figure's interval spans the per-sample extremes.
    EXPECT_LE(teacher_forced.attribute<double>("kl_mean_ci_low"), expected.kl_mean);
    EXPECT_GE(teacher_forced.attribute<double>("kl_mean_ci_high"), expected.kl_mean);
    EXPECT_NEAR(teacher_forced.attribute<double>("final_kl_mean_ci_low"), expected.quantizer == "int4" ? 0.4 : 4,
                kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("final_kl_mean_ci_high"), expected.quantizer == "int4" ? 0.5 : 5,
                kTolerance);
    // Worst-5% shares in both definitions, the same in every lane here.
    EXPECT_NEAR(teacher_forced.attribute<double>("key_quant_worst5_magnitude_share_mean"), 0.625, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("key_quant_worst5_magnitude_share_mean_ci_low"), 0.625, kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("key_quant_worst5_magnitude_share_mean_of_ratios_mean"), 0.5,
                kTolerance);
    EXPECT_NEAR(teacher_forced.attribute<double>("value_quant_worst5_magnitude_share_mean_of_ratios_mean"), 0.25,
                kTolerance);

    const h5::Group static_lane = summary.open_group("static");
    EXPECT_EQ(static_lane.attribute<int64_t>("samples"), 2);
    EXPECT_NEAR(static_lane.attribute<double>("attn_rel_l2_mean"), expected.static_attn_rel_l2_mean, kTolerance);

    const h5::Group free_running = summary.open_group("free_running");
    EXPECT_EQ(free_running.attribute<int64_t>("samples"), 2);
    EXPECT_EQ(free_running.attribute<double>("first_divergence_km_median"), expected.first_divergence_km_median);
    EXPECT_EQ(free_running.attribute<double>("first_divergence_at_risk"), expected.first_divergence_at_risk);
    EXPECT_EQ(free_running.attribute<double>("first_divergence_events"), expected.first_divergence_events);
    EXPECT_EQ(free_running.attribute<double>("first_divergence_censored"), expected.first_divergence_censored);
    EXPECT_FALSE(free_running.has_attribute("first_divergence_mean"));
    EXPECT_EQ(free_running.attribute<int64_t>("outcome_identical"), expected.identical);
    EXPECT_EQ(free_running.attribute<int64_t>("outcome_token_mismatch"), expected.token_mismatch);
    EXPECT_EQ(free_running.attribute<int64_t>("outcome_length_only"), expected.length_only);
    EXPECT_EQ(free_running.attribute<int64_t>("outcome_censored"), expected.censored);
    EXPECT_EQ(free_running.attribute<double>("identical_fraction"), expected.identical_fraction);
  }
}

TEST(RunLog, WritesEveryArrayAttributeAndTheSummary) {
  const std::string path = scratch_dir() + "/run.h5";
  const std::vector<RunSummaryRow> rows = write_run(path);

  const h5::File file = h5::File::open_read(path);
  EXPECT_EQ(file.attribute<int64_t>("schema_version"), 1);
  EXPECT_EQ(file.attribute<int64_t>("complete"), 1);
  EXPECT_EQ(file.attribute<std::string>("kvdrift_version"), "0.1.0");
  EXPECT_EQ(file.attribute<std::string>("git_revision"), "0123456789ab");
  const std::string created = file.attribute<std::string>("created_utc");
  EXPECT_EQ(created.size(), 20u) << created;  // 2025-01-31T12:00:00Z
  EXPECT_EQ(created.back(), 'Z') << created;
  EXPECT_EQ(file.attribute<std::string>("device"), "cpu");
  EXPECT_EQ(file.attribute<std::string>("dtype"), "float32");
  EXPECT_EQ(file.attribute<std::string>("gemm"), "packed");
  EXPECT_EQ(file.attribute<int64_t>("threads"), 2);
  EXPECT_EQ(file.attribute<int64_t>("weights_seed"), 7);  // decoding_seed (uint64 max): checked with h5py
  EXPECT_EQ(file.read_string("config/yaml"), kConfig);

  const h5::Group model = file.open_group("model");
  EXPECT_EQ(model.attribute<std::string>("path"), "/models/tiny.bin");
  EXPECT_EQ(model.attribute<std::string>("format"), "llama2c");
  EXPECT_EQ(model.attribute<std::string>("sha256"), "5e1f");
  EXPECT_EQ(model.open_group("shapes").attribute<std::vector<int64_t>>("tok_embeddings"),
            (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(model.open_group("shapes").attribute<std::vector<int64_t>>("n_layers"), std::vector<int64_t>{2});
  EXPECT_EQ(model.open_group("config").attribute<std::string>("n_kv_heads"), "4");
  EXPECT_EQ(file.open_group("quantizers").children(), (std::vector<std::string>{"int2", "int4"}));
  EXPECT_EQ(file.open_group("quantizers/int2").attribute<std::string>("bits"), "2");
  EXPECT_EQ(file.open_group("quantizers/int4").attribute<std::string>("method"), "rtn");

  const h5::Group samples = file.open_group("samples");
  EXPECT_EQ(samples.children(), (std::vector<std::string>{"0", "1"}));
  expect_sample(samples, 0);
  expect_sample(samples, 1);
  expect_summary(file, rows);
}

TEST(RunLog, IsReadableWithH5pyAndItsSummaryMatchesNumpy) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/run.h5";
  write_run(path);
  std::string output;
  EXPECT_EQ(test::run_python(dir, "check", R"(import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], 'r')
assert f.attrs['schema_version'] == 1 and f.attrs['complete'] == 1, dict(f.attrs)
assert f.attrs['decoding_seed'] == 2**64 - 1 and f.attrs['decoding_seed'].dtype == np.uint64
assert f['config/yaml'].asstr()[()].startswith('model:\n')
samples = f['samples']
kl = samples['0/int4/teacher_forced/kl']
assert (kl.dtype, kl.shape, kl.maxshape, kl.compression) == (np.float32, (3,), (None,), 'gzip'), kl
assert kl.attrs['axes'] == 'step'
attention = samples['0/int4/static/attn_rel_l2']
assert (attention.shape, attention.maxshape, attention.attrs['axes']) == ((2, 2), (None, 2), 'logged_step,layer')
scale = samples['1/int2/free_running/key/quant/E_T']
assert (scale.dtype, scale.shape, scale.maxshape) == (np.float32, (3, 2), (3, 2)), scale
assert samples['1/int2/free_running/tokens'].dtype == np.int64
assert samples['0/prompt_tokens'][()].tolist() == [1, 400, 401]
assert samples['1'].attrs['prompt_text'] == 'The cat' and samples['1'].attrs['complete'] == 1
# The metric table: what every lane array and scalar is, as the file's own datasets carry it.
import json
table = {e['name']: e for e in json.loads(f['schema/metrics'].asstr()[()])}
assert table['kl']['axes'] == ['step'] and table['kl']['lanes'] == ['teacher_forced', 'one_step'], table['kl']
assert table['attn_rel_l2']['lanes'] == ['static', 'teacher_forced', 'one_step']
assert table['key/drift/E_M']['axes'] == ['position', 'layer'] and table['key/drift/E_M']['dtype'] == 'float32'
assert table['key/drift/E_M']['lanes'] == ['teacher_forced', 'free_running']
assert table['bits_per_element']['axes'] == [] and table['bits_per_element']['dtype'] == 'float64'
assert table['onset_step_per_layer']['axes'] == ['layer']
# per role: quant 6 + 2 like-for-like shares + 2 norms + 2 counts, drift 6 + 2
assert len(table) == 13 + 2 * (12 + 8), sorted(table)
def check(name, node):
    if isinstance(node, h5py.Dataset) and name.count('/') >= 3 and not name.endswith('/tokens'):
        metric = name.split('/', 3)[3]
        assert node.attrs['axes'] == ','.join(table[metric]['axes']), name
        assert node.dtype == np.dtype(table[metric]['dtype']), name
        assert name.split('/')[2] in table[metric]['lanes'], name
samples.visititems(check)
for quantizer in ('int4', 'int2'):
    # Steps from 1: step 0's logits come from the shared full-precision prefill.
    assert f['summary'][quantizer].attrs['first_step'] == 1 and f.attrs['prefill'] == 'full'
    kl = np.concatenate([samples[i][quantizer]['teacher_forced/kl'][1:] for i in samples]).astype(np.float64)
    summary = f['summary'][quantizer]['teacher_forced'].attrs
    assert summary['kl_mean_ci_low'] <= summary['kl_mean'] <= summary['kl_mean_ci_high']
    assert np.isclose(summary['kl_mean'], kl.mean(), rtol=1e-12, atol=0), (summary['kl_mean'], kl.mean())
    assert np.isclose(summary['kl_median'], np.median(kl), rtol=1e-12, atol=0)
    assert np.isclose(summary['kl_p90'], np.percentile(kl, 90), rtol=1e-12, atol=0)
    assert np.isclose(summary['kl_p99'], np.percentile(kl, 99), rtol=1e-12, atol=0)
print('ok')
)",
                             {path}, &output),
            0)
      << output;
  EXPECT_EQ(output, "ok\n");
}

TEST(RunLog, ResumesKeepingFinishedSamplesAndDroppingIncompleteOnes) {
  const std::string path = scratch_dir() + "/run.h5";
  write_run(path);
  {
    RunLog log = RunLog::open(path, kConfig, metadata(), false);
    EXPECT_TRUE(log.has_sample(0));
    EXPECT_TRUE(log.has_sample(1));
    EXPECT_FALSE(log.has_sample(2));
    const h5::File file = h5::File::open_read(path);
    EXPECT_EQ(file.attribute<int64_t>("complete"), 1);  // a finished run is left as it is until a sample is added
    EXPECT_TRUE(file.exists("summary"));
  }
  {
    RunLog log = RunLog::open(path, kConfig, metadata(), false);
    EXPECT_TRUE(contains(error_message([&] { log.write_sample(0, make_sample(1)); }), "sample 0 is already written"));
    log.write_sample(2, make_sample(1));
    EXPECT_TRUE(log.has_sample(2));
    const h5::File file = h5::File::open_read(path);
    EXPECT_EQ(file.attribute<int64_t>("complete"), 0);  // until this session finishes
    EXPECT_FALSE(file.exists("summary"));
  }
  // As if the writer had died before marking sample 2 complete.
  h5::File::open_read_write(path).open_group("samples/2").set_attribute("complete", 0);

  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  EXPECT_TRUE(log.has_sample(0));
  EXPECT_FALSE(log.has_sample(2));
  EXPECT_EQ(h5::File::open_read(path).open_group("samples").children(), (std::vector<std::string>{"0", "1"}));
  expect_sample(h5::File::open_read(path).open_group("samples"), 0);

  log.write_sample(2, make_sample(0));
  const std::vector<RunSummaryRow> rows = log.finish(kQuantizers);
  const h5::File file = h5::File::open_read(path);
  EXPECT_EQ(file.attribute<int64_t>("complete"), 1);
  EXPECT_EQ(file.open_group("summary/int4").attribute<int64_t>("samples"), 3);
  EXPECT_NEAR(rows[0].mean_kl, (0.2 + 0.4 + 0.5 + 0.2 + 0.4) / 5, 1e-6);  // steps from 1 of samples 0, 1, 0
}

// The summary counts steps from the settings it is given (the run's: a chunked prefill compares step 0
// too), not from the file's attributes, which here record a full prefill.
TEST(RunLog, SummaryCountsStepsFromTheRunsSettings) {
  RunConfig chunked;
  chunked.decoding.prefill = PrefillMode::Chunked;
  chunked.analysis.onset_margin = 3;
  EXPECT_EQ(summary_settings(chunked).first_step, 0);
  EXPECT_EQ(summary_settings(chunked).analysis.onset_margin, 3);
  EXPECT_EQ(summary_settings(RunConfig{}).first_step, 1);

  const std::string path = scratch_dir() + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  log.write_sample(0, make_sample(0));
  log.write_sample(1, make_sample(1));
  const std::vector<RunSummaryRow> rows = log.finish(kQuantizers, summary_settings(chunked));
  // Every step: int4 {0.1, 0.2, 0.4 | 0.3, 0.5}, int2 {1, 2, 4 | 3, 5}.
  EXPECT_NEAR(rows[0].mean_kl, 1.5 / 5, 1e-6);
  EXPECT_NEAR(rows[1].mean_kl, 15.0 / 5, 1e-6);
  const h5::File file = h5::File::open_read(path);
  EXPECT_EQ(file.attribute<std::string>("prefill"), "full");
  EXPECT_EQ(file.open_group("summary/int4").attribute<int64_t>("first_step"), 0);
  EXPECT_EQ(file.open_group("summary/int4").attribute<int64_t>("onset_margin"), 3);
  // Within-sample slopes over steps 0..2 and 0..1, pooled: (0.3 + 0.1) / (2 + 0.5).
  EXPECT_NEAR(file.open_group("summary/int4/teacher_forced").attribute<double>("kl_slope"), 0.16, 1e-6);
}

TEST(RunLog, RecoversTheFileOfAWriterKilledMidSample) {
  const std::string path = scratch_dir() + "/run.h5";
  RunLog::open(path, kConfig, metadata(), false).write_sample(0, make_sample(0));
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The writer: starts sample 1, flushes, and dies with the file open.
    try {
      h5::File file = h5::File::open_read_write(path);
      h5::Group sample = file.create_group("samples/1");
      sample.set_attribute("complete", 0);
      sample.write("prompt_tokens", std::vector<int64_t>{1, 2}, {2});
      file.flush();
      ::_exit(0);
    } catch (...) {
      ::_exit(1);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_TRUE(contains(error_message([&] { h5::File::open_read(path); }), "already open for write"));

  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  EXPECT_TRUE(log.has_sample(0));
  EXPECT_FALSE(log.has_sample(1));
  EXPECT_EQ(h5::File::open_read(path).open_group("samples").children(), std::vector<std::string>{"0"});
  log.write_sample(1, make_sample(1));
  expect_sample(h5::File::open_read(path).open_group("samples"), 1);
}

TEST(RunLog, RefusesAnotherConfigOrModelUnlessOverwriting) {
  const std::string path = scratch_dir() + "/run.h5";
  write_run(path);
  std::string other_config = kConfig;
  other_config.replace(other_config.find("int2"), 4, "int3");
  EXPECT_EQ(error_message([&] { RunLog::open(path, other_config, metadata(), false); }),
            path +
                " was written with a different config; pass --overwrite to replace it (first difference at "
                "line 9: `  - name: int2` in the file, `  - name: int3` now)");
  RunMetadata other_model = metadata();
  other_model.model_sha256 = "77aa";
  EXPECT_EQ(error_message([&] { RunLog::open(path, kConfig, other_model, false); }),
            path + " was written with a different model (sha256 '5e1f', now '77aa'); pass --overwrite to replace it");
  RunMetadata other_prompts = metadata();
  other_prompts.prompts_sha256 = "b0b0";
  EXPECT_EQ(error_message([&] { RunLog::open(path, kConfig, other_prompts, false); }),
            path + " was written with different prompts (sha256 'a1a1', now 'b0b0': did a prompt file change?); pass "
                   "--overwrite to replace it");

  RunLog log = RunLog::open(path, other_config, metadata(), true);
  EXPECT_FALSE(log.has_sample(0));
  const h5::File file = h5::File::open_read(path);
  EXPECT_EQ(file.read_string("config/yaml"), other_config);
  EXPECT_EQ(file.attribute<int64_t>("complete"), 0);
  EXPECT_TRUE(file.open_group("samples").children().empty());
  EXPECT_FALSE(file.exists("summary"));
}

TEST(RunLog, RejectsArraysThatDoNotFitTheirShapeOrTheSchema) {
  const std::string path = scratch_dir() + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  SampleResult sample = make_sample(0);
  HostArray& kl = sample.lanes[1].arrays.at("kl");
  ASSERT_EQ(sample.lanes[1].lane, Lane::TeacherForced);
  kl.shape = {4};
  EXPECT_TRUE(contains(error_message([&] { log.write_sample(0, sample); }),
                       "dataset '/samples/0/int4/teacher_forced/kl': 3 values do not fill shape [4]"));
  kl.shape = {3, 1};
  EXPECT_TRUE(contains(error_message([&] { log.write_sample(0, sample); }),
                       "dataset '/samples/0/int4/teacher_forced/kl': shape [3, 1] does not match the schema's axes "
                       "[step]"));
  EXPECT_FALSE(log.has_sample(0));
  log.write_sample(0, make_sample(0));  // replaces the incomplete group the failures left
  EXPECT_TRUE(log.has_sample(0));
  expect_sample(h5::File::open_read(path).open_group("samples"), 0);
}

// Calling it wrong is a bug in the caller, reported as an internal error naming the invariant and
// where it is checked, not as a problem with the user's input.
TEST(RunLog, MisuseIsAnInternalErrorNamingTheInvariant) {
  const std::string path = scratch_dir() + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  try {
    log.begin_samples({0, 1}, {make_sample(0).prompt});
    ADD_FAILURE() << "no InternalError";
  } catch (const InternalError& error) {
    const std::string message = error.what();
    EXPECT_TRUE(contains(message, "indices.size() == prompts.size() does not hold (")) << message;
    EXPECT_TRUE(contains(message, "src/run/run_log.cpp:")) << message;
  }
}

// The engine reports only what metrics/metric_table.cpp defines: anything else is a bug, not input.
TEST(RunLog, ANameTheMetricTableLacksIsAnInternalError) {
  const std::string path = scratch_dir() + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  SampleResult sample = make_sample(0);
  sample.lanes[1].arrays["probe/extra"] = ramp({2, 3}, -1);
  try {
    log.write_sample(0, sample);
    ADD_FAILURE() << "no InternalError";
  } catch (const InternalError& error) {
    EXPECT_EQ(std::string(error.what()), "the metric table (metrics/metric_table.cpp) has no entry 'probe/extra'");
  }
  sample = make_sample(0);
  sample.lanes[0].scalars["kl"] = 1.0;  // an array's name as a scalar
  EXPECT_THROW(log.write_sample(0, sample), InternalError);
  EXPECT_FALSE(log.has_sample(0));
  log.write_sample(0, make_sample(0));
  expect_sample(h5::File::open_read(path).open_group("samples"), 0);
}

// A log keeps the metric table its samples follow: one written before the table gets it when resumed,
// one written by a kvdrift with other metrics is not extended with samples of these.
TEST(RunLog, ResumingAddsAMissingMetricTableAndRefusesAnotherOne) {
  const std::string path = scratch_dir() + "/run.h5";
  write_run(path);
  h5::File::open_read_write(path).open_group("schema").remove("metrics");
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  EXPECT_FALSE(h5::File::open_read(path).exists("schema/metrics"));  // a finished run is left as it is
  log.write_sample(2, make_sample(0));
  EXPECT_EQ(h5::File::open_read(path).read_string("schema/metrics"), metric_table_json());

  {
    h5::File file = h5::File::open_read_write(path);
    file.open_group("schema").remove("metrics");
    file.write_string("schema/metrics", "[]");
  }
  EXPECT_EQ(error_message([&] { RunLog::open(path, kConfig, metadata(), false); }),
            path + " was written by a kvdrift that logs other metrics (schema/metrics differs); pass --overwrite to "
                   "replace it");
}

// docs/hdf5-schema.md explains every entry of the table.
TEST(MetricTable, TheSchemaPageNamesEveryMetric) {
  const std::string page = test::read_file(std::string(KVDRIFT_SOURCE_DIR) + "/docs/hdf5-schema.md");
  for (const MetricSpec& spec : metric_table()) {
    const std::string last = spec.name.substr(spec.name.rfind('/') + 1);
    EXPECT_TRUE(contains(page, "`" + last + "`") || contains(page, last + "}") || contains(page, last + ","))
        << spec.name;
  }
}

TEST(RunLog, RefusesAFileThatIsNotARunLog) {
  const std::string dir = scratch_dir();
  const std::string text_path = dir + "/notes.txt";
  test::write_file(text_path, "not HDF5\n");
  EXPECT_EQ(error_message([&] { RunLog::open(text_path, kConfig, metadata(), false); }),
            text_path + " exists and is not an HDF5 file, so not a run log to resume: name another output, or pass "
                        "--overwrite to replace it");
  // The HDF5 signature after a 512-byte user block counts; at byte 100 it does not.
  const std::string signature("\x89HDF\r\n\x1a\n", 8);
  test::write_file(dir + "/user_block.h5", std::string(512, '\0') + signature + std::string(100, '\0'));
  test::write_file(dir + "/misplaced.h5", std::string(100, '\0') + signature + std::string(500, '\0'));
  EXPECT_TRUE(h5::is_hdf5_file(dir + "/user_block.h5"));
  EXPECT_FALSE(h5::is_hdf5_file(dir + "/misplaced.h5"));
  EXPECT_FALSE(h5::is_hdf5_file(text_path));
  EXPECT_FALSE(h5::is_hdf5_file(dir + "/absent.h5"));

  const std::string other_path = dir + "/other.h5";
  h5::File::create(other_path, false).write_string("notes", "an HDF5 file of another kind");
  EXPECT_EQ(error_message([&] { RunLog::open(other_path, kConfig, metadata(), false); }),
            other_path + " is not a kvdrift run log; pass --overwrite to replace it");
  EXPECT_FALSE(RunLog::open(other_path, kConfig, metadata(), true).has_sample(0));
  EXPECT_FALSE(h5::File::open_read(other_path).exists("notes"));
}

TEST(RunLog, ReadersOpenTheFileBetweenSamplesAndTheWriterWaitsForThem) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  log.write_sample(0, make_sample(0));
  std::string output;
  EXPECT_EQ(test::run_python(dir, "check", R"(import sys, h5py
with h5py.File(sys.argv[1], 'r') as f:
    print(f.attrs['complete'], [(k, int(g.attrs['complete'])) for k, g in f['samples'].items()])
)",
                             {path}, &output),
            0)
      << output;
  EXPECT_EQ(output, "0 [('0', 1)]\n");

  // A reader holds HDF5's lock on the file (a shared flock) for a second.
  const int reader = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(reader, 0);
  ASSERT_EQ(::flock(reader, LOCK_SH), 0);
  std::thread release([reader] {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    ::close(reader);
  });
  const auto start = std::chrono::steady_clock::now();
  log.write_sample(1, make_sample(1));
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  release.join();
  EXPECT_GE(waited, 0.9);
  EXPECT_TRUE(log.has_sample(1));
}

// The sample's first `steps` steps and `logged` logged steps, as the engine reports them while it
// decodes: per-step arrays and tokens only.
SampleResult prefix_of(const SampleResult& whole, size_t steps, size_t logged) {
  SampleResult partial;
  partial.prompt = whole.prompt;
  partial.reference_tokens.assign(whole.reference_tokens.begin(), whole.reference_tokens.begin() + steps);
  partial.logged_steps.assign(whole.logged_steps.begin(), whole.logged_steps.begin() + logged);
  for (const LaneResult& lane : whole.lanes) {
    LaneResult part{lane.quantizer, lane.lane};
    for (const auto& [name, array] : lane.arrays) {
      const bool per_step = name == "kl" || name == "top1_agree" || name == "logp_delta" || name == "match";
      const bool per_logged_step = name.rfind("attn_", 0) == 0;
      if (!per_step && !per_logged_step) continue;
      const auto rows = static_cast<int64_t>(std::min<size_t>(per_step ? steps : logged, array.shape[0]));
      const size_t row_values = array.values.size() / static_cast<size_t>(std::max<int64_t>(array.shape[0], 1));
      HostArray cut{{array.values.begin(), array.values.begin() + rows * row_values}, array.shape};
      cut.shape[0] = rows;
      part.arrays[name] = cut;
    }
    part.tokens.assign(lane.tokens.begin(), lane.tokens.begin() + std::min(steps, lane.tokens.size()));
    partial.lanes.push_back(part);
  }
  return partial;
}

// While a sample decodes, a SWMR reader sees its rows so far; repeated reports add only new rows; the
// finished sample is the same as one written at once.
TEST(RunLog, ASampleWrittenAsItDecodesIsReadLiveAndEndsWhole) {
  const std::string dir = scratch_dir();
  const std::string path = dir + "/run.h5";
  RunLog log = RunLog::open(path, kConfig, metadata(), false);
  const SampleResult whole = make_sample(0);  // 3 steps, 2 logged steps
  SampleWriter writer = log.begin_samples({0}, {whole.prompt});
  writer.append({prefix_of(whole, 1, 1)});
  writer.append({prefix_of(whole, 2, 1)});
  writer.append({prefix_of(whole, 2, 1)});  // nothing new
  // A reader in another process, as a live reader would be.
  std::string output;
  EXPECT_EQ(test::run_python(dir, "live", R"(import sys, h5py
with h5py.File(sys.argv[1], 'r', swmr=True) as f:
    s = f['samples/0']
    print(s.attrs['complete'], s['reference_tokens'][()].tolist(), s['int2/teacher_forced/kl'][()].tolist(),
          s['int4/static/attn_rel_l2'].shape, s['int4/free_running/tokens'][()].tolist(),
          'int4/teacher_forced/key/quant/E_T' in s)
)",
                             {path}, &output),
            0)
      << output;
  EXPECT_EQ(output, "0 [10, 11] [1.0, 2.0] (1, 2) [10, 11] False\n");
  EXPECT_FALSE(log.has_sample(0));
  writer.finish({whole});
  EXPECT_TRUE(log.has_sample(0));
  log.write_sample(1, make_sample(1));
  const auto rows = log.finish(kQuantizers);
  const h5::File file = h5::File::open_read(path);
  expect_sample(file.open_group("samples"), 0);
  expect_sample(file.open_group("samples"), 1);
  expect_summary(file, rows);
}

}  // namespace
}  // namespace kvdrift
