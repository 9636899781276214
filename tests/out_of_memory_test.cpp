// An allocation failure becomes one line naming the settings that sized the work (core/out_of_memory.h).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <new>
#include <stdexcept>

#include "core/out_of_memory.h"

namespace kvdrift {
namespace {

TEST(OutOfMemory, AllocationFailuresNameTheInnermostScopesSettings) {
  EXPECT_EQ(out_of_memory_message(std::bad_alloc()), "out of memory");
  {
    const MemoryScope outer("model.path m in model.dtype float32");
    const MemoryScope inner("decoding.batch_prompts 8, decoding.max_new_tokens 4096");
    EXPECT_EQ(out_of_memory_message(std::bad_alloc()),
              "out of memory with decoding.batch_prompts 8, decoding.max_new_tokens 4096; lower one of these");
  }
  const MemoryScope after("--steps 10");
  EXPECT_EQ(out_of_memory_message(std::bad_alloc()), "out of memory with --steps 10; lower one of these");
  // Other errors are not allocation failures.
  EXPECT_EQ(out_of_memory_message(std::runtime_error("disk full")), std::nullopt);
  try {
    (void)(torch::ones({2}) + torch::ones({3}));
    ADD_FAILURE() << "LibTorch added tensors of sizes 2 and 3";
  } catch (const c10::Error& error) {
    EXPECT_EQ(out_of_memory_message(error), std::nullopt);
  }
}

// LibTorch's own CPU allocator, asked for 2^40 floats (4.4 TB, beyond any test machine's memory and
// swap; Linux refuses it under the default overcommit heuristic). Under AddressSanitizer a failed
// allocation aborts the process by design, so there only the bad_alloc path above is tested.
TEST(OutOfMemory, LibTorchsAllocatorFailureIsNamedWithItsSize) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer aborts on a failed allocation";
#else
  const MemoryScope scope("decoding.batch_prompts 8");
  std::optional<std::string> message;
  try {
    (void)torch::empty({int64_t{1} << 40}, torch::kFloat32);
  } catch (const c10::Error& error) {
    message = out_of_memory_message(error);
  }
  EXPECT_EQ(message, "out of memory (4398.0 GB asked for) with decoding.batch_prompts 8; lower one of these");
#endif
}

}  // namespace
}  // namespace kvdrift
