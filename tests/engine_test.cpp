// The side-by-side engine on stories260K: invariants of the lanes, the caches' policies over a whole
// prompt, and the main job's command line (config errors, HDF5 output, resume after SIGKILL).
#include "decode/engine.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <numeric>
#include <set>

#include "io/hdf5.h"
#include "io/run_config.h"
#include "decode/sampler.h"
#include "model/checkpoint.h"
#include "run/run_inputs.h"
#include "support.h"

namespace kvdrift {
namespace {

struct Run {
  RunConfig config;
  RunInputs inputs;
};

Run load(const std::string& config_path) {
  Run run;
  run.config = load_run_config(config_path, {});
  run.inputs = load_run_inputs(run.config);
  return run;
}

const LaneResult& lane_of(const SampleResult& result, const std::string& quantizer, const std::string& lane) {
  for (const auto& l : result.lanes)
    if (l.quantizer == quantizer && lane_name(l.lane) == lane) return l;
  throw std::runtime_error("no lane " + quantizer + "/" + lane);
}

double max_of(const HostArray& a) { return *std::max_element(a.values.begin(), a.values.end()); }
double mean_of(const HostArray& a) {
  return std::accumulate(a.values.begin(), a.values.end(), 0.0) / static_cast<double>(a.values.size());
}

// `none` lanes see exactly the reference's inputs, so they follow it the whole way (they never read a
// quantized position: LanesFollowTheReferenceUntilTheirOnset) and equal it exactly. The static lane
// computes its attention apart from the forward, over a copy of the reference's cache: float32
// rounding (BLAS rounds by the shapes it is given), held to 1e-5 with room for other CPUs' kernels.
TEST(Engine, NoneLanesEqualTheReference) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir, "  - {name: none, method: none}", 48));
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  ASSERT_EQ(result.reference_tokens.size(), 48u);
  const auto& teacher = lane_of(result, "none", "teacher_forced");
  EXPECT_EQ(max_of(teacher.arrays.at("kl")), 0.0);
  EXPECT_EQ(mean_of(teacher.arrays.at("top1_agree")), 1.0);
  EXPECT_EQ(max_of(teacher.arrays.at("attn_rel_l2")), 0.0);
  EXPECT_EQ(max_of(teacher.arrays.at("key/drift/E_T")), 0.0);
  const auto& free = lane_of(result, "none", "free_running");
  EXPECT_EQ(free.tokens, result.reference_tokens);
  EXPECT_EQ(free.first_divergence, 48);
  EXPECT_EQ(free.outcome, Outcome::Censored);  // equal up to the step limit
  const auto& fixed = lane_of(result, "none", "static");
  EXPECT_LE(max_of(fixed.arrays.at("attn_rel_l2")), 1e-5);
  EXPECT_EQ(max_of(fixed.arrays.at("key/quant/E_T")), 0.0);
  EXPECT_EQ(fixed.scalars.at("bits_per_element"), 16.0);
  // The reference's text is the known-good greedy continuation's prefix style: prompt + 48 tokens.
  EXPECT_EQ(result.reference_text.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u);
}

