// `kvdrift quantize` and `kvdrift dump-kv` through the real command line.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <limits>

#include "core/writer_lock.h"
#include "io/hdf5.h"
#include "support.h"

namespace kvdrift {
namespace {

// A [4, 64, 64] float32 tensor with an outlier channel, written by the test.
std::string write_input(const std::string& dir) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
  auto x = torch::randn({4, 64, 64}, generator, torch::kFloat32);
  x.select(2, 9).mul_(15.0);
  const std::string path = dir + "/input.h5";
  auto file = h5::File::create(path, true);
  file.write("kv/keys", x.data_ptr<float>(), {4, 64, 64});
  file.write("flat", x.data_ptr<float>(), {4 * 64 * 64});
  file.write("empty", x.data_ptr<float>(), {4, 32, 0});
  x[1][2][3] = std::numeric_limits<float>::quiet_NaN();
  file.write("nan", x.data_ptr<float>(), {4, 64, 64});
  file.close();
  return path;
}

void expect_error(const test::CliResult& result, const std::string& fragment) {
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.err.find("kvdrift: error: "), std::string::npos) << result.err;
  EXPECT_NE(result.err.find(fragment), std::string::npos) << "expected '" << fragment << "' in " << result.err;
}

TEST(QuantizeCli, WritesDequantizedCodesParamsAndRowErrors) {
  const std::string dir = test::scratch_dir();
  const std::string input = write_input(dir);
  struct Run {
    std::string method;
    std::vector<std::string> sets;
    double bits;
  };
  const std::vector<Run> runs = {
      {"kvarn", {"preset=k4v2", "tile_size=64"}, 2.0 + 16.0 * (64 + 64 + 64) / (64 * 64)},  // values: 2 + 3 fp16 vectors
      {"kivi", {"group_size=16", "residual_length=32"}, 2.0 + 2 * 16.0 / 16},
      {"quarot", {}, 4.0 + 2 * 16.0 / 64},  // values: fp16 scale and minimum per token (keys: uint8 zero)
      {"rtn", {"v_bits=3"}, 4.0 + 2 * 16.0 / 64},  // 3-bit codes are packed 2 per byte: 4 bits
  };
  for (const auto& run : runs) {
    const std::string output = dir + "/" + run.method + ".h5";
    std::vector<std::string> args = {"quantize", "--input", input, "--dataset", "kv/keys", "--role", "value",
                                     "--method", run.method, "--output", output};
    for (const auto& s : run.sets) args.insert(args.end(), {"--set", s});
    const auto result = test::run_cli(args);
    ASSERT_EQ(result.exit_code, 0) << result.err;
    const auto file = h5::File::open_read(output);
    std::vector<hsize_t> shape;
    const auto dequantized = file.read<float>("dequantized", &shape);
    EXPECT_EQ(shape, (std::vector<hsize_t>{4, 64, 64})) << run.method;
    EXPECT_EQ(file.shape("codes"), (std::vector<hsize_t>{4, 64, 64})) << run.method;
    EXPECT_EQ(file.shape("rows/E_T"), (std::vector<hsize_t>{4, 64})) << run.method;
    EXPECT_NEAR(file.attribute<double>("bits_per_element"), run.bits, 1e-12) << run.method;
    EXPECT_EQ(file.attribute<std::string>("method"), run.method);
    // The per-row errors are consistent with the stored tensors and with each other.
    const auto input_values = h5::File::open_read(input).read<float>("kv/keys");
    const auto e_t = file.read<double>("rows/E_T");
    const auto e_m = file.read<double>("rows/E_M");
    const auto e_d = file.read<double>("rows/E_D");
    double signal = 0, total = 0;
    for (size_t row = 0; row < e_t.size(); ++row) {
      double direct = 0;
      for (size_t c = 0; c < 64; ++c) {
        const double diff = static_cast<double>(input_values[row * 64 + c]) - dequantized[row * 64 + c];
        direct += diff * diff;
        signal += static_cast<double>(input_values[row * 64 + c]) * input_values[row * 64 + c];
      }
      EXPECT_NEAR(e_t[row], direct, 1e-9 * std::max(1.0, direct)) << run.method << " row " << row;
      EXPECT_NEAR(e_m[row] + e_d[row], e_t[row], 1e-6 * e_t[row] + 1e-9) << run.method << " row " << row;
      total += direct;
    }
    EXPECT_NEAR(file.attribute<double>("relative_mse"), total / signal, 1e-9) << run.method;
    EXPECT_GT(total, 0) << run.method;
  }
}

