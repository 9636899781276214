// Chat templates: where they are read from, which are recognised, what they render, and the errors.
// (That the rendering equals transformers' apply_chat_template is tests/oracle/test_tokenizer.py.)
#include "tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/sha256.h"
#include "support.h"

namespace kvdrift {
namespace {

// SmolLM2-Instruct's template exactly as its tokenizer_config.json carries it.
std::string smollm2_template() {
  const auto config = nlohmann::json::parse(test::read_file(test::smollm2_dir() + "/tokenizer_config.json"));
  return config.at("chat_template").get<std::string>();
}

TEST(ChatTemplate, SmolLM2TemplateIsReadFromEitherFileAndRendersChatML) {
  const std::string dir = test::scratch_dir();
  test::write_file(dir + "/tokenizer_config.json", nlohmann::json{{"chat_template", smollm2_template()}}.dump());
  const ChatTemplate chat = load_chat_template(dir + "/tokenizer.json");
  EXPECT_EQ(chat.family(), "chatml");
  EXPECT_EQ(chat.source(), dir + "/tokenizer_config.json");
  EXPECT_EQ(chat.render("What is 2+3?", std::nullopt),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(chat.render("hi", std::string("Be brief.")),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");

  // transformers 5 writes chat_template.jinja; a list of named templates uses "default".
  const std::string jinja_dir = dir + "/jinja";
  test::write_file(jinja_dir + "/tokenizer_config.json", "{}");
  test::write_file(jinja_dir + "/chat_template.jinja", smollm2_template());
  EXPECT_EQ(load_chat_template(jinja_dir + "/tokenizer.json").source(), jinja_dir + "/chat_template.jinja");
  const std::string list_dir = dir + "/list";
  test::write_file(list_dir + "/tokenizer_config.json",
                   nlohmann::json{{"chat_template", {{{"name", "tool_use"}, {"template", "x"}},
                                                     {{"name", "default"}, {"template", smollm2_template()}}}}}
                       .dump());
  EXPECT_EQ(load_chat_template(list_dir + "/tokenizer.json").family(), "chatml");
  // The model directory's template, or the one beside an explicit tokenizer.
  EXPECT_EQ(chat_template_for_model("", test::smollm2_dir()).family(), "chatml");
  EXPECT_EQ(chat_template_for_model(dir, "elsewhere").source(), dir + "/tokenizer_config.json");
}

// transformers takes standalone template files before tokenizer_config.json's entry (oracle:
// tests/oracle/test_model_files.py): an edited chat_template.jinja is refused by its name, never
// replaced by the known template beside it; additional_chat_templates/default.jinja comes first of all.
TEST(ChatTemplate, StandaloneTemplateFilesComeBeforeTokenizerConfigAsInTransformers) {
  const std::string dir = test::scratch_dir();
  std::string edited = smollm2_template();
  edited.back() = ' ';
  test::write_file(dir + "/tokenizer_config.json", nlohmann::json{{"chat_template", smollm2_template()}}.dump());
  test::write_file(dir + "/chat_template.jinja", edited);
  EXPECT_EQ(test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); }),
            dir + "/chat_template.jinja: unsupported chat template (sha256 " + sha256_hex(edited) +
                "); kvdrift renders only the templates it knows exactly (SmolLM2-Instruct, Qwen2.5-Coder-Instruct) "
                "and never guesses; see src/tokenizer/chat_template.cpp to add one");
  test::write_file(dir + "/additional_chat_templates/default.jinja", smollm2_template());
  EXPECT_EQ(load_chat_template(dir + "/tokenizer.json").source(), dir + "/additional_chat_templates/default.jinja");
  // Named templates without a default: transformers asks which one to use.
  std::filesystem::remove(dir + "/additional_chat_templates/default.jinja");
  std::filesystem::remove(dir + "/chat_template.jinja");
  test::write_file(dir + "/additional_chat_templates/tool_use.jinja", smollm2_template());
  EXPECT_EQ(test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); }),
            dir + "/additional_chat_templates holds chat templates but no default.jinja, and there is no " + dir +
                "/chat_template.jinja: name the default one");
}

TEST(ChatTemplate, MissingOrUnknownTemplatesAreRefusedByName) {
  const std::string dir = test::scratch_dir();
  EXPECT_EQ(test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); }),
            "no chat template for " + dir + "/tokenizer.json: neither " + dir +
                "/tokenizer_config.json (key chat_template) nor " + dir +
                "/chat_template.jinja exists; set prompts.chat_template: false, or use a model directory that ships "
                "its template");
  // One character changed is another template: kvdrift never approximates one.
  std::string edited = smollm2_template();
  edited.back() = ' ';
  test::write_file(dir + "/tokenizer_config.json", nlohmann::json{{"chat_template", edited}}.dump());
  const std::string unknown = test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); });
  EXPECT_EQ(unknown.find(dir + "/tokenizer_config.json: unsupported chat template (sha256 "), 0u) << unknown;
  EXPECT_NE(unknown.find("it knows exactly (SmolLM2-Instruct"), std::string::npos) << unknown;
  test::write_file(dir + "/tokenizer_config.json", R"({"chat_template": 7})");
  EXPECT_EQ(test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); }),
            dir + "/tokenizer_config.json: chat_template is neither a string nor a list holding a \"default\" template");
  test::write_file(dir + "/tokenizer_config.json", "not json");
  EXPECT_EQ(test::error_message([&] { load_chat_template(dir + "/tokenizer.json"); }),
            dir + "/tokenizer_config.json is not a JSON object");
}

}  // namespace
}  // namespace kvdrift
