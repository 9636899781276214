// `kvdrift run` through the real command line: shipped configs, bad configs, the HDF5 log read back
// with h5py, resume after SIGKILL, and a live run read by a SWMR reader (then killed mid-sample).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/hdf5.h"
#include "run/run_log.h"
#include "support.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

std::string small_config(const std::string& dir, const std::string& extra = "", int steps = 24) {
  const std::string model = test::stories260k_dir();
  const std::string path = dir + "/run.yaml";
  test::write_file(path, fmt::format(R"(model:
  path: {0}/stories260K.bin
  tokenizer: {0}/tok512.bin
prompts:
  source: inline
  texts: ["Once upon a time, there was a little girl named Lily.", "One day, a boy named Tim went to the park.",
          "The sun was shining and the birds were singing."]
decoding:
  max_new_tokens: {1}
  stop_at_eos: false
quantizers:
  - {{name: kivi-2bit, method: kivi, params: {{group_size: 8, residual_length: 16}}}}
  - {{name: kvarn-k2v2, method: kvarn, params: {{preset: k2v2, tile_size: 8}}}}
output:
  path: {2}/run.h5
{3})",
                                     model, steps, dir, extra));
  return path;
}

bool complete(const std::string& path) {
  if (!fs::exists(path)) return false;
  // A SWMR read also opens a file whose writer was killed mid-sample (a plain open refuses it). One
  // killed while it had the file open outside SWMR mode (between samples) opens only for recovery,
  // which a resume does: not complete.
  try {
    return h5::File::open_read(path, /*swmr_read=*/true).attribute<int64_t>("complete") == 1;
  } catch (const Error& error) {
    if (std::string(error.what()).find("not already open for SWMR writing") != std::string::npos) return false;
    throw;
  }
}

// Each config runs on the model it names: SmolLM2 where the config says so (the demo), stories260K
// for the others (which name it as their small stand-in).
TEST(RunCli, ShippedConfigsRun) {
  const std::string dir = test::scratch_dir();
  const std::string model = test::stories260k_dir();
  for (const auto& entry : fs::directory_iterator(fs::path(KVDRIFT_SOURCE_DIR) / "configs")) {
    if (entry.path().extension() != ".yaml") continue;
    const std::string output = dir + "/" + entry.path().stem().string() + ".h5";
    std::vector<std::string> model_sets = {"--set", "model.path=" + model + "/stories260K.bin", "--set",
                                           "model.tokenizer=" + model + "/tok512.bin"};
    if (test::read_file(entry.path().string()).find("models/smollm2-135m-instruct") != std::string::npos)
      model_sets = {"--set", "model.path=" + test::smollm2_dir()};
    std::vector<std::string> args = {"run", entry.path().string(), "--set", "decoding.max_new_tokens=4", "--set",
                                     "prompts.limit=2", "--output", output};
    args.insert(args.end(), model_sets.begin(), model_sets.end());
    const auto result = test::run_cli(args);
    EXPECT_EQ(result.exit_code, 0) << entry.path() << "\n" << result.err;
    EXPECT_TRUE(complete(output)) << entry.path();
    EXPECT_NE(result.out.find("output: "), std::string::npos) << result.out;
  }
}

TEST(RunCli, BadConfigsGetOneClearErrorAndNoCompleteOutput) {
  const std::string dir = test::scratch_dir();
  struct Case {
    std::vector<std::string> sets;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {{"decoding.max_new_tokenz=4"}, "unknown key"},
      {{"decoding.max_new_tokens=many"}, "decoding.max_new_tokens"},
      {{"quantizers.0.method=kivy"}, "unknown quantizer method 'kivy'"},
      {{"model.path=/nonexistent/model.bin"}, "model file not found: /nonexistent/model.bin"},
      {{"decoding.max_new_tokens=500"}, "exceed the model's context of 512 positions"},
      {{"lanes=[]"}, "lanes"},
      {{"quantizers.1.params.tile_size=7"}, "tile_size"},
      {{"model.tokenizer=", "prompts.source=token_ids", "prompts.texts=", "prompts.ids=[[1, 511, 512]]"},
       "prompt ids:0 has token id 512 at position 2, outside the model's vocabulary of 512 ids"},
      {{"prompts.chat_template=true"}, "prompts.chat_template: no chat template for "},
  };
  test::expect_one_error_line(test::run_cli({"run", small_config(dir), "--output", ""}),
                              "--output must name a file (leave it out to use the config's output.path)");
  for (const auto& c : cases) {
    fs::remove(dir + "/run.h5");
    std::vector<std::string> args = {"run", small_config(dir)};
    for (const auto& s : c.sets) args.insert(args.end(), {"--set", s});
    const auto result = test::run_cli(args);
    EXPECT_NE(result.exit_code, 0) << c.fragment;
    EXPECT_NE(result.err.find("kvdrift: error: "), std::string::npos) << result.err;
    EXPECT_NE(result.err.find(c.fragment), std::string::npos) << "expected '" << c.fragment << "' in " << result.err;
    EXPECT_FALSE(complete(dir + "/run.h5")) << c.fragment;
  }
}

