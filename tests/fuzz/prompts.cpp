// Prompt files (io/prompts.h): JSONL records through a template with an answer field, or a text file
// split at a separator, encoded with stories260K's tokenizer ($KVDRIFT_FUZZ_STORIES_TOKENIZER, else
// ../shared/models/stories260K/tok512.bin beside the checkout). The first byte picks the source.
#include "fuzz_support.h"
#include "io/prompts.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto stories = kvdrift::fuzz::fixed_tokenizer(
      "KVDRIFT_FUZZ_STORIES_TOKENIZER", KVDRIFT_ROOT "/../shared/models/stories260K/tok512.bin");
  if (size == 0) return 0;
  kvdrift::PromptSource source;
  const uint8_t choice = data[0];
  if (choice % 2 == 0) {
    source.kind = kvdrift::PromptKind::Jsonl;
    source.path = kvdrift::fuzz::write_input("prompts.jsonl", data + 1, size - 1);
    if (choice & 2)
      source.template_text = "Q: {question}\nA:";
    else
      source.field = "question";
    source.answer_field = "answer";
  } else {
    source.kind = kvdrift::PromptKind::TextFile;
    source.path = kvdrift::fuzz::write_input("prompts.txt", data + 1, size - 1);
    if (choice & 2) source.separator = "<|endoftext|>";
  }
  source.offset = (choice >> 2) & 1;
  source.limit = (choice >> 3) & 3;
  kvdrift::fuzz::refuse_or_accept([&] { kvdrift::load_prompts(source, stories.get()); });
  return 0;
}