// `--set wrap=equal_error_*` writes the wrapped method's dequantized rows: all of their error in one part.
TEST(QuantizeCli, EqualErrorWrappersWriteTheirRows) {
  const std::string dir = test::scratch_dir();
  const std::string input = write_input(dir);
  for (const std::string wrap : {"equal_error_scale", "equal_error_direction"}) {
    const std::string output = dir + "/" + wrap + ".h5";
    const auto result = test::run_cli({"quantize", "--input", input, "--dataset", "kv/keys", "--role", "key", "--method",
                                       "kvarn", "--set", "tile_size=64", "--set", "preset=k2v2", "--set",
                                       "wrap=" + wrap, "--output", output});
    ASSERT_EQ(result.exit_code, 0) << result.err;
    const auto file = h5::File::open_read(output);
    EXPECT_EQ(file.attribute<std::string>("param.wrap"), wrap);
    const auto e_t = file.read<double>("rows/E_T"), e_m = file.read<double>("rows/E_M"), e_d = file.read<double>("rows/E_D");
    const auto& kept = wrap == "equal_error_scale" ? e_m : e_d;
    for (size_t row = 0; row < e_t.size(); ++row) {
      ASSERT_GT(e_t[row], 0) << row;
      EXPECT_NEAR(kept[row], e_t[row], 1e-4 * e_t[row]) << wrap << " row " << row;
    }
  }
}

// Float16 scales of values beyond 65504 overflow to inf: the parameters say how many, and a warning
// says so, instead of an output that looks like any other.
TEST(QuantizeCli, ParametersTheStorageDtypeCannotHoldAreReported) {
  const std::string dir = test::scratch_dir();
  auto x = torch::ones({1, 64, 64}) * 1e6;
  x.select(2, 0).fill_(-1e6);
  const std::string input = dir + "/huge.h5";
  h5::File::create(input, true).write("x", x.data_ptr<float>(), {1, 64, 64});
  const std::string output = dir + "/out.h5";
  const auto result = test::run_cli({"quantize", "--input", input, "--dataset", "x", "--role", "value", "--method",
                                     "kivi", "--set", "group_size=64", "--output", output});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.err.find("kivi: 64 of 64 stored parameters 'scale' exceed float16's largest finite value"),
            std::string::npos)
      << result.err;
  const auto file = h5::File::open_read(output);
  EXPECT_EQ(file.open_dataset("params/scale").attribute<int64_t>("saturated"), 64);
  EXPECT_EQ(file.open_dataset("params/minimum").attribute<int64_t>("saturated"), 64);
}

TEST(QuantizeCli, CachePolicyFullKeepsSinkAndTailOfAStoriesPrefill) {
  const std::string dir = test::scratch_dir();
  const std::string model = test::stories260k_dir();
  const std::string kv = dir + "/kv.h5";
  auto dump = test::run_cli({"dump-kv", "--model", model + "/stories260K.bin", "--tokenizer", model + "/tok512.bin",
                             "--prompt", "Once upon a time, there was a little girl named Lily. She loved to play "
                             "outside in the park with her big red ball and her friend Tom.",
                             "--output", kv});
  ASSERT_EQ(dump.exit_code, 0) << dump.err;
  const auto tokens = h5::File::open_read(kv).read<int64_t>("tokens");
  const auto n = static_cast<int64_t>(tokens.size());
  ASSERT_GT(n, 16);
  EXPECT_EQ(h5::File::open_read(kv).shape("layer2/keys"), (std::vector<hsize_t>{4, static_cast<hsize_t>(n), 8}));
  const std::string out = dir + "/kvarn.h5";
  auto result = test::run_cli({"quantize", "--input", kv, "--dataset", "layer2/keys", "--role", "key", "--method",
                               "kvarn", "--set", "tile_size=8", "--cache-policy", "full", "--output", out});
  ASSERT_EQ(result.exit_code, 0) << result.err;
  // Sink = block 0 (8 tokens); complete blocks after it are quantized; the partial block is the tail.
  EXPECT_EQ(h5::File::open_read(out).attribute<std::vector<int64_t>>("quantized_positions"),
            (std::vector<int64_t>{8, n / 8 * 8}));
  const auto e_t = h5::File::open_read(out).read<double>("rows/E_T");
  for (int64_t head = 0; head < 4; ++head) {
    for (int64_t t = 0; t < n; ++t) {
      const bool quantized = t >= 8 && t < n / 8 * 8;
      if (quantized) EXPECT_GT(e_t[head * n + t], 0) << "position " << t;
      else EXPECT_EQ(e_t[head * n + t], 0) << "position " << t;
    }
  }
}

