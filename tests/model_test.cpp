// The LibTorch model against independent oracles: the known-good stories260K text, the Eigen
// double-precision reference forward, and the converted Hugging Face copy of the same weights.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "decode/generate.h"
#include "model/checkpoint.h"
#include "model/ops.h"
#include "reference/llama2c_reference.h"
#include "support.h"

namespace kvdrift {
namespace {

const std::vector<int64_t>& sequence64() {
  // BOS then a fixed pseudo-random walk over the 512-token vocabulary.
  static const std::vector<int64_t> tokens = [] {
    std::vector<int64_t> t = {1};
    while (t.size() < 64) t.push_back((t.back() * 97 + 31) % 512);
    return t;
  }();
  return tokens;
}

torch::Tensor logits_of(const LlamaModel& model, const std::vector<int64_t>& tokens) {
  auto cache = model.make_cache(1, static_cast<int64_t>(tokens.size()));
  return model.forward(torch::tensor(tokens).unsqueeze(0), 0, cache)[0];  // [T, vocab]
}

std::string converted_hf_dir() {
  const std::string dir = test::scratch_dir() + "/hf";
  write_hf_checkpoint(
      read_llama2c_checkpoint(test::stories260k_dir() + "/stories260K.bin", torch::kCPU, torch::kFloat32), dir);
  return dir;
}

TEST(Model, Llama2cLogitsMatchEigenDoubleReference) {
  const std::string path = test::stories260k_dir() + "/stories260K.bin";
  const auto model = load_model(path, torch::kCPU, torch::kFloat32);
  const reference::Llama2cReference oracle(path);
  const auto logits = logits_of(model, sequence64());
  const auto expected = oracle.logits(sequence64());
  ASSERT_EQ(logits.size(0), 64);
  double max_diff = 0;
  for (int64_t t = 0; t < 64; ++t)
    for (int64_t v = 0; v < 512; ++v)
      max_diff = std::max(max_diff, std::abs(logits[t][v].item<double>() - expected[t](v)));
  EXPECT_LE(max_diff, 1e-4);
}

TEST(Model, ConvertedHfCheckpointGivesSameLogits) {
  const auto llama2c = load_model(test::stories260k_dir() + "/stories260K.bin", torch::kCPU, torch::kFloat32);
  const std::string hf_dir = converted_hf_dir();
  const auto hf = load_model(hf_dir, torch::kCPU, torch::kFloat32);
  EXPECT_EQ(hf.source().format, ModelFormat::HuggingFace);
  EXPECT_EQ(hf.config().rope_style, RopeStyle::HalfSplit);
  EXPECT_EQ(llama2c.config().rope_style, RopeStyle::Interleaved);
  const double max_diff = (logits_of(llama2c, sequence64()) - logits_of(hf, sequence64())).abs().max().item<double>();
  EXPECT_LE(max_diff, 1e-4);
}

TEST(Model, IncrementalDecodeMatchesFullRecomputation) {
  const auto model = load_model(test::stories260k_dir() + "/stories260K.bin", torch::kCPU, torch::kFloat32);
  const auto& tokens = sequence64();
  const auto full = logits_of(model, tokens);
  auto cache = model.make_cache(1, 64);
  model.forward(torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.begin() + 40)).unsqueeze(0), 0, cache);
  for (int64_t t = 40; t < 64; ++t) {
    auto step = model.forward(torch::tensor({tokens[t]}).unsqueeze(0), t, cache)[0][0];
    // float32 sums in another order for a one-row matmul: ~1e-6 of logits of magnitude ~10.
    EXPECT_LE((step - full[t]).abs().max().item<double>(), 5e-5) << "position " << t;
  }
}

