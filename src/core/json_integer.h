#pragma once
// nlohmann's get<int64_t>() static_casts a float (1e300 → undefined behaviour) and wraps an unsigned
// above INT64_MAX; Python's json keeps both as they are, and transformers then fails on them. Integer
// fields are read through this check, so such a value is refused as the wrong type instead.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <optional>

namespace kvdrift {

// The value when `json` is a JSON integer that int64_t holds, else nothing.
inline std::optional<int64_t> json_int64(const nlohmann::json& json) {
  if (json.is_number_unsigned()) {
    const uint64_t value = json.get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(value);
  }
  if (json.is_number_integer()) return json.get<int64_t>();
  return std::nullopt;
}

}  // namespace kvdrift
