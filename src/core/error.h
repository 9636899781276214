#pragma once
// One exception type for every user-facing failure: the CLI prints its message as a single
// "kvdrift: error: ..." line and exits non-zero. Messages name the offending file, key or value.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace kvdrift {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace kvdrift