// The one-step lane (docs/engine.md): its cache holds the reference's keys and values, quantized by
// its method. With `none` it is the reference; with KVarN it reads its first quantized block at the
// step whose new token starts block 2 (tile 16, sink 16: position 32), where its KL equals the
// teacher-forced lane's (nothing quantized was read before, so their caches still agree), and it
// departs from it later, when the teacher-forced lane's own errors feed back through its cache.
TEST(Engine, OneStepLaneReadsTheReferenceCacheAndOnsetsAreLogged) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir,
                                                 "  - {name: none, method: none}\n"
                                                 "  - {name: k2, method: kvarn, params: {preset: k2v2, tile_size: 16}}",
                                                 48));
  run.config.lanes = {Lane::Static, Lane::TeacherForced, Lane::OneStep, Lane::FreeRunning};
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const int64_t n = static_cast<int64_t>(run.inputs.prompts[0].tokens.size());
  ASSERT_LT(n, 32);
  const auto& none = lane_of(result, "none", "one_step");
  EXPECT_LE(max_of(none.arrays.at("kl")), 1e-9);
  EXPECT_EQ(mean_of(none.arrays.at("top1_agree")), 1.0);
  EXPECT_LE(max_of(none.arrays.at("attn_rel_l2")), 1e-5);
  EXPECT_EQ(none.scalars.at("onset_step"), -1.0);
  EXPECT_EQ(max_of(none.arrays.at("fraction_read_quantized")), 0.0);

  const int64_t onset = 33 - n;  // the decode step s feeds position n + s - 1 = 32
  const int64_t layers = 5;
  for (const std::string lane : {"static", "teacher_forced", "one_step", "free_running"}) {
    SCOPED_TRACE(lane);
    const auto& l = lane_of(result, "k2", lane);
    EXPECT_EQ(l.scalars.at("onset_step"), static_cast<double>(onset));
    EXPECT_EQ(l.arrays.at("onset_step_per_layer").values, std::vector<float>(layers, static_cast<float>(onset)));
    const auto& fraction = l.arrays.at("fraction_read_quantized").values;
    ASSERT_EQ(fraction.size(), 48u);
    EXPECT_EQ(fraction[onset - 1], 0.0f);
    EXPECT_FLOAT_EQ(fraction[onset], 16.0f / 33.0f);  // positions 16..31 of 0..32, keys and values alike
  }
  const auto& teacher = lane_of(result, "k2", "teacher_forced").arrays.at("kl").values;
  const auto& one_step = lane_of(result, "k2", "one_step").arrays.at("kl").values;
  ASSERT_EQ(one_step.size(), teacher.size());
  EXPECT_GT(one_step[onset], 0.0f);
  // Equal but for float32 rounding (BLAS rounds a row by its place in the batch).
  EXPECT_NEAR(one_step[onset], teacher[onset], 1e-3 * teacher[onset]);
  int64_t differing = 0;
  for (size_t s = onset + 9; s < teacher.size(); ++s)
    differing += std::abs(one_step[s] - teacher[s]) > 2e-2 * teacher[s];
  EXPECT_GT(differing, 10);
  // Its cache is the reference's quantized by KVarN: the static lane's quantization error exactly.
  const auto& own = lane_of(result, "k2", "one_step").arrays.at("key/quant/E_T").values;
  const auto& fixed = lane_of(result, "k2", "static").arrays.at("key/quant/E_T").values;
  ASSERT_EQ(own.size(), fixed.size());
  for (size_t i = 0; i < own.size(); ++i) EXPECT_NEAR(own[i], fixed[i], 1e-6 * std::abs(fixed[i]) + 1e-12) << i;
  EXPECT_EQ(lane_of(result, "k2", "one_step").arrays.count("key/drift/E_T"), 0u);
  // The worst rows over what was read quantized, per layer; the norms of those rows.
  const auto& per_layer = lane_of(result, "k2", "teacher_forced").arrays.at("key/quant/worst5_relative_share_per_layer");
  EXPECT_EQ(per_layer.shape, (std::vector<int64_t>{layers}));
  for (float share : per_layer.values) {
    EXPECT_GE(share, 0.0f);
    EXPECT_LE(share, 1.0f);
  }
  EXPECT_GT(max_of(lane_of(result, "k2", "teacher_forced").arrays.at("value/quant/norm_max_per_layer")), 0.0);
  EXPECT_EQ(lane_of(result, "k2", "teacher_forced").scalars.at("key/quant/saturated_params"), 0.0);
}

