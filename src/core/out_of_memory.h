#pragma once
// An allocation that fails becomes one line naming the settings that sized the work, never
// std::bad_alloc's "std::bad_alloc" or LibTorch's allocator text with its C++ frames.
#include <exception>
#include <optional>
#include <string>

namespace kvdrift {

// While one lives, an allocation failure names `settings` (what sizes the memory of the work under
// way, e.g. "decoding.batch_prompts 8, decoding.max_new_tokens 4096, ..."). Scopes nest on the
// thread; the innermost is named.
class MemoryScope {
 public:
  explicit MemoryScope(std::string settings);
  ~MemoryScope();
  MemoryScope(const MemoryScope&) = delete;
  MemoryScope& operator=(const MemoryScope&) = delete;
};

// The one line for `error` if it is an allocation failure (std::bad_alloc, LibTorch's CPU allocator,
// CUDA out of memory), naming the innermost MemoryScope's settings; nullopt for any other error.
std::optional<std::string> out_of_memory_message(const std::exception& error);

}  // namespace kvdrift