// Prompts of different lengths in one batch (decoding.batch_prompts): a padded prefill, then decode
// steps with each row at its own position, against the Eigen double-precision reference run on each
// sequence alone. A row that read another position's padding, or rotated at a wrong position, would
// be off by far more than float32 rounding.
TEST(Model, PromptsOfDifferentLengthsInOneBatchMatchTheReferenceAlone) {
  const std::string path = test::stories260k_dir() + "/stories260K.bin";
  const auto model = load_model(path, torch::kCPU, torch::kFloat32);
  const reference::Llama2cReference oracle(path);
  const std::vector<int64_t> prompt = {5, 17, 11};
  const int64_t rows = 3, total = 30, longest = 17;
  std::vector<std::vector<int64_t>> sequences;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> tokens = {1};
    while (static_cast<int64_t>(tokens.size()) < total) tokens.push_back((tokens.back() * (89 + 2 * r) + 7 * r) % 512);
    sequences.push_back(tokens);
  }
  auto cache = model.make_cache(rows, total);
  auto padded = torch::full({rows, longest}, 3, torch::kInt64);  // padding: any token
  for (int64_t r = 0; r < rows; ++r)
    padded[r].narrow(0, 0, prompt[r]).copy_(torch::tensor(sequences[r]).narrow(0, 0, prompt[r]));
  auto logits = model.forward(padded, RowSpans(std::vector<int64_t>(rows, 0), prompt, longest, torch::kCPU, Phase::Prefill), cache,
                              /*last_only=*/true);
  ASSERT_EQ(logits.sizes(), (c10::IntArrayRef{rows, 1, 512}));
  std::vector<std::vector<Eigen::VectorXd>> expected;
  for (const auto& tokens : sequences) expected.push_back(oracle.logits(tokens));
  for (int64_t step = 0; prompt[1] + step < total; ++step) {
    std::vector<int64_t> next, starts;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t position = prompt[r] + step - 1;  // the logits just computed are at this position
      double max_diff = 0;
      for (int64_t v = 0; v < 512; ++v)
        max_diff = std::max(max_diff, std::abs(logits[r][0][v].item<double>() - expected[r][position](v)));
      EXPECT_LE(max_diff, 1e-4) << "row " << r << " position " << position;
      next.push_back(sequences[r][position + 1]);
      starts.push_back(position + 1);
    }
    logits = model.forward(torch::tensor(next).unsqueeze(1), RowSpans(starts, {1, 1, 1}, 1, torch::kCPU, Phase::Decode), cache,
                           /*last_only=*/true);
  }
}

// Reduced precision against float32 on the same sequence. Stated tolerance: bfloat16 (8-bit
// mantissa, so ~0.4% per rounding) keeps every logit within 0.75 of float32 and agrees on the top-1
// token at >= 60 of 64 positions.
// MKL's pre-packed GEMM (model/linear.h): the weights are packed once a forward's row count has come
// kStableForwards times in a row, and packed or plain, every row's logits stay within float32 rounding
// of the Eigen double-precision reference run on its sequence alone.
TEST(Model, PrePackedWeightsKeepTheLogitsOfTheReference) {
  const std::string path = test::stories260k_dir() + "/stories260K.bin";
  const reference::Llama2cReference oracle(path);
  auto packed = load_model(path, torch::kCPU, torch::kFloat32);
  auto plain = load_model(path, torch::kCPU, torch::kFloat32);
  packed.set_gemm_path(GemmPath::Packed);
  plain.set_gemm_path(GemmPath::Plain);
  ASSERT_TRUE(packed_gemm_available(torch::ones({2, 2})));  // the PyPI LibTorch on x86-64 has MKL
  const int64_t rows = 6, prompt = 4, total = 4 + 2 * LlamaModel::kStableForwards;
  std::vector<std::vector<int64_t>> sequences;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> tokens = {1};
    while (static_cast<int64_t>(tokens.size()) < total) tokens.push_back((tokens.back() * (61 + 4 * r) + 5 * r) % 512);
    sequences.push_back(tokens);
  }
  auto tokens_at = [&](int64_t start, int64_t width) {
    auto t = torch::empty({rows, width}, torch::kInt64);
    for (int64_t r = 0; r < rows; ++r) t[r].copy_(torch::tensor(sequences[r]).narrow(0, start, width));
    return t;
  };
  auto packed_cache = packed.make_cache(rows, total), plain_cache = plain.make_cache(rows, total);
  packed.forward(tokens_at(0, prompt), 0, packed_cache);
  plain.forward(tokens_at(0, prompt), 0, plain_cache);
  std::vector<std::vector<Eigen::VectorXd>> expected;
  for (const auto& sequence : sequences) expected.push_back(oracle.logits(sequence));
  double max_oracle_diff = 0, max_path_diff = 0;
  for (int64_t position = prompt; position < total; ++position) {
    const auto step = packed.forward(tokens_at(position, 1), position, packed_cache);
    const auto reference = plain.forward(tokens_at(position, 1), position, plain_cache);
    const int64_t forwards = position - prompt + 1;  // decode forwards of 6 rows so far
    EXPECT_EQ(packed.packed_rows(), forwards >= LlamaModel::kStableForwards ? rows : 0) << "forward " << forwards;
    EXPECT_EQ(plain.packed_rows(), 0);
    max_path_diff = std::max(max_path_diff, (step - reference).abs().max().item<double>());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t v = 0; v < 512; ++v)
        max_oracle_diff = std::max(max_oracle_diff, std::abs(step[r][0][v].item<double>() - expected[r][position](v)));
  }
  EXPECT_LE(max_oracle_diff, 1e-4);
  // Measured 1.2e-5 on an Intel Xeon (logits ~10: some 13 units in float32's last place, five layers
  // of differently ordered sums); another CPU's kernels round otherwise, so the bound is the oracle's.
  EXPECT_LE(max_path_diff, 1e-4);
  // Choosing plain drops the packed copy, and so does a prefill (a new batch: which of its steps run
  // packed must not depend on the batches before it); fewer rows than kMinPackedRows never pack.
  packed.set_gemm_path(GemmPath::Plain);
  EXPECT_EQ(packed.packed_rows(), 0);
  packed.set_gemm_path(GemmPath::Packed);
  for (int64_t position = total; position < total + LlamaModel::kStableForwards; ++position)
    packed.forward(tokens_at(0, 1), position - total + prompt, packed_cache);  // decode rows again: repacked
  EXPECT_EQ(packed.packed_rows(), rows);
  auto small = packed.make_cache(LlamaModel::kMinPackedRows - 1, 2 * LlamaModel::kStableForwards);
  const auto small_tokens = torch::full({LlamaModel::kMinPackedRows - 1, 1}, 7, torch::kInt64);
  packed.forward(small_tokens, 0, small);  // a one-token prefill
  EXPECT_EQ(packed.packed_rows(), 0);
  for (int64_t position = 1; position < 2 * LlamaModel::kStableForwards; ++position)
    packed.forward(small_tokens, position, small);
  EXPECT_EQ(packed.packed_rows(), 0);
}