// Until its first quantized read a lane follows its reference (decoding.share_until_onset, the
// default): no row of its own, its metrics those of two equal rows (KL, log-prob delta and attention
// error exactly 0, top-1 agreement and match exactly 1), its tokens the reference's; it forks in the
// forward before its onset step, as a copy of the reference's cache, and costs rows from there on.
// With the setting off every lane has its own row from the prefill on, and its pre-onset values are
// float32 noise (a GEMM rounds a row by its place in the batch): held to 1e-9 / 1e-5 here. Both ways
// give the same onsets and storage; after the onset the same tokens and metrics up to rounding where a
// rounding difference cannot move the method's codes much (none, KIVI: as in
// PromptsOfOneBatchGiveWhatEachGivesAlone), while KVarN's VarN and 4-bit QuaRot may turn one into
// other scales and tokens on another CPU's kernels, so for them only what is exact is compared.
TEST(Engine, LanesFollowTheReferenceUntilTheirOnset) {
  const std::string dir = test::scratch_dir();
  const int64_t steps = 48;
  const std::string quantizers =
      "  - {name: none, method: none}\n"
      "  - {name: kivi, method: kivi, params: {group_size: 8, residual_length: 16}}\n"
      "  - {name: k2, method: kvarn, params: {preset: k2v2, tile_size: 16}}\n"
      "  - {name: quarot, method: quarot, params: {k_bits: 4, v_bits: 4}}";
  auto run = load(test::write_stories260k_config(dir, quantizers, steps));
  run.config.lanes = {Lane::Static, Lane::TeacherForced, Lane::OneStep, Lane::FreeRunning};
  ASSERT_TRUE(run.config.decoding.share_until_onset);
  const auto shared = Engine(*run.inputs.model, run.config, run.inputs.tokenizer.get()).run(run.inputs.prompts[0]);
  run.config.decoding.share_until_onset = false;
  const auto own_rows = Engine(*run.inputs.model, run.config, run.inputs.tokenizer.get()).run(run.inputs.prompts[0]);
  const int64_t n = static_cast<int64_t>(run.inputs.prompts[0].tokens.size());

  EXPECT_EQ(shared.reference_tokens, own_rows.reference_tokens);
  // KIVI first quantizes keys at position 16, KVarN's second tile starts at 32, QuaRot quantizes every token.
  const std::map<std::string, int64_t> onsets = {{"none", -1}, {"kivi", 17 - n}, {"k2", 33 - n}, {"quarot", 1}};
  const std::set<std::string> rounding_robust = {"none", "kivi"};
  int64_t row_steps = steps - 1;  // the reference's decode forwards
  for (const auto& [quantizer, onset] : onsets) {
    for (const std::string kind : {"teacher_forced", "one_step", "free_running"}) {
      SCOPED_TRACE(quantizer + "/" + kind);
      const LaneResult& lane = lane_of(shared, quantizer, kind);
      const LaneResult& own = lane_of(own_rows, quantizer, kind);
      EXPECT_EQ(lane.scalars.at("onset_step"), static_cast<double>(onset));
      EXPECT_EQ(own.scalars.at("onset_step"), static_cast<double>(onset));
      if (rounding_robust.count(quantizer)) EXPECT_EQ(lane.tokens, own.tokens);
      EXPECT_EQ(lane.scalars.at("bits_per_element"), own.scalars.at("bits_per_element"));
      EXPECT_EQ(lane.arrays.at("fraction_read_quantized").values, own.arrays.at("fraction_read_quantized").values);
      row_steps += onset < 0 ? 0 : steps - onset;
      const int64_t before = onset < 0 ? steps : onset;  // steps whose logits read nothing quantized
      if (kind == "free_running") {
        for (int64_t s = 0; s < before; ++s) EXPECT_EQ(lane.arrays.at("match").values[s], 1.0f) << s;
        continue;
      }
      for (int64_t s = 0; s < before; ++s) {
        EXPECT_EQ(lane.arrays.at("kl").values[s], 0.0f) << s;
        EXPECT_EQ(lane.arrays.at("logp_delta").values[s], 0.0f) << s;
        EXPECT_EQ(lane.arrays.at("top1_agree").values[s], 1.0f) << s;
        EXPECT_LE(own.arrays.at("kl").values[s], 1e-9) << s;
      }
      // [decode forwards, layers]: row i is the forward that gives step i + 1's logits.
      const auto& rel_l2 = lane.arrays.at("attn_rel_l2");
      ASSERT_EQ(rel_l2.shape[0], steps - 1);
      for (int64_t i = 0; i < (before - 1) * rel_l2.shape[1]; ++i) {
        EXPECT_EQ(rel_l2.values[i], 0.0f) << i;
        EXPECT_LE(own.arrays.at("attn_rel_l2").values[i], 1e-5) << i;
      }
      if (onset < 0) continue;
      const auto& kl = lane.arrays.at("kl").values;
      const auto& own_kl = own.arrays.at("kl").values;
      double mean = 0, own_mean = 0;
      for (int64_t s = onset; s < steps; ++s) {
        mean += kl[s];
        own_mean += own_kl[s];
      }
      EXPECT_GT(mean, 0.0);
      if (rounding_robust.count(quantizer)) EXPECT_NEAR(mean, own_mean, 0.02 * own_mean);
    }
  }
  EXPECT_EQ(shared.decode_row_steps, row_steps);
  EXPECT_EQ(own_rows.decode_row_steps, 13 * (steps - 1));  // 1 + 4 quantizers x 3 lanes, every forward
  // A lane that never forked holds its reference's cache: no drift at all (with its own row: noise).
  const LaneResult& none = lane_of(shared, "none", "teacher_forced");
  EXPECT_EQ(max_of(none.arrays.at("key/drift/E_T")), 0.0);
  EXPECT_EQ(none.arrays.at("key/drift/E_T").shape, (std::vector<int64_t>{n + steps - 1, 5}));
  EXPECT_EQ(none.arrays.at("key/drift/E_T").shape,
            lane_of(own_rows, "none", "teacher_forced").arrays.at("key/drift/E_T").shape);
  EXPECT_EQ(none.scalars.at("bits_per_element"), 16.0);
}

TEST(Engine, KVarN8BitDriftsALittleAndTwoBitMore) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir,
                               "  - {name: k8, method: kvarn, params: {k_bits: 8, v_bits: 8, tile_size: 8}}\n"
                               "  - {name: k2, method: kvarn, params: {preset: k2v2, tile_size: 8}}",
                               64));
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const double kl8 = mean_of(lane_of(result, "k8", "teacher_forced").arrays.at("kl"));
  const double kl2 = mean_of(lane_of(result, "k2", "teacher_forced").arrays.at("kl"));
  EXPECT_GT(kl8, 0.0);
  EXPECT_LT(kl8, 1e-3);
  EXPECT_GT(kl2, 10 * kl8);
  // Token-scale identity on every logged position and layer.
  const auto& lane = lane_of(result, "k2", "teacher_forced");
  for (const std::string role : {"key", "value"}) {
    const auto& m = lane.arrays.at(role + "/quant/E_M").values;
    const auto& d = lane.arrays.at(role + "/quant/E_D").values;
    const auto& t = lane.arrays.at(role + "/quant/E_T").values;
    for (size_t i = 0; i < t.size(); ++i) EXPECT_NEAR(m[i] + d[i], t[i], 1e-5 * t[i] + 1e-9) << role << " " << i;
  }
}