// A batch whose caches exceed the machine's memory (here ~340 GB: 30,000 prompts in one batch) is refused
// with the settings that size it, before the log is written and before anything is allocated.
TEST(RunCli, CachesBeyondTheMachinesMemoryAreRefusedBeforeTheLogIsWritten) {
  const std::string dir = test::scratch_dir();
  std::string lines;
  for (int i = 0; i < 30000; ++i) lines += "Once upon a time\n";
  test::write_file(dir + "/prompts.txt", lines);
  const auto result = test::run_cli({"run", small_config(dir), "--set", "prompts.source=text_file", "--set",
                                     "prompts.texts=", "--set", "prompts.path=" + dir + "/prompts.txt", "--set",
                                     "decoding.batch_prompts=30000", "--set", "decoding.max_new_tokens=480"});
  test::expect_one_error_line(result, "the KV caches of one batch need ");
  for (const std::string fragment :
       {"rows (30000 prompts per batch (decoding.batch_prompts) x (1 reference + 2 quantizers x ",
        " + decoding.max_new_tokens 480) x 5 layers x 4 KV heads x head_dim 8 x 4 (keys and values, written and "
        "read) x 4 bytes; lower decoding.batch_prompts or decoding.max_new_tokens, or run fewer quantizers or lanes"})
    EXPECT_NE(result.err.find(fragment), std::string::npos) << result.err;
  EXPECT_FALSE(fs::exists(dir + "/run.h5"));
}

