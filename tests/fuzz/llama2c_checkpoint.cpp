// llama2.c checkpoint: the 28-byte header and the size it implies (model/checkpoint_files.h).
#include "fuzz_support.h"
#include "model/checkpoint_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvdrift::fuzz::write_input("model.bin", data, size);
  kvdrift::fuzz::refuse_or_accept([&] { kvdrift::read_llama2c_layout(path); });
  return 0;
}