// At layer 0 a teacher-forced lane sees exactly the reference's inputs, so its attention error there
// is the static lane's; deeper, its own earlier errors feed back and it departs from the static lane,
// whose cache is always a quantized copy of the reference's.
TEST(Engine, StaticLaneDoesNotAccumulateTeacherForcedDoes) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir, "  - {name: q2, method: quarot, params: {k_bits: 2, v_bits: 2}}", 64));
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const auto& fixed = lane_of(result, "q2", "static").arrays.at("attn_rel_l2");
  const auto& teacher = lane_of(result, "q2", "teacher_forced").arrays.at("attn_rel_l2");
  ASSERT_EQ(fixed.shape, teacher.shape);
  const int64_t steps = fixed.shape[0], layers = fixed.shape[1];
  double deeper_gap = 0;
  for (int64_t s = 0; s < steps; ++s) {
    EXPECT_NEAR(teacher.values[s * layers], fixed.values[s * layers], 1e-4) << "layer 0, step " << s;
    for (int64_t l = 1; l < layers; ++l)
      deeper_gap += std::abs(teacher.values[s * layers + l] - fixed.values[s * layers + l]);
  }
  EXPECT_GT(deeper_gap / static_cast<double>(steps * (layers - 1)), 1e-3);
}

// A long prompt goes through the caches under each method's own policy; decode steps then flush one
// step at a time. Counts are those of SPEC §2 at the last decode position t = n + steps - 2.
TEST(Engine, WholePromptGoesThroughTheQuantizedCache) {
  const std::string dir = test::scratch_dir();
  const std::string text =
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
      "a big, red ball. She wanted to play with it, but it was too high. Lily's mom said, \"Lily, let's go to the "
      "park.\" Lily was sad and didn't know what to do.";
  auto run = load(test::write_stories260k_config(dir,
                               "  - {name: kivi, method: kivi, params: {group_size: 8, residual_length: 16}}\n"
                               "  - {name: kvarn, method: kvarn, params: {tile_size: 16}}",
                               9, "\n    - >-\n      " + text));
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const int64_t n = static_cast<int64_t>(run.inputs.prompts[0].tokens.size());
  ASSERT_GT(n, 40);
  const int64_t length = n + 8;  // 9 steps: 8 decode forwards after the prefill
  const int64_t t = length - 1;  // position of the last decode step
  const double kivi_expected = static_cast<double>(t / 16 * 16 + std::max<int64_t>(0, t - 16)) / (2.0 * length);
  const double kvarn_expected = static_cast<double>(2 * std::max<int64_t>(0, t / 16 * 16 - 16)) / (2.0 * length);
  for (const std::string lane : {"teacher_forced", "free_running"}) {
    EXPECT_DOUBLE_EQ(lane_of(result, "kivi", lane).scalars.at("fraction_quantized"), kivi_expected) << lane;
    EXPECT_DOUBLE_EQ(lane_of(result, "kvarn", lane).scalars.at("fraction_quantized"), kvarn_expected) << lane;
  }
  EXPECT_EQ(lane_of(result, "kivi", "teacher_forced").arrays.at("kl").shape, (std::vector<int64_t>{9}));
}

// Lanes that end leave the batch: a free-running lane at its end token, the reference and its
// teacher-forced lanes at the reference's. The decode forwards then cost exactly the rows still
// decoding, each lane's cache holds the prompt and the tokens it fed, and a lane's results do not
// depend on which other lanes ran beside it (kivi alone gives the same tokens).
TEST(Engine, EndedLanesLeaveTheBatch) {
  const std::string dir = test::scratch_dir();
  const std::string quantizers =
      "  - {name: none, method: none}\n"
      "  - {name: kivi, method: kivi, params: {group_size: 8, k_bits: 2, v_bits: 2}}\n"
      "  - {name: quarot, method: quarot, params: {k_bits: 2, v_bits: 2}}";
  auto run = load(test::write_stories260k_config(dir, quantizers, 400));
  run.config.decoding.stop_at_eos = true;
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const int64_t n = static_cast<int64_t>(run.inputs.prompts[0].tokens.size());
  const int64_t reference_length = static_cast<int64_t>(result.reference_tokens.size());

  std::set<int64_t> lengths = {reference_length};
  // The reference decodes every step; a lane from the forward before its onset (it follows its
  // reference until then: LanesFollowTheReferenceUntilTheirOnset), never if it has none.
  const auto forwards = [](const LaneResult& lane, int64_t length) {
    const auto onset = static_cast<int64_t>(lane.scalars.at("onset_step"));
    return onset < 0 ? 0 : length - std::max<int64_t>(onset, 1);
  };
  int64_t expected_row_steps = reference_length - 1;
  for (const std::string quantizer : {"none", "kivi", "quarot"}) {
    const auto& free = lane_of(result, quantizer, "free_running");
    const int64_t free_length = static_cast<int64_t>(free.tokens.size());
    lengths.insert(free_length);
    const auto& teacher = lane_of(result, quantizer, "teacher_forced");
    expected_row_steps += forwards(free, free_length) + forwards(teacher, reference_length);
    EXPECT_EQ(teacher.arrays.at("key/quant/E_T").shape, (std::vector<int64_t>{n + reference_length - 1, 5}));
    EXPECT_EQ(free.arrays.at("value/quant/E_T").shape, (std::vector<int64_t>{n + free_length - 1, 5}));
    EXPECT_EQ(free.arrays.at("key/drift/E_T").shape,
              (std::vector<int64_t>{n + std::min(free_length, reference_length) - 1, 5}));
  }
  ASSERT_GE(lengths.size(), 2u) << "every lane ran to the same length; the test needs one that ends early";
  EXPECT_EQ(result.decode_row_steps, expected_row_steps);
  EXPECT_LT(result.decode_row_steps, 7 * (*lengths.rbegin() - 1));  // what keeping every row would cost
  EXPECT_EQ(lane_of(result, "none", "free_running").tokens, result.reference_tokens);

  auto kivi_alone =
      load(test::write_stories260k_config(dir, "  - {name: kivi, method: kivi, params: {group_size: 8, k_bits: 2, v_bits: 2}}", 400));
  kivi_alone.config.decoding.stop_at_eos = true;
  const auto alone = Engine(*kivi_alone.inputs.model, kivi_alone.config, kivi_alone.inputs.tokenizer.get())
                         .run(kivi_alone.inputs.prompts[0]);
  EXPECT_EQ(lane_of(alone, "kivi", "free_running").tokens, lane_of(result, "kivi", "free_running").tokens);
  EXPECT_EQ(alone.reference_tokens, result.reference_tokens);
}