// The paper's protocol end to end: the prompt pseudo-decoded in chunks over the quantized caches, and
// sampling; every summary figure of docs/hdf5-schema.md reads back with h5py, with its interval.
TEST(RunCli, ChunkedSampledRunWritesEverySummaryField) {
  const std::string dir = test::scratch_dir();
  const auto result =
      test::run_cli({"run", small_config(dir, "", 16), "--set", "decoding.prefill=chunked", "--set",
                     "decoding.prefill_chunk=4", "--set", "decoding.temperature=0.8", "--set", "decoding.top_p=0.95"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  std::string output;
  const int status = test::run_python(dir, "check_summary", R"(import sys, math, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
assert f.attrs["prefill"] == "chunked" and f.attrs["prefill_chunk"] == 4, dict(f.attrs)
assert "prefill: chunked" in f["config/yaml"].asstr()[()]
intervals = {
    "": ["attn_gap_mean", "attn_gap_slope"],
    "teacher_forced": ["kl_mean", "final_kl_mean", "top1_disagreement_mean", "kl_slope", "attn_rel_l2_mean",
                       "attn_rel_l2_slope", "key_quant_worst5_magnitude_share_mean",
                       "value_quant_worst5_magnitude_share_mean", "kl_sampled_mean"],
    "static": ["attn_rel_l2_mean", "attn_rel_l2_slope", "key_quant_worst5_magnitude_share_mean"],
    "free_running": ["first_divergence_km_median"],
}
for q in ("kivi-2bit", "kvarn-k2v2"):
    s = f["summary"][q]
    assert s.attrs["first_step"] == 0 and s.attrs["samples"] == 3
    assert s.attrs["bootstrap_resamples"] == 1000 and s.attrs["bootstrap_level"] == 0.95
    for lane, names in intervals.items():
        a = s[lane].attrs if lane else s.attrs
        for name in names:
            value, low, high = a[name], a[name + "_ci_low"], a[name + "_ci_high"]
            assert low <= high, (q, lane, name, low, high)
            if math.isfinite(value) and name != "first_divergence_km_median":
                assert low - 1e-12 <= value <= high + 1e-12, (q, lane, name, low, value, high)
    tf = s["teacher_forced"].attrs
    assert 0 <= tf["kl_sampled_infinite_fraction"] <= 1
    assert "key_quant_worst5_magnitude_share_mean_of_ratios_mean" in tf
    fr = s["free_running"].attrs
    assert fr["first_divergence_events"] + fr["first_divergence_censored"] == 3
    # Step 0 is compared in chunked mode: the mean pools every step of every sample.
    kl = np.concatenate([f[f"samples/{i}/{q}/teacher_forced/kl"][()] for i in range(3)]).astype(np.float64)
    assert np.isclose(tf["kl_mean"], kl.mean(), rtol=1e-9), (tf["kl_mean"], kl.mean())
    sampled = f[f"samples/0/{q}/teacher_forced/kl_sampled"]
    assert sampled.shape == (16,) and sampled.attrs["axes"] == "step"
    worst = f[f"samples/0/{q}/teacher_forced/key/quant"].attrs
    assert 0 <= worst["worst5_magnitude_share_mean_of_ratios"] <= 1 and 0 <= worst["worst5_magnitude_share"] <= 1
print("ok")
)",
                                      {dir + "/run.h5"}, &output);
  EXPECT_EQ(status, 0) << output;
  EXPECT_EQ(output, "ok\n");
}

// stories260K (head_dim 8): KIVI with groups of 8 stores a scale and a minimum (fp16) per 8
// elements, 4 bits; at 64 positions its keys hold [0, 48) quantized (2 + 4 bits) and 16 in full
// precision, its values [0, 47): ((48 * 6 + 16 * 16) + (47 * 6 + 17 * 16)) / 128 = 8.578125.
TEST(RunCli, BitsPrintsEachQuantizerAtTheLengths) {
  const std::string dir = test::scratch_dir();
  const auto result = test::run_cli({"bits", small_config(dir), "--length", "16", "--length", "64"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.out.find("kivi-2bit                kivi        2.000  4.0000   16.0000    8.5781\n"), std::string::npos)
      << result.out;
  EXPECT_NE(result.out.find("head_dim 8"), std::string::npos) << result.out;
  // Lengths are 1..2^53 (exact in the double the costs are summed in); beyond int64 is not clamped.
  for (const std::string length : {"0", "9007199254740993", "99999999999999999999"})
    test::expect_one_error_line(test::run_cli({"bits", small_config(dir), "--length", length}),
                                "--length: Value " + length + " not in range 1 to 9007199254740992");
}

TEST(RunCli, LogReadsBackWithH5py) {
  const std::string dir = test::scratch_dir();
  const auto result = test::run_cli({"run", small_config(dir)});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  std::string output;
  const int status = test::run_python(dir, "check_run", R"(import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
assert f.attrs["schema_version"] == 1 and f.attrs["complete"] == 1
layers = 5
kls = []
for i in range(3):
    s = f[f"samples/{i}"]
    steps = s["reference_tokens"].shape[0]
    assert steps == 24, steps
    assert s["prompt_tokens"].dtype == np.int64
    for q in ("kivi-2bit", "kvarn-k2v2"):
        tf = s[f"{q}/teacher_forced"]
        assert tf["kl"].shape == (steps,) and tf["kl"].dtype == np.float32
        assert tf["attn_rel_l2"].shape[1] == layers
        positions = s["prompt_tokens"].shape[0] + steps - 1
        for role in ("key", "value"):
            for part in ("quant", "drift"):
                em, ed, et = (tf[f"{role}/{part}/{c}"][...].astype(np.float64) for c in ("E_M", "E_D", "E_T"))
                assert et.shape == (positions, layers), (et.shape, positions)
                assert np.allclose(em + ed, et, rtol=1e-5, atol=1e-9)
        st = s[f"{q}/static"]
        assert st["attn_rel_l2"].shape == tf["attn_rel_l2"].shape
        fr = s[f"{q}/free_running"]
        assert fr["tokens"].dtype == np.int64
        assert fr.attrs["outcome"] in ("identical", "token_mismatch", "length_only", "censored")
        if q == "kivi-2bit":
            kls.append(tf["kl"][1:].astype(np.float64))  # step 0 is the shared prefill's
mean = np.concatenate(kls).mean()
got = f["summary/kivi-2bit/teacher_forced"].attrs["kl_mean"]
assert abs(got - mean) <= 1e-6 * max(1.0, abs(mean)), (got, mean)
print("ok")
)",
                                      {dir + "/run.h5"}, &output);
  EXPECT_EQ(status, 0) << output;
  EXPECT_EQ(output, "ok\n");
}

// The log says how its weight GEMMs ran (model/linear.h) and with how many threads: pre-packed by
// default on CPU in float32, plain when asked; another path is a usage error.
TEST(RunCli, TheLogSaysHowTheGemmsRan) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 12);
  ASSERT_EQ(test::run_cli({"--threads", "1", "run", config, "--output", dir + "/packed.h5"}).exit_code, 0);
  ASSERT_EQ(test::run_cli({"--gemm", "plain", "run", config, "--output", dir + "/plain.h5"}).exit_code, 0);
  const auto packed = h5::File::open_read(dir + "/packed.h5");
  EXPECT_EQ(packed.attribute<std::string>("gemm"), "packed");
  EXPECT_EQ(packed.attribute<int64_t>("threads"), 1);
  EXPECT_EQ(h5::File::open_read(dir + "/plain.h5").attribute<std::string>("gemm"), "plain");
  const auto refused = test::run_cli({"--gemm", "fast", "run", config, "--output", dir + "/fast.h5"});
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_NE(refused.err.find("--gemm: fast not in {packed,plain}"), std::string::npos) << refused.err;
  EXPECT_FALSE(std::filesystem::exists(dir + "/fast.h5"));
}

// Runs kvdrift until its stderr reports that sample 0 is written, then kills it with SIGKILL.
void run_and_kill_after_first_sample(const std::vector<std::string>& args) {
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(pipe_fds[1], 2);
    ::close(pipe_fds[0]);
    test::exec_cli(args);
  }
  ::close(pipe_fds[1]);
  std::string seen;
  char buffer[4096];
  ssize_t got;
  while ((got = ::read(pipe_fds[0], buffer, sizeof(buffer))) > 0) {
    seen.append(buffer, static_cast<size_t>(got));
    if (seen.find("sample 0 written") != std::string::npos) break;
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ::close(pipe_fds[0]);
  ASSERT_NE(seen.find("sample 0 written"), std::string::npos) << seen;
}

