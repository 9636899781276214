#include "core/line_difference.h"

#include <fmt/format.h>

#include <sstream>

namespace kvdrift {

std::optional<LineDifference> first_line_difference(const std::string& first, const std::string& second) {
  std::istringstream first_lines(first), second_lines(second);
  std::string a, b;
  for (int line = 1;; ++line) {
    const bool has_a = static_cast<bool>(std::getline(first_lines, a));
    const bool has_b = static_cast<bool>(std::getline(second_lines, b));
    if (!has_a && !has_b) return std::nullopt;
    if (!has_a || !has_b || a != b) {
      return LineDifference{line, has_a ? std::optional<std::string>(a) : std::nullopt,
                            has_b ? std::optional<std::string>(b) : std::nullopt};
    }
  }
}

std::string describe_line_difference(const std::string& first, const std::string& second,
                                     const std::string& first_label, const std::string& second_label) {
  const auto difference = first_line_difference(first, second);
  if (!difference) return "they differ only in line endings";
  return fmt::format("line {}: `{}` {}, `{}` {}", difference->line, difference->first.value_or("(end)"), first_label,
                     difference->second.value_or("(end)"), second_label);
}

}  // namespace kvdrift