// Prompts of different lengths sharing a batch (decoding.batch_prompts) give each what it gives
// alone: the same tokens in every lane, the same lanes' ends, logged steps and row-steps, the same
// storage, and the float metrics up to float32 rounding (a GEMM rounds a row by its place in the
// batch; a rounding difference may flip a KIVI code here and there). Lanes end at different steps in
// different prompts, so rows leave a batch that still runs. No KVarN here: VarN keeps the best of its
// iterates per tile, so a rounding difference can change a whole tile's scales and, over 300 free
// steps, a token (docs/engine.md).
TEST(Engine, PromptsOfOneBatchGiveWhatEachGivesAlone) {
  const std::string dir = test::scratch_dir();
  const std::string quantizers =
      "  - {name: none, method: none}\n"
      "  - {name: kivi, method: kivi, params: {group_size: 8, residual_length: 16}}";
  const std::string prompts =
      "[\"Once upon a time\", \"Lily and Ben were playing in the park with a big red ball when\", \"The cat\"]";
  auto run = load(test::write_stories260k_config(dir, quantizers, 300, prompts));
  run.config.decoding.stop_at_eos = true;
  run.config.metrics.layer_stride = 3;
  const auto& all = run.inputs.prompts;
  ASSERT_EQ(all.size(), 3u);
  ASSERT_NE(all[0].tokens.size(), all[1].tokens.size());
  ASSERT_NE(all[1].tokens.size(), all[2].tokens.size());
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto batch = engine.run(all);
  ASSERT_EQ(batch.size(), 3u);

  std::set<size_t> reference_lengths;
  for (size_t p = 0; p < all.size(); ++p) {
    const SampleResult alone = engine.run(all[p]);
    const SampleResult& together = batch[p];
    SCOPED_TRACE("prompt " + std::to_string(p));
    EXPECT_EQ(together.batch_prompts, 3);
    EXPECT_EQ(together.prompt.id, all[p].id);
    EXPECT_EQ(together.reference_tokens, alone.reference_tokens);
    EXPECT_EQ(together.reference_text, alone.reference_text);
    EXPECT_EQ(together.reference_stopped, alone.reference_stopped);
    EXPECT_EQ(together.logged_steps, alone.logged_steps);
    EXPECT_EQ(together.decode_row_steps, alone.decode_row_steps);
    reference_lengths.insert(together.reference_tokens.size());
    ASSERT_EQ(together.lanes.size(), alone.lanes.size());
    for (size_t l = 0; l < alone.lanes.size(); ++l) {
      const LaneResult& a = alone.lanes[l];
      const LaneResult& b = together.lanes[l];
      SCOPED_TRACE(a.quantizer + "/" + lane_name(a.lane));
      EXPECT_EQ(b.tokens, a.tokens);
      EXPECT_EQ(b.first_divergence, a.first_divergence);
      EXPECT_EQ(b.outcome, a.outcome);
      EXPECT_EQ(b.text, a.text);
      EXPECT_DOUBLE_EQ(b.scalars.at("bits_per_element"), a.scalars.at("bits_per_element"));
      EXPECT_DOUBLE_EQ(b.scalars.at("fraction_quantized"), a.scalars.at("fraction_quantized"));
      ASSERT_EQ(b.arrays.size(), a.arrays.size());
      for (const auto& [name, expected] : a.arrays) {
        const HostArray& got = b.arrays.at(name);
        ASSERT_EQ(got.shape, expected.shape) << name;
        // `none` lanes hold float32 rounding noise around 0 (attention error ~1e-7, log-prob deltas
        // ~1e-6) whose value depends on which BLAS kernel ran and on the batch's padded span: every
        // element is held to an absolute bound. Quantized lanes: a rounding difference can flip a
        // 2-bit code, and a flipped code shifts every later step's metrics a little (LibTorch 2.12 on
        // an AMD EPYC: 78% of KIVI's KL elements within 0.1%, the mean within 1%), so most elements
        // are held to 5% and the mean to 2%.
        const bool noise = a.quantizer == "none";
        const double absolute = noise ? 1e-4 : 1e-6;
        const double relative = noise ? 1e-3 : 5e-2;
        // NaN (a per-layer share of a layer that read nothing quantized) must be NaN in both.
        size_t close = 0;
        double mean_alone = 0, mean_together = 0;
        for (size_t i = 0; i < expected.values.size(); ++i) {
          if (std::isnan(expected.values[i]) || std::isnan(got.values[i])) {
            close += std::isnan(expected.values[i]) && std::isnan(got.values[i]);
            continue;
          }
          close += std::abs(got.values[i] - expected.values[i]) <= absolute + relative * std::abs(expected.values[i]);
          mean_alone += expected.values[i] / static_cast<double>(expected.values.size());
          mean_together += got.values[i] / static_cast<double>(expected.values.size());
        }
        const double total = static_cast<double>(expected.values.size());
        if (noise) {
          EXPECT_EQ(close, expected.values.size()) << name;
          continue;
        }
        EXPECT_GE(static_cast<double>(close), 0.9 * total) << name;
        EXPECT_NEAR(mean_together, mean_alone, 0.02 * std::abs(mean_alone) + 1e-6) << name;
      }
    }
  }
  EXPECT_EQ(reference_lengths.size(), 3u) << "the references should end at different steps";
}

