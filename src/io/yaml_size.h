#pragma once
// A YAML alias repeats a node without repeating its text, so a few hundred bytes can stand for
// billions of nodes (an "alias bomb") that a reader walking the document would take minutes and
// gigabytes to visit. Config and sweep files are checked against a bound right after loading.
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <string>

namespace kvdrift {

inline constexpr int64_t kMaxYamlNodes = 100000;  // far above any real config or sweep file

// Throws Error "WHERE: expands to more than 100000 YAML nodes ..." when `document` does, counting
// each alias's node every time it is used; stops counting at the bound, so it is fast either way.
void check_yaml_size(const YAML::Node& document, const std::string& where);

}  // namespace kvdrift