TEST(RunCli, ResumeAfterSigkillGivesTheSameArrays) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 40);
  const std::string killed = dir + "/killed.h5", whole = dir + "/whole.h5";
  run_and_kill_after_first_sample({"--log-level", "debug", "run", config, "--output", killed});
  EXPECT_FALSE(complete(killed));
  const auto resumed = test::run_cli({"run", config, "--output", killed});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  // Progress: no ETA before this process finishes a sample (the killed run's samples took no time here),
  // then the time left, 0 s at the end.
  const auto line_of = [&](const std::string& start) {
    const size_t at = resumed.err.find(start);
    return at == std::string::npos ? std::string() : resumed.err.substr(at, resumed.err.find('\n', at) - at);
  };
  EXPECT_NE(line_of("samples ").find("ETA --"), std::string::npos) << resumed.err;
  EXPECT_NE(line_of("samples 3/3").find("ETA 0s"), std::string::npos) << resumed.err;
  const auto uninterrupted = test::run_cli({"run", config, "--output", whole});
  ASSERT_EQ(uninterrupted.exit_code, 0) << uninterrupted.err;
  {
    const auto a = h5::File::open_read(killed), b = h5::File::open_read(whole);  // closed before the next run
    for (int i = 0; i < 3; ++i) {
      for (const std::string lane : {"kivi-2bit/teacher_forced/kl", "kvarn-k2v2/static/attn_rel_l2",
                                     "kvarn-k2v2/teacher_forced/key/drift/E_T"}) {
        const std::string path = "samples/" + std::to_string(i) + "/" + lane;
        EXPECT_EQ(a.read<float>(path), b.read<float>(path)) << path;
      }
      const std::string tokens = "samples/" + std::to_string(i) + "/kivi-2bit/free_running/tokens";
      EXPECT_EQ(a.read<int64_t>(tokens), b.read<int64_t>(tokens));
    }
  }
  // A changed config is refused unless --overwrite.
  const auto changed = test::run_cli({"run", config, "--output", killed, "--set", "decoding.max_new_tokens=8"});
  EXPECT_NE(changed.exit_code, 0);
  EXPECT_NE(changed.err.find("different config"), std::string::npos) << changed.err;
  // --overwrite with a config that cannot run (a prompt beyond the context, an id beyond the
  // vocabulary) is refused before the finished log is touched.
  const std::string before = test::read_file(killed);
  for (const std::vector<std::string>& sets :
       {std::vector<std::string>{"decoding.max_new_tokens=600"},
        std::vector<std::string>{"model.tokenizer=", "prompts.source=token_ids", "prompts.texts=", "prompts.ids=[[600]]"}}) {
    std::vector<std::string> args = {"run", config, "--output", killed, "--overwrite"};
    for (const auto& set : sets) args.insert(args.end(), {"--set", set});
    const auto refused = test::run_cli(args);
    EXPECT_EQ(refused.exit_code, 1) << sets[0];
    EXPECT_NE(refused.err.find(sets.size() == 1 ? "exceed the model's context of 512 positions" : "token id 600"),
              std::string::npos)
        << refused.err;
    EXPECT_EQ(test::read_file(killed), before) << sets[0];
  }
}