TEST(QuantizeCli, BadInputGetsOneClearError) {
  const std::string dir = test::scratch_dir();
  const std::string input = write_input(dir);
  auto quantize = [&](std::vector<std::string> extra, const std::string& dataset = "kv/keys") {
    std::vector<std::string> args = {"quantize", "--input", input, "--dataset", dataset, "--role", "key",
                                     "--output", dir + "/out.h5"};
    args.insert(args.end(), extra.begin(), extra.end());
    return test::run_cli(args);
  };
  expect_error(quantize({"--method", "kivi"}, "kv/missing"), "dataset '/kv/missing' does not exist");
  expect_error(quantize({"--method", "kivi"}, "flat"), "dataset 'flat' has rank 1, expected 3");
  expect_error(quantize({"--method", "kivi"}, "empty"),
               "dataset 'empty' has shape [4, 32, 0]; every dimension must be at least 1");
  expect_error(quantize({"--method", "kivi"}, "nan"),
               "dataset 'nan' holds a non-finite value (nan at flat index 4227); quantizers need finite input");
  expect_error(quantize({"--method", "kivy"}), "unknown quantizer method 'kivy'");
  expect_error(quantize({"--method", "kivi", "--set", "k_bit=2"}), "unknown parameter 'k_bit'");
  expect_error(quantize({"--method", "rtn", "--set", "k_bits=12"}), "k_bits = 12 is out of range [1, 8]");
  expect_error(quantize({"--method", "rtn", "--set", "group_size=48"}), "group_size 48 does not divide head_dim 64");
  expect_error(quantize({"--method", "kvarn"}), "128");  // 64 tokens are not a tile of 128
  expect_error(quantize({"--method", "rtn", "--set", "k_bits"}), "--set 'k_bits' is not of the form key=value");
  EXPECT_FALSE(std::filesystem::exists(dir + "/out.h5"));
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

// An output is a regular file or absent, never one of the inputs, and replaced only when asked; a
// refused output leaves every file as it was.
TEST(QuantizeCli, OutputsAreNeverDestroyed) {
  const std::string dir = test::scratch_dir();
  const std::string input = write_input(dir);
  const std::string before = test::read_file(input);
  auto quantize = [&](const std::string& output, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"quantize", "--input", input, "--dataset", "kv/keys", "--role", "key",
                                     "--method", "rtn", "--output", output};
    args.insert(args.end(), extra.begin(), extra.end());
    return test::run_cli(args);
  };
  test::expect_one_error_line(quantize(input, {"--overwrite"}), "--output " + input + " is the same file as the input " +
                                                                   input + "; name another output");
  std::filesystem::create_symlink(input, dir + "/link.h5");
  test::expect_one_error_line(quantize(dir + "/link.h5", {"--overwrite"}), "is the same file as the input");
  test::expect_one_error_line(quantize("/dev/null", {"--overwrite"}),
                              "--output /dev/null exists and is not a regular file; name a file");
  test::expect_one_error_line(quantize(dir, {"--overwrite"}), "--output " + dir + " exists and is not a regular file");
  test::expect_one_error_line(quantize(""), "--output must name a file");
  EXPECT_EQ(test::read_file(input), before);

  ASSERT_EQ(quantize(dir + "/out/new.h5").exit_code, 0);  // a missing folder is made
  test::write_file(dir + "/mine.h5", "keep me");
  test::expect_one_error_line(quantize(dir + "/mine.h5"), "--output " + dir + "/mine.h5 exists; pass --overwrite to "
                                                          "replace it");
  EXPECT_EQ(test::read_file(dir + "/mine.h5"), "keep me");
  EXPECT_EQ(quantize(dir + "/mine.h5", {"--overwrite"}).exit_code, 0);
  EXPECT_NE(test::read_file(dir + "/mine.h5"), "keep me");

  const std::string model = test::stories260k_dir();
  const auto dump = test::run_cli({"dump-kv", "--model", model + "/stories260K.bin", "--tokenizer",
                                   model + "/tok512.bin", "--prompt", "Hi", "--output", dir + "/mine.h5"});
  test::expect_one_error_line(dump, "--output " + dir + "/mine.h5 exists; pass --overwrite to replace it");
  // A tokenizer whose ids the model has no embeddings for (SmolLM2's 49,152 vs stories260K's 512).
  const auto mismatched = test::run_cli({"dump-kv", "--model", model + "/stories260K.bin", "--tokenizer",
                                         test::smollm2_dir(), "--prompt", "Hi", "--output", dir + "/kv.h5"});
  test::expect_one_error_line(mismatched, test::smollm2_dir() +
                                              ": the tokenizer has 49152 tokens but the model's vocabulary has only "
                                              "512 ids");
  EXPECT_FALSE(std::filesystem::exists(dir + "/kv.h5"));

  // generate --logits follows the same rule.
  auto generate = [&](const std::string& logits, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"generate", "--model", model + "/stories260K.bin", "--tokenizer",
                                     model + "/tok512.bin", "--prompt", "Hi", "--steps", "2", "--logits", logits};
    args.insert(args.end(), extra.begin(), extra.end());
    return test::run_cli(args);
  };
  test::expect_one_error_line(generate(dir + "/mine.h5"), "--logits " + dir + "/mine.h5 exists; pass --overwrite to "
                                                          "replace it");
  test::expect_one_error_line(generate("/dev/null", {"--overwrite"}),
                              "--logits /dev/null exists and is not a regular file; name a file");
  test::expect_one_error_line(generate(model + "/tok512.bin", {"--overwrite"}), "is the same file as the input");
  test::expect_one_error_line(generate(""), "--logits must name a file");
  ASSERT_EQ(generate(dir + "/logits.h5").exit_code, 0);
  EXPECT_EQ(h5::File::open_read(dir + "/logits.h5").shape("logits"), (std::vector<hsize_t>{2, 512}));
  EXPECT_FALSE(std::filesystem::exists(dir + "/logits.h5.partial"));
}