// From BOS, the reference is stories260K's known-good greedy output (200 tokens after BOS, as run.c),
// and so is the `none` free-running lane's text. Progress reports carry the sample so far: every report's
// per-step arrays are prefixes of the final ones, and each names every array the sample will have.
TEST(Engine, ProgressShowsTheSampleSoFarAndTextsAreTheKnownGoodOutput) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(
      dir, "  - {name: none, method: none}\n  - {name: kivi, method: kivi, params: {group_size: 8}}", 200, "[\"\"]"));
  run.config.output.flush_seconds = 1e-6;  // a report after every step
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  std::vector<SampleResult> reports;
  const auto result = engine
                          .run({run.inputs.prompts[0]},
                               [&](const std::vector<SampleResult>& so_far) { reports.push_back(so_far.at(0)); })
                          .at(0);

  const std::string expected = test::read_file(test::stories260k_dir() + "/expected_greedy_200steps.txt");
  EXPECT_EQ(result.reference_text, expected);
  const std::string continuation = result.reference_continuation;
  EXPECT_EQ(continuation.substr(continuation.find_first_not_of(' ')), expected);
  EXPECT_EQ(lane_of(result, "none", "free_running").text, continuation);
  EXPECT_NE(lane_of(result, "kivi", "free_running").text, "");

  ASSERT_GE(reports.size(), 190u);  // one per step, give or take the clock's resolution
  size_t previous = 0;
  for (const auto& so_far : reports) {
    ASSERT_EQ(so_far.lanes.size(), result.lanes.size());
    const size_t steps = so_far.reference_tokens.size();
    EXPECT_GT(steps, previous);
    previous = steps;
    EXPECT_TRUE(
        std::equal(so_far.reference_tokens.begin(), so_far.reference_tokens.end(), result.reference_tokens.begin()));
    for (size_t l = 0; l < so_far.lanes.size(); ++l) {
      const auto& partial = so_far.lanes[l];
      const auto& whole = result.lanes[l];
      for (const auto& [name, array] : partial.arrays) {
        const auto& final_array = whole.arrays.at(name);
        ASSERT_EQ(array.shape.size(), final_array.shape.size()) << name;
        EXPECT_LE(array.shape[0], final_array.shape[0]) << name;
        EXPECT_TRUE(std::equal(array.values.begin(), array.values.end(), final_array.values.begin())) << name;
      }
      if (partial.lane == Lane::TeacherForced) EXPECT_EQ(partial.arrays.at("kl").shape[0], static_cast<int64_t>(steps));
      if (partial.lane == Lane::FreeRunning) EXPECT_EQ(partial.tokens.size(), steps);
      EXPECT_EQ(partial.arrays.count("key/quant/E_T"), 0u);  // token-scale arrays come with the result
    }
  }
}