// decoding.batch_prompts = 2 over three prompts of different lengths: batches {0, 1} and {2}. Each
// sample holds what a one-prompt-at-a-time run gives, up to float32 rounding (a batch of prompts of
// different lengths sums attention over longer, masked spans): reference and KIVI tokens exactly,
// KIVI's KL element by element bar a few flipped codes, KVarN's errors on average (VarN keeps the best
// of its iterates per tile, so rounding can change a whole tile). A run killed after its first batch
// resumes with the last prompt alone and gives the uninterrupted batched run's arrays exactly.
TEST(RunCli, BatchedPromptsMatchOneAtATimeAndResume) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 40);
  const std::string single = dir + "/single.h5", killed = dir + "/killed.h5", whole = dir + "/whole.h5";
  const std::vector<std::string> batched = {"--set", "decoding.batch_prompts=2"};
  auto with = [](std::vector<std::string> args, const std::vector<std::string>& more) {
    args.insert(args.end(), more.begin(), more.end());
    return args;
  };
  const auto one = test::run_cli({"run", config, "--output", single});
  ASSERT_EQ(one.exit_code, 0) << one.err;
  run_and_kill_after_first_sample(with({"--log-level", "debug", "run", config, "--output", killed}, batched));
  EXPECT_FALSE(complete(killed));
  const auto resumed = test::run_cli(with({"run", config, "--output", killed}, batched));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  const auto uninterrupted = test::run_cli(with({"run", config, "--output", whole}, batched));
  ASSERT_EQ(uninterrupted.exit_code, 0) << uninterrupted.err;

  const auto s = h5::File::open_read(single), k = h5::File::open_read(killed), w = h5::File::open_read(whole);
  const std::vector<int64_t> batch_sizes = {2, 2, 1};
  auto mean = [](const std::vector<float>& values) {
    double sum = 0;
    for (float v : values) sum += v;
    return sum / static_cast<double>(values.size());
  };
  for (int i = 0; i < 3; ++i) {
    const std::string sample = "samples/" + std::to_string(i) + "/";
    EXPECT_EQ(w.open_group(sample).attribute<int64_t>("batch_prompts"), batch_sizes[i]);
    EXPECT_EQ(s.open_group(sample).attribute<int64_t>("batch_prompts"), 1);
    for (const std::string tokens :
         {"reference_tokens", "kivi-2bit/free_running/tokens", "kvarn-k2v2/free_running/tokens"}) {
      EXPECT_EQ(k.read<int64_t>(sample + tokens), w.read<int64_t>(sample + tokens)) << sample + tokens;
      if (tokens.rfind("kvarn", 0) != 0)
        EXPECT_EQ(w.read<int64_t>(sample + tokens), s.read<int64_t>(sample + tokens)) << sample + tokens;
    }
    for (const std::string array :
         {"kivi-2bit/teacher_forced/kl", "kivi-2bit/free_running/key/drift/E_T", "kvarn-k2v2/static/attn_rel_l2",
          "kvarn-k2v2/teacher_forced/attn_cos", "kvarn-k2v2/teacher_forced/value/quant/E_T"}) {
      const auto batched_values = w.read<float>(sample + array), alone = s.read<float>(sample + array);
      EXPECT_EQ(k.read<float>(sample + array), batched_values) << sample + array;
      ASSERT_EQ(batched_values.size(), alone.size()) << sample + array;
      EXPECT_NEAR(mean(batched_values), mean(alone), 0.02 * std::abs(mean(alone))) << sample + array;
      if (array.rfind("kivi", 0) != 0) continue;
      size_t close = 0;
      for (size_t j = 0; j < alone.size(); ++j)
        close += std::abs(batched_values[j] - alone[j]) <= 1e-3 * (1e-3 + std::abs(alone[j]));
      EXPECT_GE(static_cast<double>(close), 0.97 * static_cast<double>(alone.size())) << sample + array;
    }
  }
  EXPECT_EQ(w.open_group("summary/kivi-2bit").attribute<int64_t>("samples"), 3);
}

// A reader in SWMR mode watches a sample's arrays grow while it decodes; the run is then killed in the
// middle of sample 1 (in SWMR mode), and the resumed file equals an uninterrupted run. `settings`: more
// command-line arguments for every run.
void expect_live_run_read_killed_and_resumed(const std::vector<std::string>& settings) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "  flush_seconds: 0.05\n", 300);
  const std::string live = dir + "/live.h5", whole = dir + "/whole.h5";
  // Starts the run, polls the file with swmr=True, and kills the run once it has seen sample 0 at two
  // partial lengths and sample 1 with rows but not complete; prints what it saw as JSON.
  const std::string watcher = R"(
