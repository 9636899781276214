#pragma once
// The names of an enum at the file and CLI boundary: one table of (value, name) pairs per enum, so that
// the code inside works with the enum and only readers and writers of files and flags see the strings.
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/error.h"

namespace kvdrift {

template <typename Enum>
using EnumName = std::pair<Enum, const char*>;

// The name of `value`; every value of the enum has a row in its table (an InternalError otherwise).
template <typename Enum, size_t N>
const char* enum_name(const EnumName<Enum> (&table)[N], Enum value) {
  for (const auto& [entry, name] : table)
    if (entry == value) return name;
  internal_error("every value of the enum has a name in its table", __FILE__, __LINE__);
}

// The value named `name`, or none.
template <typename Enum, size_t N>
std::optional<Enum> parse_enum(const EnumName<Enum> (&table)[N], std::string_view name) {
  for (const auto& [entry, entry_name] : table)
    if (name == entry_name) return entry;
  return std::nullopt;
}

// Every name, in table order (for "known: ..." in error messages).
template <typename Enum, size_t N>
std::vector<std::string> enum_names(const EnumName<Enum> (&table)[N]) {
  std::vector<std::string> names;
  for (const auto& [entry, name] : table) names.emplace_back(name);
  return names;
}

}  // namespace kvdrift
