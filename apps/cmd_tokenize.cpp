// `kvdrift tokenize`: text -> token ids (and back) with a model's tokenizer, one JSON line per input
// line, so prompts can be checked against another implementation (tests/oracle/ compares transformers).
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift::cli {

namespace {

struct TokenizeOptions {
  std::string tokenizer;  // tokenizer.json / tokenizer.bin, or a model directory holding tokenizer.json
  bool chat = false;
  bool add_bos = false;
};

// stdin: one JSON object {"text": "..."} per line; stdout: {"text": what was encoded (after the chat
// template), "ids": [...], "decoded": "..."} per line.
void run_tokenize(const TokenizeOptions& options) {
  const auto tokenizer = load_tokenizer(options.tokenizer);
  std::optional<ChatTemplate> chat;
  if (options.chat) chat = chat_template_for_model(options.tokenizer, "");
  std::string line;
  for (int64_t number = 1; std::getline(std::cin, line); ++number) {
    if (line.empty()) continue;
    const auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded() || !record.is_object() || !record.contains("text") || !record.at("text").is_string())
      fail("stdin line {}: expected a JSON object with a string field \"text\"", number);
    std::string text = record.at("text").get<std::string>();
    if (chat) text = chat->render(text, std::nullopt);
    const auto ids = tokenizer->encode(text, options.add_bos);
    std::cout << nlohmann::json{{"text", text}, {"ids", ids}, {"decoded", tokenizer->decode(ids)}}.dump() << "\n";
  }
}

}  // namespace

void register_tokenize(CLI::App& app, std::function<void()>& command) {
  auto options = std::make_shared<TokenizeOptions>();
  auto* sub = app.add_subcommand(
      "tokenize", "encode JSON lines {\"text\": ...} from stdin; print {\"text\", \"ids\", \"decoded\"} per line");
  sub->add_option("--tokenizer", options->tokenizer, "tokenizer.json, tokenizer.bin, or a model directory")
      ->required();
  sub->add_flag("--chat", options->chat, "wrap each text as a user turn in the tokenizer's chat template");
  sub->add_flag("--add-bos", options->add_bos, "prepend BOS (when the tokenizer has one)");
  sub->callback([options, &command] { command = [options] { run_tokenize(*options); }; });
}

}  // namespace kvdrift::cli