import json, signal, subprocess, sys, time
import h5py
cli, config, path = sys.argv[1:4]
run = subprocess.Popen([cli, "run", config, "--output", path] + sys.argv[4:], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
seen, killed, partial_0 = [], False, set()
deadline = time.time() + 240
while run.poll() is None and time.time() < deadline:
    try:
        with h5py.File(path, "r", swmr=True) as f:
            for name, sample in f["samples"].items():
                if "kvarn-k2v2/teacher_forced/kl" not in sample:
                    continue
                kl = sample["kvarn-k2v2/teacher_forced/kl"]
                tokens = sample["kivi-2bit/free_running/tokens"]
                seen.append([int(name), int(sample.attrs["complete"]), kl.shape[0], tokens.shape[0],
                             sample["reference_tokens"].shape[0], "key" in sample["kvarn-k2v2/teacher_forced"]])
                if int(name) == 0 and sample.attrs["complete"] == 0:
                    partial_0.add(kl.shape[0])
                if int(name) == 1 and sample.attrs["complete"] == 0 and kl.shape[0] > 0 and len(partial_0) >= 2:
                    run.send_signal(signal.SIGKILL)
                    killed = True
    except (OSError, KeyError):
        pass  # the writer is between SWMR phases; try again
    if killed:
        break
    time.sleep(0.02)
run.wait()
print(json.dumps({"killed": killed, "seen": seen}))
)";
  std::string output;
  std::vector<std::string> watcher_args = {KVDRIFT_CLI, config, live};
  watcher_args.insert(watcher_args.end(), settings.begin(), settings.end());
  ASSERT_EQ(test::run_python(dir, "watch", watcher, watcher_args, &output), 0) << output;
  ASSERT_NE(output.find("\"killed\": true"), std::string::npos) << output;
  // Rows of sample 0 were seen growing before it was complete: at least two partial lengths, lengths
  // never shrink, no position arrays before the end, and arrays read one after another differ by at
  // most the rows of one flush (bounded by the largest growth seen between two reads).
  const auto report = nlohmann::json::parse(output);
  std::set<int64_t> partial_lengths;
  int64_t last_length = 0, largest_growth = 1, largest_skew = 0;
  for (const auto& row : report["seen"]) {
    if (row[0] == 0 && row[1] == 0) {
      const int64_t kl = row[2], tokens = row[3], reference = row[4];
      partial_lengths.insert(kl);
      EXPECT_GE(kl, last_length) << row;
      largest_growth = std::max(largest_growth, kl - last_length);
      last_length = kl;
      // Free-running tokens too: this run has no end token.
      largest_skew = std::max({largest_skew, std::abs(reference - kl), std::abs(tokens - kl)});
      EXPECT_FALSE(row[5].get<bool>()) << row;  // token-scale arrays come with the finished sample
    }
  }
  EXPECT_GE(partial_lengths.size(), 2u) << output;
  EXPECT_LE(largest_skew, largest_growth) << output;
  EXPECT_FALSE(complete(live));
  auto run_to = [&](const std::string& path) {
    std::vector<std::string> args = {"run", config, "--output", path};
    args.insert(args.end(), settings.begin(), settings.end());
    return test::run_cli(args);
  };
  const auto resumed = run_to(live);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  const auto uninterrupted = run_to(whole);
  ASSERT_EQ(uninterrupted.exit_code, 0) << uninterrupted.err;
  const auto a = h5::File::open_read(live), b = h5::File::open_read(whole);
  for (int i = 0; i < 3; ++i) {
    const std::string sample = "samples/" + std::to_string(i) + "/";
    for (const std::string array : {"kivi-2bit/teacher_forced/kl", "kvarn-k2v2/static/attn_rel_l2",
                                    "kvarn-k2v2/free_running/match", "kvarn-k2v2/teacher_forced/value/quant/E_T"})
      EXPECT_EQ(a.read<float>(sample + array), b.read<float>(sample + array)) << sample + array;
    EXPECT_EQ(a.read<int64_t>(sample + "reference_tokens"), b.read<int64_t>(sample + "reference_tokens"));
    EXPECT_EQ(a.open_group(sample + "kivi-2bit/free_running").attribute<std::string>("continuation"),
              b.open_group(sample + "kivi-2bit/free_running").attribute<std::string>("continuation"));
  }
}

TEST(RunCli, LiveRunIsReadWithSwmrAndAKillMidSampleResumes) { expect_live_run_read_killed_and_resumed({}); }

// The same with samples 0 and 1 decoding in one batch: both are written live together, the kill
// lands in the middle of both, and the resumed run redoes the pair.
TEST(RunCli, LiveBatchOfTwoIsReadWithSwmrAndAKillMidBatchResumes) {
  expect_live_run_read_killed_and_resumed({"--set", "decoding.batch_prompts=2"});
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

// A prompt file changed between a run and its resume: the log would mix both versions, so it is refused.
// The log is a regular file and none of the run's inputs, also with --overwrite; a log the run cannot
// write is reported as such, never answered with "--overwrite" (which would replace it).
TEST(RunCli, OutputsThatAreNotALogOfTheRunAreRefused) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 4);
  const std::string config_text = test::read_file(config);
  auto run = [&](const std::string& output) { return test::run_cli({"run", config, "--output", output, "--overwrite"}); };
  test::expect_one_error_line(run("/dev/null"), "output.path /dev/null exists and is not a regular file; name a file");
  ASSERT_EQ(::mkfifo((dir + "/fifo").c_str(), 0600), 0);
  test::expect_one_error_line(run(dir + "/fifo"), "output.path " + dir + "/fifo exists and is not a regular file");
  // A link to nothing is named as such, not answered with HDF5's "File exists".
  fs::create_symlink(dir + "/nowhere/run.h5", dir + "/dangling.h5");
  test::expect_one_error_line(run(dir + "/dangling.h5"), "output.path " + dir + "/dangling.h5 is a symbolic link to " +
                                                             dir + "/nowhere/run.h5, which does not exist; name the "
                                                             "file itself, or remove the link");
  test::expect_one_error_line(run(config), "output.path " + config + " is the same file as the input " + config);
  test::expect_one_error_line(run(test::stories260k_dir() + "/tok512.bin"), "is the same file as the input");
  EXPECT_EQ(test::read_file(config), config_text);
}

