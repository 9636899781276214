#pragma once
// One exception type for every user-facing failure: the CLI prints its message as a single
// "kvdrift: error: ..." line and exits 1. Messages name the offending file, key or value. Broken
// internal invariants are another type (InternalError, KVDRIFT_CHECK).
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

// A broken internal invariant: a bug in kvdrift, not a problem with the input. The CLI reports it
// apart from user errors (exit status 3), naming the invariant and the file and line that checks it.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

[[noreturn]] inline void internal_error(const char* invariant, const char* file, int line) {
  throw InternalError(fmt::format("{} does not hold ({}:{})", invariant, file, line));
}

}  // namespace kvdrift

// Checks an internal invariant (KVDRIFT_CHECK(rows == columns)); see InternalError.
#define KVDRIFT_CHECK(condition) \
  ((condition) ? static_cast<void>(0) : ::kvdrift::internal_error(#condition, __FILE__, __LINE__))
