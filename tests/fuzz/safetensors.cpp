// safetensors: header length, JSON header, dtypes, shapes and offsets (io/safetensors.h). Every byte
// of an accepted entry is read, so an offset past the mapping is a sanitizer finding.
#include "fuzz_support.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvdrift::fuzz::write_input("model.safetensors", data, size);
  kvdrift::fuzz::refuse_or_accept([&] {
    const kvdrift::SafetensorsFile file(path);
    volatile unsigned sum = 0;
    for (const auto& entry : file.entries())
      for (size_t i = 0; i < entry.nbytes; ++i) sum = sum + static_cast<unsigned>(entry.data[i]);
  });
  return 0;
}
