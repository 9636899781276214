#pragma once
// Prompt sources for `kvdrift run`: texts given inline, a text file split into prompts, JSONL
// records (plain or gzip-compressed) rendered through a template, or token ids given directly.
// Every prompt gets a stable id so results from different runs and offsets can be joined.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/enum_names.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kvdrift {

// Where prompts come from: `prompts.source` of the run config.
enum class PromptKind { Inline, TextFile, Jsonl, TokenIds };
inline constexpr EnumName<PromptKind> kPromptKindNames[] = {{PromptKind::Inline, "inline"},
                                                            {PromptKind::TextFile, "text_file"},
                                                            {PromptKind::Jsonl, "jsonl"},
                                                            {PromptKind::TokenIds, "token_ids"}};
inline const char* prompt_kind_name(PromptKind kind) { return enum_name(kPromptKindNames, kind); }

// Plain data, filled from the run config.
struct PromptSource {
  PromptKind kind = PromptKind::Inline;
  std::vector<std::string> texts;        // inline
  std::string path;                      // text_file | jsonl (gzip allowed), already resolved
  std::optional<std::string> separator;  // text_file: none = one prompt per non-empty line
  std::string field;                     // jsonl: the text field, used when template_text is empty
  // jsonl: e.g. "Problem: {problem}\nSolution:". {name} is replaced by the record's field `name`
  // (a string, or a number spelled as in the file); {{ and }} are literal braces.
  std::string template_text;
  std::string answer_field;              // jsonl, optional: copied into Prompt::answer
  std::vector<std::vector<TokenId>> ids;  // token_ids
  int64_t offset = 0;                    // skip this many prompts,
  int64_t limit = 0;                     // then keep at most this many (0 = all)
  bool add_bos = true;                   // text kinds only; token_ids are used as given
  // Text kinds: wrap each text as a user turn in the model's chat template (then no BOS is added:
  // the template writes its own special tokens), after `system_prompt` when given (else the
  // template's default system turn, if it has one).
  bool chat_template = false;
  std::optional<std::string> system_prompt;
};

struct Prompt {
  // Independent of offset/limit: "inline:<i>", "ids:<i>", "<file stem>:<i>" (text_file), and for
  // jsonl the record's task_id, unique_id or id field (first present), else "<file stem>:<record>".
  // The stem drops ".gz" too: HumanEval.jsonl.gz -> "HumanEval". Indices count from 0.
  std::string id;
  std::string text;             // as encoded (chat template applied); empty for token_ids
  std::vector<TokenId> tokens;  // text encoded with add_bos, or the given ids
  std::string answer;           // jsonl answer_field (a string, or a number as in the file), else empty
};

// The most tokens any of `prompts` has (0 for none): the prefill's length and the caches' start.
int64_t longest_prompt_tokens(const std::vector<Prompt>& prompts);

// Reads, renders and encodes the prompts of `source`; `tokenizer` may be null only for token_ids
// (when given, ids are checked against its vocabulary); `chat` is required when
// source.chat_template is set. Texts of text_file prompts are trimmed of
// surrounding whitespace and empty ones skipped; inline and jsonl texts are kept verbatim. Every
// record of a file is validated, only the selected prompts are encoded. Throws Error naming the
// file, line and field (or the template, prompt id or token) on any problem, and when offset/limit
// leave no prompt.
std::vector<Prompt> load_prompts(const PromptSource& source, const Tokenizer* tokenizer,
                                 const ChatTemplate* chat = nullptr);

}  // namespace kvdrift
