// A sweep file (sweep/sweep_file.h): its grid, zip and launcher sections, aliases bounded.
#include "fuzz_support.h"
#include "sweep/sweep_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvdrift::fuzz::write_input("sweep.yaml", data, size);
  kvdrift::fuzz::refuse_or_accept([&] { kvdrift::sweep::load_sweep_file(path); });
  return 0;
}