// Decoding past the end token (stop_at_eos: false) keeps measuring, but the reply a user is shown
// ends there: it is the continuation a run that stops at the end token gets.
TEST(Engine, ReplyEndsAtTheFirstEndTokenWhenDecodingGoesOn) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir, "  - {name: none, method: none}", 300, "[\"The cat\"]"));
  ASSERT_FALSE(run.config.decoding.stop_at_eos);
  const Engine going_on(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto past = going_on.run(run.inputs.prompts[0]);
  run.config.decoding.stop_at_eos = true;
  const Engine stopping(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto stopped = stopping.run(run.inputs.prompts[0]);
  ASSERT_TRUE(stopped.reference_stopped) << "the story should end within 300 tokens";
  ASSERT_EQ(past.reference_tokens.size(), 300u);
  EXPECT_EQ(past.reference_reply, stopped.reference_continuation);
  EXPECT_EQ(stopped.reference_reply, stopped.reference_continuation);
  EXPECT_LT(past.reference_reply.size(), past.reference_continuation.size());
  EXPECT_EQ(lane_of(past, "none", "free_running").reply, stopped.reference_continuation);
}

// --- The decoding protocol: chunked prefill, one-token prompts, KL under sampling (docs/engine.md) ---

const char* kLongPrompt =
    "\"Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
    "saw a big, red ball. She wanted to play with it, but it was too high.\"";

TEST(Protocol, ChunkedPrefillWithoutQuantizationEqualsTheFullPrefill) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir, "  - {name: none, method: none}", 24,
                               fmt::format("[{}, \"The cat\"]", kLongPrompt)));
  ASSERT_GT(run.inputs.prompts[0].tokens.size(), 48u);
  const Engine full(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto full_results = full.run(run.inputs.prompts);
  RunConfig chunked_config = run.config;
  chunked_config.decoding.prefill = PrefillMode::Chunked;
  chunked_config.decoding.prefill_chunk = 16;
  const Engine chunked(*run.inputs.model, chunked_config, run.inputs.tokenizer.get());
  const auto chunked_results = chunked.run(run.inputs.prompts);  // the short prompt ends in the first chunk
  for (size_t p = 0; p < 2; ++p) {
    SCOPED_TRACE("prompt " + std::to_string(p));
    EXPECT_EQ(chunked_results[p].reference_tokens, full_results[p].reference_tokens);
    const auto& kl = lane_of(chunked_results[p], "none", "teacher_forced").arrays.at("kl");
    EXPECT_LE(max_of(kl), 1e-9);
    EXPECT_EQ(lane_of(chunked_results[p], "none", "free_running").tokens, full_results[p].reference_tokens);
    EXPECT_EQ(lane_of(chunked_results[p], "none", "teacher_forced").arrays.count("kl_sampled"), 0u);  // greedy
  }
}

// In chunked mode the prompt's later chunks read the earlier ones quantized, so the first generated
// token's distribution already differs; the full prefill reads the prompt in full precision.
TEST(Protocol, ChunkedPrefillCarriesQuantizationErrorIntoStepZero) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir,
                               "  - {name: kvarn, method: kvarn, params: {preset: k2v2, tile_size: 16}}\n"
                               "  - {name: quarot, method: quarot, params: {k_bits: 2, v_bits: 2}}",
                               8, fmt::format("[{}, \"Lily and Ben were playing in the park\"]", kLongPrompt)));
  const Engine full(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  RunConfig chunked_config = run.config;
  chunked_config.decoding.prefill = PrefillMode::Chunked;
  chunked_config.decoding.prefill_chunk = 16;
  const Engine chunked(*run.inputs.model, chunked_config, run.inputs.tokenizer.get());
  const auto full_results = full.run(run.inputs.prompts);
  const auto chunked_results = chunked.run(run.inputs.prompts);
  const auto alone = chunked.run(run.inputs.prompts[0]);
  for (const std::string quantizer : {"kvarn", "quarot"}) {
    SCOPED_TRACE(quantizer);
    const double full_step0 = lane_of(full_results[0], quantizer, "teacher_forced").arrays.at("kl").values[0];
    const double chunked_step0 = lane_of(chunked_results[0], quantizer, "teacher_forced").arrays.at("kl").values[0];
    EXPECT_LE(full_step0, 1e-9);
    EXPECT_GT(chunked_step0, 1e-4);
    // Both modes end with the same blocks quantized.
    for (const std::string lane : {"static", "teacher_forced", "free_running"})
      EXPECT_DOUBLE_EQ(lane_of(chunked_results[0], quantizer, lane).scalars.at("fraction_quantized"),
                       lane_of(full_results[0], quantizer, lane).scalars.at("fraction_quantized"))
          << lane;
    // A prompt that ended in an earlier chunk of the batch does not change the long one. Batched and
    // alone differ by float rounding, which can flip a 2-bit code on another CPU's BLAS kernels (see
    // PromptsOfOneBatchGiveWhatEachGivesAlone): held to 5%, far below the chunked/full gap above.
    const double alone_step0 = lane_of(alone, quantizer, "teacher_forced").arrays.at("kl").values[0];
    EXPECT_NEAR(chunked_step0, alone_step0, 5e-2 * alone_step0);
  }
  EXPECT_EQ(chunked_results[0].reference_tokens, full_results[0].reference_tokens);
}

// A prompt of one token (BOS only) is a prefill like any other: QuaRot does not quantize it before
// the first token's logits.
TEST(Protocol, AOneTokenPromptIsAPrefill) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(dir, "  - {name: quarot, method: quarot, params: {k_bits: 2, v_bits: 2}}", 4, "[\"\"]"));
  ASSERT_EQ(run.inputs.prompts[0].tokens.size(), 1u);
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const auto& kl = lane_of(result, "quarot", "teacher_forced").arrays.at("kl").values;
  EXPECT_LE(kl[0], 1e-9);  // before the fix: 0.0045, the prompt quantized as a decode step
  EXPECT_GT(kl[1], 1e-4);  // the first decode step quantizes, its own token included
}

