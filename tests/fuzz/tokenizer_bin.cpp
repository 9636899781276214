// llama2.c tokenizer.bin; an accepted one also encodes and decodes a fixed text.
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvdrift::fuzz::load_and_use_tokenizer("tokenizer.bin", data, size,
                                        "Once upon a time, \xc3\xa9 \xf0\x9f\x99\x82 12345");
  return 0;
}
