#include "core/out_of_memory.h"

#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <cstdlib>
#include <new>
#include <string_view>
#include <vector>

namespace kvdrift {
namespace {

thread_local std::vector<std::string> scopes;

// LibTorch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes."
std::optional<std::string> requested_bytes(const std::string& text) {
  constexpr std::string_view kTried = "tried to allocate ";
  const size_t at = text.find(kTried);
  if (at == std::string::npos) return std::nullopt;
  const double bytes = std::strtod(text.c_str() + at + kTried.size(), nullptr);
  return fmt::format("{:.1f} GB", bytes / 1e9);
}

}  // namespace

MemoryScope::MemoryScope(std::string settings) { scopes.push_back(std::move(settings)); }
MemoryScope::~MemoryScope() { scopes.pop_back(); }

std::optional<std::string> out_of_memory_message(const std::exception& error) {
  std::optional<std::string> size;
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) {
    const std::string text = torch_error->what_without_backtrace();
    const bool cuda = dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr;
    if (!cuda && text.find("can't allocate memory") == std::string::npos) return std::nullopt;
    size = cuda ? std::optional<std::string>("GPU memory") : requested_bytes(text);
  } else if (dynamic_cast<const std::bad_alloc*>(&error) == nullptr) {
    return std::nullopt;
  }
  std::string line = "out of memory";
  if (size) line += fmt::format(" ({} asked for)", *size);
  if (!scopes.empty()) line += fmt::format(" with {}; lower one of these", scopes.back());
  return line;
}

}  // namespace kvdrift
