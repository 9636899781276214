// What scripts/fuzz.sh found (tests/fuzz/), each class kept as a test through the parser's normal API:
// the input is refused with one Error naming the file (or prompt, or --set argument), promptly.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

#include "io/prompts.h"
#include "io/run_config.h"
#include "io/safetensors.h"
#include "model/checkpoint_files.h"
#include "support.h"
#include "sweep/sweep_file.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {
namespace {

// yaml-cpp 0.7 loops forever, building nodes until memory runs out, on a ',' where a document's
// top-level node starts (found as ", 3 KV heads) on CPU" in a mutated run config).
TEST(FuzzRegression, YamlThatLoopsYamlCppIsASyntaxError) {
  const std::string dir = test::scratch_dir();
  const std::vector<std::pair<std::string, int>> texts_and_lines = {
      {", 3 KV heads) on CPU", 1}, {",", 1}, {"[a] ,", 1}, {"{a: 1} ,", 1}, {"# c\n,", 2}, {"&x ,", 1}, {"---\n,", 2}};
  for (const auto& [text, line] : texts_and_lines) {
    test::write_file(dir + "/run.yaml", text);
    EXPECT_EQ(test::error_message([&] { load_run_config(dir + "/run.yaml", {}); }),
              dir + "/run.yaml:" + std::to_string(line) +
                  ": YAML syntax error: the YAML parser makes no progress here (a ',' outside [...] or {...}?)")
        << text;
    test::write_file(dir + "/sweep.yaml", text);
    EXPECT_NE(test::error_message([&] { sweep::load_sweep_file(dir + "/sweep.yaml"); })
                  .find("makes no progress here"),
              std::string::npos)
        << text;
  }
  test::write_file(dir + "/run.yaml", "decoding: {max_new_tokens: 4}\n");
  EXPECT_EQ(test::error_message([&] { load_run_config(dir + "/run.yaml", {"decoding.max_new_tokens=, 4"}); }),
            "--set decoding.max_new_tokens=, 4: the value is not valid YAML: the YAML parser makes no progress here "
            "(a ',' outside [...] or {...}?)");
}

// A JSON number beyond double's range is nlohmann's out_of_range, not a parse_error: it escaped the
// readers as a message naming no file (found in a shard index).
TEST(FuzzRegression, JsonNumberOutOfRangeNamesTheFile) {
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/model.safetensors.index.json", R"({"weight_map": {"a": 1E999999}})");
  EXPECT_EQ(test::error_message([&] { read_hf_shard_list(dir); }),
            dir + "/model.safetensors.index.json: not valid JSON ([json.exception.out_of_range.406] number overflow "
                  "parsing '1E999999')");
  test::write_file(dir + "/config.json", R"({"hidden_size": 1E999999})");
  EXPECT_EQ(test::error_message([&] { read_hf_config(dir); }),
            dir + "/config.json: not valid JSON ([json.exception.out_of_range.406] number overflow parsing '1E999999')");
  test::write_file(dir + "/tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 1E999999}}})");
  EXPECT_NE(test::error_message([&] { load_tokenizer(dir + "/tokenizer.json"); }).find(dir + "/tokenizer.json: "),
            std::string::npos);
  const std::string header = R"({"a": {"dtype": "F32", "shape": [1E999999], "data_offsets": [0, 4]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  test::write_file(dir + "/model.safetensors", file + header + "abcd");
  EXPECT_EQ(test::error_message([&] { SafetensorsFile(dir + "/model.safetensors"); }),
            dir + "/model.safetensors: header is not valid JSON ([json.exception.out_of_range.406] number overflow "
                  "parsing '1E999999')");
}

// nlohmann's get<int64_t>() casts a float beyond int64's range (undefined behaviour; UBSan stopped the
// hf_config harness on it) and wraps an unsigned above INT64_MAX: integer fields refuse both, and a
// float, as the wrong type.
TEST(FuzzRegression, IntegerFieldsRefuseFloatsAndUnsignedBeyondInt64) {
  const std::string dir = test::scratch_dir();
  const std::string rest = R"("intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8)";
  for (const std::string value : {"1e300", "-1e300", "64.0", "18446744073709551615"}) {
    test::write_file(dir + "/config.json", "{\"hidden_size\": " + value + ", " + rest + "}");
    const std::string shown = nlohmann::json::parse(value).dump();
    EXPECT_EQ(test::error_message([&] { read_hf_config(dir); }),
              dir + "/config.json: key 'hidden_size' must be an integer, got " + shown);
  }
  test::write_file(dir + "/config.json", R"({"hidden_size": 8, "eos_token_id": [2, 1e300], )" + rest + "}");
  EXPECT_EQ(test::error_message([&] { read_hf_config(dir); }),
            dir + "/config.json: key 'eos_token_id' must hold integers, got [2,1e+300]");
  test::write_file(dir + "/tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 1e300}, "merges": []}})");
  EXPECT_EQ(test::error_message([&] { load_tokenizer(dir + "/tokenizer.json"); }),
            dir + "/tokenizer.json: token \"a\" has id 1e+300, not an integer");
}

// Text that is not UTF-8 cannot be pre-tokenized by a byte-level BPE tokenizer's regex: the error
// names the prompt (found by the tokenizer_encode harness).
TEST(FuzzRegression, PromptThatIsNotUtf8NamesThePrompt) {
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/prompts.txt", "fine\nhello \xff world\n");
  const auto tokenizer = load_tokenizer(test::smollm2_dir());
  PromptSource source;
  source.kind = PromptKind::TextFile;
  source.path = dir + "/prompts.txt";
  EXPECT_EQ(test::error_message([&] { load_prompts(source, tokenizer.get()); }),
            "prompt prompts:1: " + test::smollm2_dir() + "/tokenizer.json: cannot pre-tokenize text: UTF-8 error: illegal byte (0xfe or 0xff)");
}

}  // namespace
}  // namespace kvdrift