TEST(Model, Bfloat16StaysWithinStatedTolerance) {
  const std::string path = test::stories260k_dir() + "/stories260K.bin";
  const auto fp32 = logits_of(load_model(path, torch::kCPU, torch::kFloat32), sequence64());
  const auto bf16 = logits_of(load_model(path, torch::kCPU, torch::kBFloat16), sequence64());
  EXPECT_LE((bf16 - fp32).abs().max().item<double>(), 0.75);
  EXPECT_GE(bf16.argmax(-1).eq(fp32.argmax(-1)).sum().item<int64_t>(), 60);
  std::cerr << "bfloat16 vs float32: max |logit diff| " << (bf16 - fp32).abs().max().item<double>() << ", top-1 agree "
            << bf16.argmax(-1).eq(fp32.argmax(-1)).sum().item<int64_t>() << "/64\n";
}

// LibTorch 2.x has a float16 matmul on CPU as on CUDA. Measured on CPU (LibTorch 2.12): max
// difference 0.074.
TEST(Model, Float16RunsWithinToleranceOfFloat32) {
  const std::string path = test::stories260k_dir() + "/stories260K.bin";
  const auto fp32 = logits_of(load_model(path, torch::kCPU, torch::kFloat32), sequence64());
  const auto fp16 = logits_of(load_model(path, torch::kCPU, torch::kFloat16), sequence64());
  EXPECT_LE((fp16 - fp32).abs().max().item<double>(), 0.2);
  EXPECT_GE(fp16.argmax(-1).eq(fp32.argmax(-1)).sum().item<int64_t>(), 62);
}

TEST(Model, GreedyGenerationReproducesKnownGoodText) {
  const std::string dir = test::stories260k_dir();
  const std::string expected = test::read_file(dir + "/expected_greedy_200steps.txt");
  for (const std::string& model_path : {dir + "/stories260K.bin", converted_hf_dir()}) {
    const auto result =
        test::run_cli({"generate", "--model", model_path, "--tokenizer", dir + "/tok512.bin", "--steps", "200"});
    EXPECT_EQ(result.exit_code, 0) << result.err;
    EXPECT_EQ(result.out, expected + "\n") << "through " << model_path;
  }
}