// Inputs are never outputs, at any depth: a log named as any file under the model directory (its
// config, its weights, anything beside them), also through a link, is refused as an input, without
// suggesting --overwrite and also with it, and the file is left as it was.
TEST(RunCli, FilesUnderTheModelDirectoryAreInputs) {
  const std::string dir = test::scratch_dir();
  const std::string hf = dir + "/hf";
  ASSERT_EQ(test::run_cli({"convert", "--from", "llama2c", test::stories260k_dir() + "/stories260K.bin", "--to", "hf",
                           hf})
                .exit_code,
            0);
  test::write_file(hf + "/additional_chat_templates/notes.jinja", "keep me");
  fs::create_symlink(hf + "/model.safetensors", dir + "/link.h5");
  const std::string config = small_config(dir, "", 4);
  for (const auto& [output, input] : std::vector<std::pair<std::string, std::string>>{
           {hf + "/config.json", hf + "/config.json"},
           {hf + "/model.safetensors", hf + "/model.safetensors"},
           {hf + "/additional_chat_templates/notes.jinja", hf + "/additional_chat_templates/notes.jinja"},
           {dir + "/link.h5", hf + "/model.safetensors"}}) {
    const std::string before = test::read_file(input);
    for (const std::vector<std::string>& more : {std::vector<std::string>{}, std::vector<std::string>{"--overwrite"}}) {
      std::vector<std::string> args = {"run", config, "--set", "model.path=" + hf, "--output", output};
      args.insert(args.end(), more.begin(), more.end());
      const auto refused = test::run_cli(args);
      EXPECT_EQ(refused.exit_code, 1) << output;
      test::expect_one_error_line(refused, "kvdrift: error: output.path " + output + " is the same file as the input " +
                                               input + "; name another output");
    }
    EXPECT_EQ(test::read_file(input), before) << input;
  }
}

// Rerunning a finished run adds no sample and changes nothing: the log stays byte for byte as it was,
// its task scores included, and the same summary is printed.
TEST(RunCli, RerunningAFinishedRunLeavesItByteForByte) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 8);
  const auto first = test::run_cli({"run", config});
  ASSERT_EQ(first.exit_code, 0) << first.err;
  h5::File::open_read_write(dir + "/run.h5").create_group("scores").set_attribute("task", std::string("gsm8k"));
  const std::string finished = test::read_file(dir + "/run.h5");
  const auto again = test::run_cli({"run", config});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, first.out);
  EXPECT_EQ(test::read_file(dir + "/run.h5"), finished);
  EXPECT_EQ(h5::File::open_read(dir + "/run.h5").open_group("scores").attribute<std::string>("task"), "gsm8k");
}

// A tmpfs of `bytes` mounted at `dir` for the life of the object, where this process may mount one.
class SmallDisk {
 public:
  SmallDisk(std::string dir, uint64_t bytes) : dir_(std::move(dir)) {
    fs::create_directories(dir_);
    mounted_ = ::mount("tmpfs", dir_.c_str(), "tmpfs", 0, fmt::format("size={}", bytes).c_str()) == 0;
    if (!mounted_) why_not_ = std::strerror(errno);
  }
  ~SmallDisk() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }
  const std::string& why_not() const { return why_not_; }
  bool resize(uint64_t bytes, bool read_only = false) {
    return ::mount("tmpfs", dir_.c_str(), "tmpfs", MS_REMOUNT | (read_only ? MS_RDONLY : 0),
                   fmt::format("size={}", bytes).c_str()) == 0;
  }

 private:
  std::string dir_;
  bool mounted_ = false;
  std::string why_not_;
};

std::set<int64_t> finished_samples(const std::string& path) {
  std::set<int64_t> finished;
  const auto file = h5::File::open_read(path);
  const auto samples = file.open_group("samples");
  for (const std::string& name : samples.children())
    if (samples.open_group(name).attribute<int64_t>("complete") == 1) finished.insert(std::stoll(name));
  return finished;
}