// One writer per output for the commands that write a whole file: while another process holds
// OUTPUT.lock (here this test, a real other process to the kvdrift it starts), quantize, dump-kv and
// generate --logits are refused naming it, and change nothing. A file that appears at the output
// while one writes (made by something that takes no lock) is kept unless --overwrite was given.
TEST(OutputRules, OneWriterPerOutputAndNoReplacementUnasked) {
  const std::string dir = test::scratch_dir();
  const std::string input = write_input(dir);
  const std::string model = test::stories260k_dir();
  const std::string output = dir + "/out.h5";
  const std::vector<std::vector<std::string>> writers = {
      {"quantize", "--input", input, "--dataset", "kv/keys", "--role", "key", "--method", "rtn", "--output", output},
      {"dump-kv", "--model", model + "/stories260K.bin", "--tokenizer", model + "/tok512.bin", "--prompt", "Hi",
       "--output", output},
      {"generate", "--model", model + "/stories260K.bin", "--tokenizer", model + "/tok512.bin", "--prompt", "Hi",
       "--steps", "2", "--logits", output}};
  {
    const WriterLock held(output + ".lock", "the test", "");
    for (const auto& args : writers) {
      test::expect_one_error_line(test::run_cli(args),
                                  fmt::format("{} is held by another kvdrift (pid {} on host {}; lock file {}.lock): "
                                              "wait for it to end, or name another output",
                                              output, ::getpid(), test::host_name(), output),
                                  /*empty_stdout=*/false);
      EXPECT_FALSE(std::filesystem::exists(output));
      EXPECT_FALSE(std::filesystem::exists(output + ".partial"));
    }
  }
  for (bool replace : {false, true}) {
    std::filesystem::remove(output);
    const auto write = [&] {
      h5::write_new_file(output, replace, [&](h5::File& file) {
        file.set_attribute("writer", "this one");
        test::write_file(output, "made meanwhile");
      });
    };
    if (replace) {
      write();
      EXPECT_EQ(h5::File::open_read(output).attribute<std::string>("writer"), "this one");
    } else {
      EXPECT_EQ(test::error_message(write), output + " was created by another process while this command wrote it; "
                                                     "pass --overwrite to replace it");
      EXPECT_EQ(test::read_file(output), "made meanwhile");
    }
    EXPECT_FALSE(std::filesystem::exists(output + ".partial"));
    EXPECT_FALSE(std::filesystem::exists(output + ".lock"));
  }
}