// Published parameter counts of the real checkpoints (their model cards / safetensors totals).
TEST(Model, SyntheticModelsHaveTheShapesOfRealOnes) {
  EXPECT_EQ(parameter_count(synthetic_config("llama-3.2-1b")), 1235814400);
  EXPECT_EQ(parameter_count(synthetic_config("llama-3.1-8b")), 8030261248);
  EXPECT_EQ(parameter_count(synthetic_config("qwen2.5-1.5b")), 1543714304);
  EXPECT_EQ(parameter_count(synthetic_config("qwen3-4b")), 4022468096);
  const auto qwen3 = synthetic_config("qwen3-4b");
  EXPECT_EQ(qwen3.head_dim, 128);
  EXPECT_EQ(qwen3.q_dim(), 4096);  // wider than hidden_size 2560
  EXPECT_TRUE(qwen3.qk_norm);
  EXPECT_TRUE(synthetic_config("qwen2.5-1.5b").attention_bias);
  EXPECT_EQ(synthetic_config("llama-3.2-1b").kv_dim(), 512);
  EXPECT_THROW(synthetic_config("llama-9"), Error);
}

TEST(Model, TinySyntheticDecodesOneStepDeterministically) {
  const auto model = load_model("synthetic:tiny", torch::kCPU, torch::kFloat32, 7);
  auto cache = model.make_cache(2, 8);
  auto prompt = torch::tensor({3, 4, 5, 6, 7, 8}, torch::kInt64).view({2, 3});
  auto prefill = model.forward(prompt, 0, cache);
  EXPECT_EQ(prefill.sizes(), torch::IntArrayRef({2, 3, 256}));
  auto step = model.forward(prefill.narrow(1, 2, 1).argmax(-1), 3, cache);
  EXPECT_EQ(step.sizes(), torch::IntArrayRef({2, 1, 256}));
  EXPECT_TRUE(step.isfinite().all().item<bool>());
  // Same seed, same weights; another seed, other weights.
  const auto same = load_model("synthetic:tiny", torch::kCPU, torch::kFloat32, 7);
  const auto other = load_model("synthetic:tiny", torch::kCPU, torch::kFloat32, 8);
  auto again = same.make_cache(2, 8);
  EXPECT_TRUE(same.forward(prompt, 0, again).equal(prefill));
  auto third = other.make_cache(2, 8);
  EXPECT_FALSE(other.forward(prompt, 0, third).equal(prefill));
}

// A declared context of 2^24 positions (the config.json bound) costs no tables up front (they took
// ~17 GB): they grow with the positions a forward reaches. Growing is exact because a position's row
// does not depend on the table's length.
TEST(Model, RopeTablesGrowWithThePositionsReached) {
  Checkpoint huge = synthetic_checkpoint("tiny", 7, torch::kCPU, torch::kFloat32);
  huge.config.max_seq_len = int64_t{1} << 24;
  const ModelSource source = load_model("synthetic:tiny", torch::kCPU, torch::kFloat32, 7).source();
  LlamaModel model(huge.config, huge.weights, source, torch::kCPU, torch::kFloat32);
  EXPECT_EQ(model.rope_positions(), 4096);
  auto cache = model.make_cache(1, 4100);
  const auto prompt = torch::tensor({3, 4, 5}, torch::kInt64).view({1, 3});
  model.forward(prompt, 0, cache);
  EXPECT_EQ(model.rope_positions(), 4096);
  EXPECT_TRUE(model.forward(prompt.narrow(1, 0, 1), 4097, cache).isfinite().all().item<bool>());
  EXPECT_EQ(model.rope_positions(), 8192);
  const auto longer = ops::rope_tables(huge.config, 8192, torch::kCPU);
  const auto shorter = ops::rope_tables(huge.config, 4096, torch::kCPU);
  EXPECT_TRUE(longer.cos.narrow(0, 0, 4096).equal(shorter.cos));
  EXPECT_TRUE(longer.sin.narrow(0, 0, 4096).equal(shorter.sin));
}

TEST(KVCache, WritesInPlaceAndRefusesOverflow) {
  StaticKVCache cache(2, 1, 2, 4, 8, torch::kFloat32, torch::kCPU);
  auto k = torch::ones({1, 2, 3, 8});
  auto [keys, values] = cache.update(1, 0, k, 2 * k);
  EXPECT_EQ(keys.sizes(), torch::IntArrayRef({1, 2, 3, 8}));
  const void* storage = keys.data_ptr();
  auto [keys2, values2] = cache.update(1, 3, 3 * torch::ones({1, 2, 1, 8}), torch::zeros({1, 2, 1, 8}));
  EXPECT_EQ(keys2.data_ptr(), storage);  // same buffer: nothing reallocated
  EXPECT_EQ(keys2.size(2), 4);
  EXPECT_EQ(keys2[0][1][3][0].item<float>(), 3.0f);
  EXPECT_EQ(values2[0][0][2][5].item<float>(), 2.0f);
  const std::string message = test::error_message([&] {
    cache.update(0, 4, torch::ones({1, 2, 1, 8}), torch::ones({1, 2, 1, 8}));
  });
  EXPECT_NE(message.find("capacity of 4 positions exceeded"), std::string::npos) << message;
}