// A disk that fills up mid-run: the run stops with one line before a write can leave HDF5's metadata
// half-updated (no crash), the finished samples stay readable, a rerun on the still-full disk stops
// the same way without touching the file, and once there is space the same command resumes to the
// uninterrupted run's arrays. On a read-only disk, the finished log is left alone with a message that
// does not suggest --overwrite.
TEST(RunCli, FullDiskStopsCleanlyAndTheRunResumesOnceThereIsSpace) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir, "", 24);
  const std::string whole = dir + "/whole.h5";
  ASSERT_EQ(test::run_cli({"run", config, "--output", whole}).exit_code, 0);
  const uint64_t whole_bytes = fs::file_size(whole);  // the header, three samples and the summary
  // Room for the reservation and about half the log: the first sample fits, the last does not.
  SmallDisk disk(dir + "/disk", kMinReserveBytes + whole_bytes / 2);
  if (!disk.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here (" << disk.why_not() << "); needs root or CAP_SYS_ADMIN";
  const std::string log = dir + "/disk/run.h5";
  const auto full = test::run_cli({"run", config, "--output", log});
  test::expect_one_error_line(full, log + ": cannot reserve 16.0 MiB of disk space for the next writes: No space left "
                                          "on device; the log is as the last finished sample left it",
                              /*empty_stdout=*/false);
  const std::set<int64_t> finished = finished_samples(log);
  EXPECT_GE(finished.size(), 1u);
  EXPECT_LE(finished.size(), 2u);
  const std::string stopped = test::read_file(log);
  const auto still_full = test::run_cli({"run", config, "--output", log});
  test::expect_one_error_line(still_full, "No space left on device", /*empty_stdout=*/false);
  EXPECT_EQ(test::read_file(log), stopped);

  ASSERT_TRUE(disk.resize(4 * kMinReserveBytes + 4 * whole_bytes)) << std::strerror(errno);
  const auto resumed = test::run_cli({"run", config, "--output", log});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_TRUE(complete(log));
  const auto a = h5::File::open_read(log), b = h5::File::open_read(whole);
  for (int i = 0; i < 3; ++i) {
    for (const std::string array : {"kivi-2bit/teacher_forced/kl", "kvarn-k2v2/teacher_forced/key/drift/E_T"}) {
      const std::string path = "samples/" + std::to_string(i) + "/" + array;
      EXPECT_EQ(a.read<float>(path), b.read<float>(path)) << path;
    }
    const std::string tokens = "samples/" + std::to_string(i) + "/kivi-2bit/free_running/tokens";
    EXPECT_EQ(a.read<int64_t>(tokens), b.read<int64_t>(tokens));
  }

  const std::string finished_log = test::read_file(log);
  ASSERT_TRUE(disk.resize(4 * kMinReserveBytes + 4 * whole_bytes, /*read_only=*/true)) << std::strerror(errno);
  test::expect_one_error_line(test::run_cli({"run", config, "--output", log}),
                              "output.path " + log + " cannot be written: cannot create its lock file " + log +
                                  ".lock (Read-only file system)");
  EXPECT_EQ(test::read_file(log), finished_log);
}

// One writer per log: a second run of the same config on the same output, started while the first
// runs (held still by SIGSTOP, wherever it is), stops at once with one line naming the first (also
// with --overwrite, which would replace the log under it); the first then finishes with every sample,
// and its lock file goes with it.
TEST(RunCli, ASecondRunOnALogBeingWrittenIsRefusedAndTheFirstFinishes) {
  const std::string dir = test::scratch_dir();
  const std::string config = small_config(dir);
  const std::string log = dir + "/run.h5", lock = fs::weakly_canonical(log).string() + ".lock";
  const pid_t first = test::start_cli({"run", config}, dir + "/first.txt");
  ASSERT_TRUE(test::wait_for_lock_holder(lock, first)) << test::read_file(dir + "/first.txt");
  ::kill(first, SIGSTOP);
  for (const std::vector<std::string>& more : {std::vector<std::string>{}, std::vector<std::string>{"--overwrite"}}) {
    std::vector<std::string> args = {"run", config};
    args.insert(args.end(), more.begin(), more.end());
    const auto second = test::run_cli(args);
    EXPECT_EQ(second.exit_code, 1);
    test::expect_one_error_line(second, fmt::format("kvdrift: error: output.path {} is held by another kvdrift (pid {} "
                                                    "on host {}; lock file {}): wait for that run to end, or name "
                                                    "another output",
                                                    log, first, test::host_name(), lock));
  }
  ::kill(first, SIGCONT);
  ASSERT_EQ(test::wait_exit_code(first), 0) << test::read_file(dir + "/first.txt");
  EXPECT_TRUE(complete(log));
  EXPECT_EQ(finished_samples(log), (std::set<int64_t>{0, 1, 2}));
  EXPECT_FALSE(fs::exists(lock));
}

TEST(RunCli, ResumeRefusesChangedPrompts) {
  const std::string dir = test::scratch_dir();
  const std::string model = test::stories260k_dir();
  test::write_file(dir + "/prompts.txt", "Once upon a time\nThe dog ran\n");
  test::write_file(dir + "/run.yaml", "model: {path: " + model + "/stories260K.bin, tokenizer: " + model +
                                          "/tok512.bin}\nprompts: {source: text_file, path: prompts.txt}\n"
                                          "decoding: {max_new_tokens: 2}\nquantizers: [{name: none, method: none}]\n"
                                          "output: {path: " + dir + "/run.h5}\n");
  ASSERT_EQ(test::run_cli({"run", dir + "/run.yaml"}).exit_code, 0);
  EXPECT_EQ(test::run_cli({"run", dir + "/run.yaml"}).exit_code, 0);  // same prompts: nothing to do
  const std::string finished = test::read_file(dir + "/run.h5");
  test::write_file(dir + "/prompts.txt", "The dog ran\nOnce upon a time\n");
  const auto refused = test::run_cli({"run", dir + "/run.yaml"});
  test::expect_one_error_line(refused, "was written with different prompts (sha256 '", /*empty_stdout=*/false);
  EXPECT_NE(refused.err.find("did a prompt file change?); pass --overwrite to replace it"), std::string::npos);
  EXPECT_EQ(test::read_file(dir + "/run.h5"), finished);
}

}  // namespace
}  // namespace kvdrift
