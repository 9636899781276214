#pragma once
// Chat templates of instruct models. kvdrift does not interpret Jinja: it recognises the exact template
// texts of the families it supports (by sha256) and renders them natively, so that a prompt is wrapped
// exactly as transformers' apply_chat_template(messages, add_generation_prompt=True) wraps it (tested
// against transformers). Any other template is refused with its digest, never approximated.
#include <optional>
#include <string>
#include <vector>

namespace kvdrift {

class ChatTemplate {
 public:
  // `family` names a supported template: "chatml" (ChatML: SmolLM2-Instruct's, Qwen2.5's), whose
  // default system prompt (used when the conversation has none) is `default_system`.
  ChatTemplate(std::string family, std::string default_system, std::string source);
  // One user turn, an optional system turn before it, and the assistant's opening.
  std::string render(const std::string& user, const std::optional<std::string>& system) const;
  const std::string& family() const { return family_; }
  const std::string& source() const { return source_; }  // the file the template came from

 private:
  std::string family_;
  std::string default_system_;
  std::string source_;
};

// The template that comes with a tokenizer, where transformers takes it from: beside `tokenizer_json`,
// chat_template.jinja (or additional_chat_templates/default.jinja) before tokenizer_config.json's
// "chat_template". Throws Error naming the files when none has one, and naming the file and the
// template's sha256 when it is not a supported one (an edited chat_template.jinja among them: it is
// never replaced by tokenizer_config.json's).
ChatTemplate load_chat_template(const std::string& tokenizer_json);

// The template of a model: beside `tokenizer_path` when given (a tokenizer.json or its directory),
// else inside the Hugging Face model directory `model_path`.
ChatTemplate chat_template_for_model(const std::string& tokenizer_path, const std::string& model_path);
// The files and folders chat_template_for_model may read (existing or not): inputs that a command
// must not write over.
std::vector<std::string> chat_template_files(const std::string& tokenizer_path, const std::string& model_path);

}  // namespace kvdrift