// Inputs are never outputs, at any depth: every file under a model directory, and the chat-template
// files beside a tokenizer file, are inputs of dump-kv and generate --logits (compared by device and
// inode, links followed), refused even with --overwrite and left as they were. convert refuses to write
// its files over its input, and replaces a link among them rather than writing through it.
TEST(OutputRules, FilesAModelDirectoryOrATokenizerBringAreInputs) {
  const std::string dir = test::scratch_dir();
  const std::string model = test::stories260k_dir();
  const std::string hf = dir + "/hf";
  ASSERT_EQ(test::run_cli({"convert", "--from", "llama2c", model + "/stories260K.bin", "--to", "hf", hf}).exit_code, 0);
  const std::string weights = test::read_file(hf + "/model.safetensors");
  test::expect_one_error_line(
      test::run_cli({"dump-kv", "--model", hf, "--tokenizer", model + "/tok512.bin", "--prompt", "Hi", "--output",
                     hf + "/model.safetensors", "--overwrite"}),
      "--output " + hf + "/model.safetensors is the same file as the input " + hf +
          "/model.safetensors; name another output");
  test::write_file(hf + "/notes/readme.txt", "keep me");
  test::expect_one_error_line(
      test::run_cli({"generate", "--model", hf, "--tokenizer", model + "/tok512.bin", "--prompt", "Hi", "--steps", "1",
                     "--logits", hf + "/notes/readme.txt", "--overwrite"}),
      "--logits " + hf + "/notes/readme.txt is the same file as the input " + hf + "/notes/readme.txt");
  EXPECT_EQ(test::read_file(hf + "/model.safetensors"), weights);
  EXPECT_EQ(test::read_file(hf + "/notes/readme.txt"), "keep me");

  // The template beside a tokenizer.json given on its own.
  const std::string smollm2 = test::smollm2_dir();
  std::filesystem::create_directories(dir + "/tok");
  for (const std::string name : {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})
    std::filesystem::copy_file(smollm2 + "/" + name, dir + "/tok/" + name);
  const std::string jinja = test::read_file(dir + "/tok/chat_template.jinja");
  test::expect_one_error_line(
      test::run_cli({"generate", "--model", smollm2, "--tokenizer", dir + "/tok/tokenizer.json", "--chat", "--prompt",
                     "Hi", "--steps", "1", "--logits", dir + "/tok/chat_template.jinja", "--overwrite"}),
      "--logits " + dir + "/tok/chat_template.jinja is the same file as the input " + dir + "/tok/chat_template.jinja");
  EXPECT_EQ(test::read_file(dir + "/tok/chat_template.jinja"), jinja);

  // convert: a target file that is the input (through a link) is refused; a link to another file is
  // replaced, and that file left alone.
  std::filesystem::copy_file(model + "/stories260K.bin", dir + "/model.bin");
  const std::string checkpoint = test::read_file(dir + "/model.bin");
  std::filesystem::create_directories(dir + "/linked");
  std::filesystem::create_symlink(dir + "/model.bin", dir + "/linked/config.json");
  test::expect_one_error_line(
      test::run_cli({"convert", "--from", "llama2c", dir + "/model.bin", "--to", "hf", dir + "/linked", "--overwrite"}),
      "convert: output " + dir + "/linked/config.json is the same file as the input " + dir +
          "/model.bin; name another output");
  EXPECT_EQ(test::read_file(dir + "/model.bin"), checkpoint);
  test::write_file(dir + "/keep.json", "keep me");
  std::filesystem::create_directories(dir + "/other");
  std::filesystem::create_symlink(dir + "/keep.json", dir + "/other/config.json");
  ASSERT_EQ(
      test::run_cli({"convert", "--from", "llama2c", dir + "/model.bin", "--to", "hf", dir + "/other", "--overwrite"})
          .exit_code,
      0);
  EXPECT_EQ(test::read_file(dir + "/keep.json"), "keep me");
  EXPECT_FALSE(std::filesystem::is_symlink(dir + "/other/config.json"));
  EXPECT_EQ(test::read_file(dir + "/other/config.json"), test::read_file(hf + "/config.json"));
}

}  // namespace
}  // namespace kvdrift
