// Hugging Face tokenizer.json; an accepted one also encodes and decodes a fixed text.
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvdrift::fuzz::load_and_use_tokenizer("tokenizer.json", data, size, "hello world 12345 \xc3\xa9<|endoftext|>\n\n  x");
  return 0;
}
