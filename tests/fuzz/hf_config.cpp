// A Hugging Face model directory's config.json (model/checkpoint_files.h).
#include "fuzz_support.h"
#include "model/checkpoint_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvdrift::fuzz::write_input("config.json", data, size);
  kvdrift::fuzz::refuse_or_accept([&] { kvdrift::read_hf_config(kvdrift::fuzz::scratch()); });
  return 0;
}