// A sliding window in use caps the context (within it, windowed attention is full attention); a
// Qwen config's window counts only with use_sliding_window.
TEST(ModelConfig, SlidingWindowInUseCapsTheContext) {
  auto config_json = [](const std::string& type, const std::string& extra) {
    return nlohmann::json::parse(R"({"model_type": ")" + type +
                                 R"(", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32, "max_position_embeddings": 32768)" +
                                 extra + "}");
  };
  EXPECT_EQ(config_from_hf_json(config_json("mistral", R"(, "sliding_window": 4096)"), "c").max_seq_len, 4096);
  EXPECT_EQ(config_from_hf_json(config_json("mistral", R"(, "sliding_window": null)"), "c").max_seq_len, 32768);
  EXPECT_EQ(config_from_hf_json(config_json("mistral", R"(, "sliding_window": 65536)"), "c").max_seq_len, 32768);
  EXPECT_EQ(config_from_hf_json(config_json("qwen2", R"(, "sliding_window": 4096, "use_sliding_window": false)"), "c")
                .max_seq_len,
            32768);
  EXPECT_EQ(config_from_hf_json(config_json("qwen2", R"(, "sliding_window": 4096, "use_sliding_window": true)"), "c")
                .max_seq_len,
            4096);
  EXPECT_EQ(test::error_message([&] { config_from_hf_json(config_json("llama", R"(, "sliding_window": 0)"), "c"); }),
            "c: impossible sliding_window = 0");
}

// config.json as transformers 5 normalizes it (the logits against transformers' on every variant:
// tests/oracle/test_model_files.py): both RoPE layouts, the older key names, the defaults of each
// model_type's config class, and refusals where transformers refuses or computes what kvdrift cannot.
TEST(ModelConfig, ReadsBothLayoutsAsTransformers5Does) {
  auto read = [](const std::string& type, const std::string& extra) {
    return config_from_hf_json(nlohmann::json::parse(R"({"model_type": ")" + type + R"(", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32)" + extra + "}"),
                               "c");
  };
  EXPECT_EQ(read("llama", "").rope_theta, 10000.0);
  EXPECT_EQ(read("llama", R"(, "rope_theta": 100000.0)").rope_theta, 100000.0);
  EXPECT_EQ(read("llama", R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5})").rope_theta, 5e5);
  // rope_parameters without rope_theta takes the top-level one (SmolLM2's 100000 was read as 10000).
  EXPECT_EQ(read("llama", R"(, "rope_theta": 100000.0, "rope_parameters": {"rope_type": "default"})").rope_theta,
            100000.0);
  EXPECT_EQ(read("llama", R"(, "rope_theta": 7.0, "rope_parameters": {"rope_theta": 5e5})").rope_theta, 5e5);
  // A non-empty rope_scaling replaces rope_parameters whole, rope_theta included.
  const auto replaced = read("llama", R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
      "rope_scaling": {"type": "linear", "factor": 2.0})");
  EXPECT_EQ(replaced.rope_scaling.type, RopeScalingType::Linear);
  EXPECT_EQ(replaced.rope_scaling.factor, 2.0);
  EXPECT_EQ(replaced.rope_theta, 10000.0);
  EXPECT_EQ(read("llama", R"(, "rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 3.0})")
                .rope_scaling.factor,
            3.0);
  // llama3's original context defaults to max_position_embeddings, not 8192.
  const auto llama3 = read("llama", R"(, "max_position_embeddings": 4096, "rope_scaling": {"rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})");
  EXPECT_EQ(llama3.rope_scaling.original_max_position, 4096);
  // The defaults of each model_type's config class.
  const std::string two_kv_heads = R"(, "num_key_value_heads": 2)";
  EXPECT_EQ(read("qwen3", two_kv_heads).head_dim, 128);
  EXPECT_EQ(test::error_message([&] { read("qwen2", ""); }), "c: n_heads = 4 is not a multiple of n_kv_heads = 32");
  EXPECT_EQ(read("qwen2", R"(, "num_key_value_heads": null)").n_kv_heads, 4);
  EXPECT_EQ(read("mistral", two_kv_heads).max_seq_len, 4096);  // its default sliding window
  EXPECT_TRUE(read("qwen2", R"(, "num_key_value_heads": 2, "attention_bias": false)").attention_bias);
  EXPECT_FALSE(read("mistral", R"(, "num_key_value_heads": 2, "attention_bias": true)").attention_bias);
  const std::vector<std::pair<std::string, std::string>> refused = {
      {R"(, "rope_scaling": {"rope_type": "linear"})", "c rope_scaling: missing required key 'factor'"},
      {R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0})",
       "c rope_scaling: missing required key 'low_freq_factor'"},
      {R"(, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0})",
       "c rope_parameters: unsupported rope_type 'dynamic' (supported: default, linear, llama3)"},
      {R"(, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})",
       "c rope_parameters: partial_rotary_factor = 0.5 is not supported (kvdrift rotates every channel)"},
      {R"(, "rope_scaling": "linear")", "c: key 'rope_scaling' must be a JSON object, got \"linear\""},
      {R"(, "hidden_act": "gelu")", "c: hidden_act 'gelu' is not supported (kvdrift's MLP applies silu)"},
      {R"(, "mlp_bias": true)", "c: mlp_bias = true is not supported (kvdrift's MLP has no biases)"},
      {R"(, "attention_bias": true)",
       "c: attention_bias = true is not supported for model_type llama (it biases o_proj too, which kvdrift's "
       "attention lacks)"},
  };
  for (const auto& [extra, message] : refused)
    EXPECT_EQ(test::error_message([&] { read("llama", extra); }), message) << extra;
}

