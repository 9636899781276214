// model.safetensors.index.json: the shard list, whose file names must stay in the model directory.
#include "fuzz_support.h"
#include "model/checkpoint_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvdrift::fuzz::write_input("model.safetensors.index.json", data, size);
  kvdrift::fuzz::refuse_or_accept([&] {
    for (const auto& [file, names] : kvdrift::read_hf_shard_list(kvdrift::fuzz::scratch())) {
      const std::filesystem::path shard(file);
      if (file.empty() || shard.has_parent_path() || file == "." || file == "..") __builtin_trap();
      (void)names;
    }
  });
  return 0;
}
