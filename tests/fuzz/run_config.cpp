// A run config: the YAML file and up to three --set overrides (io/run_config.h).
#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_support.h"
#include "io/run_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider input(data, size);
  std::vector<std::string> overrides;
  for (int i = input.ConsumeIntegralInRange(0, 3); i > 0; --i) overrides.push_back(input.ConsumeRandomLengthString(64));
  const std::string yaml = input.ConsumeRemainingBytesAsString();
  const std::string path =
      kvdrift::fuzz::write_input("run.yaml", reinterpret_cast<const uint8_t*>(yaml.data()), yaml.size());
  kvdrift::fuzz::refuse_or_accept([&] { kvdrift::load_run_config(path, overrides); });
  return 0;
}