TEST(Rope, Llama3ScalingKeepsHighAndSlowsLowFrequencies) {
  auto config = synthetic_config("llama-3.1-8b");
  auto unscaled = config;
  unscaled.rope_scaling = {};
  const auto scaled = ops::rope_inverse_frequencies(config);
  const auto plain = ops::rope_inverse_frequencies(unscaled);
  ASSERT_EQ(scaled.size(), 64u);
  EXPECT_DOUBLE_EQ(scaled[0], 1.0);               // wavelength 2*pi < 8192/4: untouched
  EXPECT_DOUBLE_EQ(scaled[63], plain[63] / 8.0);  // wavelength > 8192: divided by factor
  for (size_t i = 0; i < scaled.size(); ++i) {
    EXPECT_LE(scaled[i], plain[i] * (1 + 1e-15));
    EXPECT_GE(scaled[i], plain[i] / 8.0 * (1 - 1e-15));
  }
}

TEST(Sampler, SeededSamplingIsReproducibleAndTopKOneIsGreedy) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  auto logits = torch::randn({512}, generator, torch::kFloat32);
  auto draw = [&](SamplingConfig config) {
    Sampler sampler(config);
    std::vector<int64_t> tokens;
    for (int i = 0; i < 50; ++i) tokens.push_back(sampler.next(logits));
    return tokens;
  };
  const auto a = draw({1.0, 0.9, 0, 42});
  EXPECT_EQ(a, draw({1.0, 0.9, 0, 42}));
  EXPECT_NE(a, draw({1.0, 0.9, 0, 43}));
  const int64_t best = logits.argmax().item<int64_t>();
  for (int64_t t : draw({1.0, 1.0, 1, 5})) EXPECT_EQ(t, best);
  // top_p keeps the smallest prefix reaching the mass: every draw lies inside it.
  auto probs = torch::softmax(logits.to(torch::kFloat64), 0);
  auto sorted = std::get<0>(probs.sort(0, /*descending=*/true));
  const int64_t nucleus = (sorted.cumsum(0) < 0.5).sum().item<int64_t>() + 1;
  for (int64_t t : draw({1.0, 0.5, 0, 9})) EXPECT_GE(probs[t].item<double>(), sorted[nucleus - 1].item<double>());
  EXPECT_THROW(Sampler({-1.0, 1.0, 0, 0}), Error);
  EXPECT_THROW(Sampler({1.0, 0.0, 0, 0}), Error);
}

}  // namespace
}  // namespace kvdrift

namespace kvdrift {
namespace {

// FIPS 180-4 test vectors, and the published checksum of the shared stories260K checkpoint.
TEST(Sha256, KnownDigests) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(sha256_file(test::stories260k_dir() + "/stories260K.bin"),
            "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696");
}

}  // namespace
}  // namespace kvdrift
