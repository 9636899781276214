#pragma once
// Where two texts first differ, line by line: what "written with a different config" errors show.
#include <optional>
#include <string>

namespace kvdrift {

struct LineDifference {
  int line;                           // from 1
  std::optional<std::string> first;   // that line of the first text; none where the text ended
  std::optional<std::string> second;  // of the second
};

// None when every line is the same (the texts may still differ in a final newline).
std::optional<LineDifference> first_line_difference(const std::string& first, const std::string& second);

// "line N: `A` <first_label>, `B` <second_label>" (a text that ended shows as "(end)"), or "they
// differ only in line endings" when every line is the same.
std::string describe_line_difference(const std::string& first, const std::string& second,
                                     const std::string& first_label, const std::string& second_label);

}  // namespace kvdrift