TEST(Protocol, SamplingDistributionAndItsKL) {
  // Logits (2 ln 3, 0) at T = 2: softmax(ln 3, 0) = (3/4, 1/4). Uniform against it:
  // KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
  const SamplingConfig tempered{2.0, 1.0, 0, 0};
  const auto q = sampling_distribution(torch::tensor({2 * std::log(3.0f), 0.0f}), tempered);
  EXPECT_EQ(q.ids, (std::vector<int64_t>{0, 1}));
  EXPECT_NEAR(q.probs[0], 0.75, 1e-6);
  const auto p = sampling_distribution(torch::tensor({1.0f, 1.0f}), tempered);
  EXPECT_EQ(p.ids, (std::vector<int64_t>{0, 1}));  // ties by increasing id
  EXPECT_NEAR(kl_divergence(p, q, 2), 0.5 * std::log(4.0 / 3.0), 1e-6);
  EXPECT_EQ(kl_divergence(p, p, 2), 0.0);
  // top_p 0.7 keeps only the 3/4 token of q; p = (1/2, 1/2) needs both, so p keeps a token q cuts.
  const SamplingConfig nucleus{2.0, 0.7, 0, 0};
  const auto cut = sampling_distribution(torch::tensor({2 * std::log(3.0f), 0.0f}), nucleus);
  EXPECT_EQ(cut.ids, (std::vector<int64_t>{0}));
  EXPECT_EQ(cut.probs, (std::vector<double>{1.0}));
  EXPECT_TRUE(std::isinf(kl_divergence(p, cut, 2)));
  EXPECT_NEAR(kl_divergence(cut, p, 2), std::log(2.0), 1e-12);
  EXPECT_TRUE(tempered.reshapes_distribution());
  EXPECT_FALSE((SamplingConfig{1.0, 1.0, 0, 0}.reshapes_distribution()));
  EXPECT_FALSE((SamplingConfig{0.0, 1.0, 0, 0}.reshapes_distribution()));
}

TEST(Protocol, SampledRunsLogTheKLOfTheDistributionsSampledFrom) {
  const std::string dir = test::scratch_dir();
  auto run = load(test::write_stories260k_config(
      dir, "  - {name: none, method: none}\n  - {name: kvarn, method: kvarn, params: {preset: k2v2, tile_size: 8}}", 32));
  run.config.decoding.temperature = 0.7;
  run.config.decoding.seed = 3;
  const Engine engine(*run.inputs.model, run.config, run.inputs.tokenizer.get());
  const auto result = engine.run(run.inputs.prompts[0]);
  const auto& none = lane_of(result, "none", "teacher_forced").arrays;
  const auto& kvarn = lane_of(result, "kvarn", "teacher_forced").arrays;
  ASSERT_EQ(kvarn.at("kl_sampled").shape, kvarn.at("kl").shape);
  EXPECT_LE(max_of(none.at("kl_sampled")), 1e-6);
  // Sharper distributions (T < 1) diverge more where the lanes disagree: the tempered KL is not the KL.
  double differs = 0;
  for (size_t i = 0; i < kvarn.at("kl").values.size(); ++i) {
    EXPECT_TRUE(std::isfinite(kvarn.at("kl_sampled").values[i])) << i;  // no cut: every token kept
    differs += std::abs(kvarn.at("kl_sampled").values[i] - kvarn.at("kl").values[i]);
  }
  EXPECT_GT(differs, 1e-3);
}

TEST(Protocol, BadPrefillAndSinkSettingsNameTheKey) {
  const std::string dir = test::scratch_dir();
  const std::string path =
      test::write_stories260k_config(dir, "  - {name: k, method: kivi, params: {group_size: 8, sink_tokens: 100000}}", 4);
  EXPECT_EQ(test::error_message([&] { load_run_config(path, {"decoding.prefill_chunk=0"}); }),
            "--set decoding.prefill_chunk=0: decoding.prefill_chunk must be >= 1");
  const std::string unknown = test::error_message([&] { load_run_config(path, {"decoding.prefill=partial"}); });
  EXPECT_NE(unknown.find("unknown prefill mode 'partial' (known: full, chunked)"), std::string::npos) << unknown;
  auto run = load(path);
  EXPECT_EQ(test::error_message([&] { Engine(*run.inputs.model, run.config, run.inputs.tokenizer.get()); }),
            path + ":11: quantizers 'k': its full-precision sink of 100000 tokens is larger than the model's context "
                   "of 512 positions");
  run.config.quantizers[0].params.erase("sink_tokens");
  run.config.decoding.prefill = PrefillMode::Chunked;
  run.config.decoding.prefill_chunk = 513;
  EXPECT_EQ(test::error_message([&] { Engine(*run.inputs.model, run.config, run.inputs.tokenizer.get()); }),
            path + ": decoding.prefill_chunk = 513 is larger than the model's context of 512 positions");
}

}  // namespace
}  // namespace kvdrift
