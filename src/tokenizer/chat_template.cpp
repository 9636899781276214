#include "tokenizer/chat_template.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/sha256.h"

namespace kvdrift {

namespace {

namespace fs = std::filesystem;

struct KnownTemplate {
  const char* sha256;  // of the template text exactly as the model ships it
  const char* model;   // who ships it, for messages
  const char* family;
  const char* default_system;
};

// To support another model: add its template's digest here, with a family this file renders (or a
// new family in ChatTemplate::render), and a case to tests/oracle/test_transformers.py.
const std::vector<KnownTemplate> kKnownTemplates = {
    {"872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788", "SmolLM2-Instruct", "chatml",
     "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
    // Qwen2.5-Coder-1.5B-Instruct's (tool-calling branches unused: kvdrift renders no tools).
    {"d5495a1e5db0611132a97e46a65dbb64a642a499421228b9c8b93229097fa9a4", "Qwen2.5-Coder-Instruct", "chatml",
     "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path.string());
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// tokenizer_config.json's chat_template is a string, or a list of {name, template} of which
// "default" is the one apply_chat_template uses.
std::optional<std::string> template_in_tokenizer_config(const fs::path& path) {
  std::error_code error;
  if (!fs::is_regular_file(path, error)) return std::nullopt;
  const auto config = nlohmann::json::parse(read_file(path), nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) fail("{} is not a JSON object", path.string());
  if (!config.contains("chat_template") || config.at("chat_template").is_null()) return std::nullopt;
  const auto& value = config.at("chat_template");
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array()) {
    for (const auto& entry : value) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry.at("template").is_string())
        return entry.at("template").get<std::string>();
    }
  }
  fail("{}: chat_template is neither a string nor a list holding a \"default\" template", path.string());
}

// Where a tokenizer's template may be, beside its tokenizer.json.
struct TemplateFiles {
  fs::path config, jinja, named;
};
TemplateFiles template_files(const std::string& tokenizer_json) {
  const fs::path dir = fs::path(tokenizer_json).parent_path();
  return {dir / "tokenizer_config.json", dir / "chat_template.jinja", dir / "additional_chat_templates"};
}

std::string tokenizer_json_for_model(const std::string& tokenizer_path, const std::string& model_path) {
  std::error_code error;
  fs::path tokenizer = tokenizer_path.empty() ? fs::path(model_path) / "tokenizer.json" : fs::path(tokenizer_path);
  if (fs::is_directory(tokenizer, error)) tokenizer /= "tokenizer.json";
  return tokenizer.string();
}

}  // namespace

ChatTemplate::ChatTemplate(std::string family, std::string default_system, std::string source)
    : family_(std::move(family)), default_system_(std::move(default_system)), source_(std::move(source)) {}

std::string ChatTemplate::render(const std::string& user, const std::optional<std::string>& system) const {
  // ChatML: every turn is "<|im_start|>ROLE\nCONTENT<|im_end|>\n"; the template adds its default
  // system turn when the conversation does not start with one.
  const auto turn = [](const std::string& role, const std::string& content) {
    return "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
  };
  std::string text;
  if (system) {
    text += turn("system", *system);
  } else if (!default_system_.empty()) {
    text += turn("system", default_system_);
  }
  return text + turn("user", user) + "<|im_start|>assistant\n";
}

// The template transformers' apply_chat_template uses (PreTrainedTokenizerBase.from_pretrained, then
// get_chat_template): standalone template files come first and replace tokenizer_config.json's entry
// whole; among them additional_chat_templates/default.jinja, else chat_template.jinja, is the default,
// and templates there without a default are refused (transformers asks for a template name).
ChatTemplate load_chat_template(const std::string& tokenizer_json) {
  const TemplateFiles files = template_files(tokenizer_json);
  std::error_code error;
  bool named_templates = false;
  for (fs::directory_iterator entry(files.named, error), end; !error && entry != end; entry.increment(error))
    named_templates = named_templates || entry->path().extension() == ".jinja";
  std::optional<std::string> text;
  fs::path source;
  for (const fs::path& file : {files.named / "default.jinja", files.jinja}) {
    if (fs::is_regular_file(file, error)) {
      text = read_file(file);
      source = file;
      break;
    }
  }
  if (!text && named_templates)
    fail("{} holds chat templates but no default.jinja, and there is no {}: name the default one", files.named.string(),
         files.jinja.string());
  if (!text) {
    text = template_in_tokenizer_config(files.config);
    source = files.config;
  }
  if (!text)
    fail("no chat template for {}: neither {} (key chat_template) nor {} exists; set prompts.chat_template: false, "
         "or use a model directory that ships its template",
         tokenizer_json, files.config.string(), files.jinja.string());
  const std::string digest = sha256_hex(*text);
  for (const auto& known : kKnownTemplates) {
    if (digest == known.sha256) return ChatTemplate(known.family, known.default_system, source.string());
  }
  std::string supported;
  for (const auto& known : kKnownTemplates) supported += fmt::format("{}{}", supported.empty() ? "" : ", ", known.model);
  fail("{}: unsupported chat template (sha256 {}); kvdrift renders only the templates it knows exactly ({}) "
       "and never guesses; see src/tokenizer/chat_template.cpp to add one",
       source.string(), digest, supported);
}

ChatTemplate chat_template_for_model(const std::string& tokenizer_path, const std::string& model_path) {
  return load_chat_template(tokenizer_json_for_model(tokenizer_path, model_path));
}

std::vector<std::string> chat_template_files(const std::string& tokenizer_path, const std::string& model_path) {
  const TemplateFiles files = template_files(tokenizer_json_for_model(tokenizer_path, model_path));
  return {files.config.string(), files.jinja.string(), files.named.string()};
}

}  // namespace kvdrift
