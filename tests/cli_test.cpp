// Bad input through the real command line: one clear "kvdrift: error:" line naming the offending
// value, a non-zero exit, and nothing on stdout.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>

#include <cmath>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "support.h"

namespace kvdrift {
namespace {

namespace fs = std::filesystem;

test::CliResult generate_with(const std::string& model, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"generate", "--model", model, "--tokenizer", test::stories260k_dir() + "/tok512.bin",
                                   "--steps",  "4"};
  args.insert(args.end(), extra.begin(), extra.end());
  return test::run_cli(args);
}

std::string converted_copy(const std::string& dir) {
  auto result =
      test::run_cli({"convert", "--from", "llama2c", test::stories260k_dir() + "/stories260K.bin", "--to", "hf", dir});
  EXPECT_EQ(result.exit_code, 0) << result.err;
  return dir;
}

TEST(Cli, MissingModelFile) {
  test::expect_one_error_line(generate_with("/nonexistent/model.bin"), "model file not found: /nonexistent/model.bin");
}

TEST(Cli, MissingTokenizerFile) {
  auto result = test::run_cli({"generate", "--model", "synthetic:tiny", "--tokenizer", "/nonexistent/tok.bin"});
  test::expect_one_error_line(result, "/nonexistent/tok.bin");
}

TEST(Cli, TruncatedCheckpoint) {
  const std::string path = test::scratch_dir() + "/truncated.bin";
  test::write_file(path, test::read_file(test::stories260k_dir() + "/stories260K.bin").substr(0, 100000));
  test::expect_one_error_line(generate_with(path), path + ": truncated llama2.c checkpoint");
}

TEST(Cli, CheckpointHeaderWithImpossibleSizes) {
  const std::string dir = test::scratch_dir();
  const std::string original = test::read_file(test::stories260k_dir() + "/stories260K.bin");
  auto with_header = [&](std::vector<int32_t> header) {
    std::string bytes = original;
    std::memcpy(bytes.data(), header.data(), 28);
    const std::string path = dir + "/bad" + std::to_string(header[0]) + "_" + std::to_string(header[4]) + ".bin";
    test::write_file(path, bytes);
    return path;
  };
  const std::string kv_heads = with_header({64, 172, 5, 8, 3, 512, 512});
  test::expect_one_error_line(generate_with(kv_heads), "n_heads = 8 is not a multiple of n_kv_heads = 3");
  const std::string negative = with_header({-64, 172, 5, 8, 4, 512, 512});
  test::expect_one_error_line(generate_with(negative), "(header): impossible dim = -64");
  const std::string huge = with_header({64, 172, 5, 8, 4, 512, 1 << 30});
  test::expect_one_error_line(generate_with(huge), "impossible max_seq_len = 1073741824");
}

TEST(Cli, SafetensorsWithOverlappingOrOutOfRangeOffsets) {
  const std::string dir = converted_copy(test::scratch_dir() + "/hf");
  const std::string weights = dir + "/model.safetensors";
  const std::string bytes = test::read_file(weights);
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  const auto header = nlohmann::json::parse(bytes.substr(8, header_size));
  const std::string data = bytes.substr(8 + header_size);
  auto rewrite = [&](const nlohmann::json& new_header) {
    std::string text = new_header.dump();
    text.resize((text.size() + 7) / 8 * 8, ' ');
    const uint64_t size = text.size();
    test::write_file(weights, std::string(reinterpret_cast<const char*>(&size), 8) + text + data);
  };
  // Point the final norm at the bytes of the embedding.
  auto overlapping = header;
  const auto embed = header["model.embed_tokens.weight"]["data_offsets"];
  overlapping["model.norm.weight"]["data_offsets"] = {embed[0].get<int64_t>(), embed[0].get<int64_t>() + 256};
  rewrite(overlapping);
  test::expect_one_error_line(generate_with(dir), "overlap");
  auto out_of_range = header;
  const int64_t end = static_cast<int64_t>(data.size());
  out_of_range["model.norm.weight"]["data_offsets"] = {end, end + 256};
  rewrite(out_of_range);
  test::expect_one_error_line(generate_with(dir), "run past the end of the");
}

TEST(Cli, ConfigJsonMissingRequiredKey) {
  const std::string dir = converted_copy(test::scratch_dir() + "/hf");
  auto config = nlohmann::json::parse(test::read_file(dir + "/config.json"));
  config.erase("hidden_size");
  test::write_file(dir + "/config.json", config.dump());
  test::expect_one_error_line(generate_with(dir), dir + "/config.json: missing required key 'hidden_size'");
}

// A shard index may only name files in the model directory.
TEST(Cli, ShardIndexCannotReachOutOfTheModelDirectory) {
  const std::string dir = converted_copy(test::scratch_dir() + "/hf");
  for (const std::string shard : {"../model.safetensors", "/etc/passwd", "sub/model.safetensors"}) {
    test::write_file(dir + "/model.safetensors.index.json",
                     nlohmann::json{{"weight_map", {{"model.embed_tokens.weight", shard}}}}.dump());
    test::expect_one_error_line(generate_with(dir), dir + "/model.safetensors.index.json: weight_map entry "
                                                          "'model.embed_tokens.weight' names '" + shard +
                                                          "', which is not a file name in the model directory");
  }
}

TEST(Cli, HfTensorWithWrongShape) {
  const std::string dir = converted_copy(test::scratch_dir() + "/hf");
  auto config = nlohmann::json::parse(test::read_file(dir + "/config.json"));
  config["intermediate_size"] = 128;
  test::write_file(dir + "/config.json", config.dump());
  test::expect_one_error_line(generate_with(dir), "has shape [172, 64], expected [128, 64] from the config");
}

TEST(Cli, UnknownSyntheticName) {
  test::expect_one_error_line(generate_with("synthetic:llama-9b"), "unknown synthetic model 'llama-9b'");
}

TEST(Cli, UnknownDtypeAndDevice) {
  test::expect_one_error_line(generate_with("synthetic:tiny", {"--dtype", "fp64"}), "unknown dtype 'fp64'");
  test::expect_one_error_line(generate_with("synthetic:tiny", {"--device", "tpu"}), "unknown device 'tpu'");
}

// Sizes that would divide by zero or never finish are refused by name before anything runs.
TEST(Cli, BenchSettingsOutOfRangeAreRefused) {
  auto quant = [](std::vector<std::string> extra) {
    std::vector<std::string> args = {"bench", "quant"};
    args.insert(args.end(), extra.begin(), extra.end());
    return test::run_cli(args);
  };
  test::expect_one_error_line(quant({"--head-dims", "0"}), "--head-dims 0: a head dim must be in [1, 4096]");
  test::expect_one_error_line(quant({"--heads", "0"}), "--heads 0 must be at least 1");
  test::expect_one_error_line(
      quant({"--tokens", "64"}),
      "--tokens 64 must be a positive multiple of 128 (the largest tile of the benchmarked methods)");
  test::expect_one_error_line(quant({"--min-seconds", "inf"}), "--min-seconds inf must be a number of seconds");
  test::expect_one_error_line(quant({"--min-seconds", "-1"}), "--min-seconds -1 must be a number of seconds");
  test::expect_one_error_line(test::run_cli({"bench", "decode", "--peak-gbps", "-3"}),
                              "--peak-gbps -3 must be a positive bandwidth in GB/s");
}

TEST(Cli, ConvertNeverWritesIntoAFolderUnasked) {
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/config.json", "mine");
  const std::string model = test::stories260k_dir() + "/stories260K.bin";
  test::expect_one_error_line(test::run_cli({"convert", "--from", "llama2c", model, "--to", "hf", dir}),
                              "convert: " + dir + " is not empty; pass --overwrite to write into it");
  EXPECT_EQ(test::read_file(dir + "/config.json"), "mine");
  test::expect_one_error_line(test::run_cli({"convert", "--from", "llama2c", model, "--to", "hf", dir + "/config.json"}),
                              "convert: " + dir + "/config.json exists and is not a directory");
  EXPECT_EQ(test::run_cli({"convert", "--from", "llama2c", model, "--to", "hf", dir, "--overwrite"}).exit_code, 0);
  EXPECT_NE(test::read_file(dir + "/config.json"), "mine");
}

TEST(Cli, ConvertRefusesUnknownFormats) {
  auto result = test::run_cli({"convert", "--from", "gguf", "x.gguf", "--to", "hf", test::scratch_dir()});
  test::expect_one_error_line(result, "unsupported source format 'gguf'");
}

TEST(Cli, BenchDecodePrintsOneTable) {
  auto result = test::run_cli({"bench", "decode", "--model", "synthetic:tiny", "--batch", "1,2", "--context", "16",
                               "--steps", "4", "--warmup", "1"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.out.find("ms/step"), std::string::npos) << result.out;
  // Header lines, column titles, then one row per batch size starting with the batch.
  std::istringstream lines(result.out);
  std::vector<std::string> rows;
  for (std::string line; std::getline(lines, line);) rows.push_back(line);
  ASSERT_EQ(rows.size(), 5u) << result.out;
  EXPECT_EQ(rows[3].substr(0, 6), "     1");
  EXPECT_EQ(rows[4].substr(0, 6), "     2");
}

// `bench run` prints the side-by-side cost against reference-only decoding, with plain and with packed
// weight GEMMs, for one prompt and, with batch_prompts, a batch; every figure a positive number (no
// speed is asserted); the weight GEMMs alone at the batch's rows; and whether the two paths' runs agree.
TEST(Cli, BenchRunPrintsRatiosForOnePromptAndABatch) {
  const std::string model = test::stories260k_dir();
  auto result =
      test::run_cli({"bench", "run", std::string(KVDRIFT_SOURCE_DIR) + "/configs/tinystories.yaml", "--set",
                     "decoding.max_new_tokens=8", "--set", "decoding.batch_prompts=3", "--set",
                     "model.path=" + model + "/stories260K.bin", "--set", "model.tokenizer=" + model + "/tok512.bin"});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  // The numbers of the line that starts with `label`, after the label's closing parenthesis if it has one.
  const auto numbers_after = [&](const std::string& label, size_t count) {
    const auto at = result.out.find("\n" + label);
    std::vector<double> numbers;
    if (at == std::string::npos) return numbers;
    std::string line = result.out.substr(at + 1, result.out.find('\n', at + 1) - at - 1);
    const auto close = line.find(')');
    std::istringstream rest(line.substr(close == std::string::npos ? label.size() : close + 1));
    for (std::string word; numbers.size() < count && rest >> word;) numbers.push_back(std::stod(word));
    return numbers;
  };
  for (const auto& [label, count] : std::vector<std::pair<std::string, size_t>>{{"reference only (batch 1)", 1},
                                                                                {"side by side, 1 prompt (", 3},
                                                                                {"  cost relative to reference only", 2},
                                                                                {"side by side, 3 prompts (", 3},
                                                                                {"  speed-up vs one prompt at a time", 2},
                                                                                {"metrics after decoding (packed)", 1}}) {
    const auto numbers = numbers_after(label, count);
    ASSERT_EQ(numbers.size(), count) << label << " in\n" << result.out;
    for (double value : numbers) {
      EXPECT_GT(value, 0.0) << label;
      EXPECT_TRUE(std::isfinite(value)) << label;
    }
  }
  EXPECT_NE(result.out.find("\nweight GEMMs alone at "), std::string::npos) << result.out;
  EXPECT_NE(result.out.find(" ms, "), std::string::npos) << result.out;
  EXPECT_NE(result.out.find("\npacked vs plain run (3 prompt(s)): tokens the same"), std::string::npos) << result.out;
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

// --version names every library a result depends on; --threads (and KVDRIFT_THREADS, set to 1 for the
// tests by ctest) set the CPU threads, and a bad KVDRIFT_THREADS is refused by name.
TEST(Cli, VersionNamesLibrariesAndThreadsAreSettable) {
  const auto version = test::run_cli({"--threads", "3", "--version"});
  EXPECT_EQ(version.exit_code, 0) << version.err;
  EXPECT_EQ(version.out.rfind(std::string("kvdrift ") + KVDRIFT_VERSION + " (git ", 0), 0u) << version.out;
  EXPECT_NE(version.out.find("\nLibTorch 2."), std::string::npos) << version.out;
#ifdef KVDRIFT_WITH_CUDA  // the project's LibTorch (.venv) is a CUDA build, also where no GPU is
  EXPECT_NE(version.out.find("\nCUDA compiled: yes, CUDA "), std::string::npos) << version.out;
#else
  EXPECT_NE(version.out.find("\nCUDA compiled: no\n"), std::string::npos) << version.out;
#endif
  EXPECT_NE(version.out.find("\nCUDA available: "), std::string::npos) << version.out;
  EXPECT_NE(version.out.find("\nHDF5 1."), std::string::npos) << version.out;
  EXPECT_NE(version.out.find("\nCPU threads: 3\n"), std::string::npos) << version.out;
  EXPECT_NE(test::run_cli({"--version"}).out.find("\nCPU threads: 1\n"), std::string::npos);  // KVDRIFT_THREADS=1

  ::setenv("KVDRIFT_THREADS", "two", 1);
  const auto bad = test::run_cli({"--version"});
  ::setenv("KVDRIFT_THREADS", "1", 1);
  test::expect_one_error_line(bad, "KVDRIFT_THREADS='two' is not a positive number of threads");
  // Beside a busy process the run starts itself again with sleeping OpenMP threads and says so; an
  // OMP_WAIT_POLICY the user set is left alone (docs/performance.md).
  const pid_t spinner = ::fork();
  if (spinner == 0) {
    for (volatile uint64_t i = 0;; ++i) {
    }
  }
  // Only the commands that compute probe: --version (or sweep status) does not.
  const std::string busy_line = "cores busy when kvdrift started: its OpenMP threads sleep when idle";
  const std::vector<std::string> generate = {"--threads", "2", "generate", "--model",
                                             test::stories260k_dir() + "/stories260K.bin", "--tokenizer",
                                             test::stories260k_dir() + "/tok512.bin", "--prompt", "Once", "--steps", "2"};
  const auto busy = test::run_cli(generate);
  const auto not_computing = test::run_cli({"--threads", "2", "--version"});
  ::setenv("OMP_WAIT_POLICY", "ACTIVE", 1);
  const auto chosen = test::run_cli(generate);
  ::unsetenv("OMP_WAIT_POLICY");
  ::kill(spinner, SIGKILL);
  ::waitpid(spinner, nullptr, 0);
  EXPECT_EQ(busy.exit_code, 0) << busy.err;
  EXPECT_NE(busy.err.find(busy_line), std::string::npos) << busy.err;
  EXPECT_EQ(busy.out, chosen.out);  // the same two tokens, restarted or not
  EXPECT_EQ(not_computing.err.find(busy_line), std::string::npos) << not_computing.err;
  EXPECT_NE(not_computing.out.find("\nCPU threads: 2\n"), std::string::npos) << not_computing.out;
  EXPECT_EQ(chosen.exit_code, 0) << chosen.err;
  EXPECT_EQ(chosen.err.find(busy_line), std::string::npos) << chosen.err;
  // An OpenMP pool of 100000 threads never finishes starting: --threads is bounded like KVDRIFT_THREADS.
  for (const std::string threads : {"0", "100000"}) {
    const auto refused = test::run_cli({"--threads", threads, "--version"});
    EXPECT_EQ(refused.exit_code, 2);
    EXPECT_NE(refused.err.find("--threads: Value " + threads + " not in range 1 to 4096"), std::string::npos)
        << refused.err;
  }
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

// Usage errors are one line and exit status 2 (failures of a command exit 1); --help exits 0.
TEST(Cli, UsageErrorsExitTwoWithOneLineNamingTheWord) {
  for (const auto& [args, fragment] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"frobnicate"}, "frobnicate"},
           {{"generate", "--model", "x", "--stpes", "3"}, "--stpes"},
           {{"generate", "--steps", "many", "--model", "x"}, "many"},
           {{"generate"}, "--model is required"},
           {{}, "no command given"},
       }) {
    const auto result = test::run_cli(args);
    EXPECT_EQ(result.exit_code, 2) << fragment << "\n" << result.err;
    test::expect_one_error_line(result, fragment);
  }
  const auto help = test::run_cli({"--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("generate"), std::string::npos);
}

}  // namespace
}  // namespace kvdrift
