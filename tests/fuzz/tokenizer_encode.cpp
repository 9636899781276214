// Any text (any bytes) through SmolLM2's tokenizer.json ($KVDRIFT_FUZZ_TOKENIZER, else the project's
// models/smollm2-135m-instruct): refused (text that is not UTF-8), or ids in the vocabulary that
// decode to the text again when it names no added token (they all start with '<').
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const auto smollm2 = kvdrift::fuzz::fixed_tokenizer(
      "KVDRIFT_FUZZ_TOKENIZER", KVDRIFT_ROOT "/models/smollm2-135m-instruct/tokenizer.json");
  const std::string text(reinterpret_cast<const char*>(data), size);
  kvdrift::fuzz::refuse_or_accept([&] {
    const auto ids = smollm2->encode(text, false);
    kvdrift::fuzz::check_ids_in_vocabulary(*smollm2, ids);
    if (text.find('<') == std::string::npos && smollm2->decode(ids) != text) __builtin_trap();
  });
  return 0;
}
