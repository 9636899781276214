#pragma once
// Bounds on what YAML text kvdrift reads (config and sweep files, --set values) may cost.
// - yaml-cpp 0.7 loops forever on some malformed text (a ',' where a top-level node starts: ", a",
//   "[a] ,"), building nodes until memory runs out. load_yaml and load_yaml_documents load like
//   YAML::Load and YAML::LoadAll after a first pass that stops such a loop: text yields a few parser
//   events per byte at most, so more is the loop, thrown as a YAML::ParserException where it spins.
// - A YAML alias repeats a node without repeating its text, so a few hundred bytes can stand for
//   billions of nodes (an "alias bomb") that a reader walking the document would take minutes and
//   gigabytes to visit: check_yaml_size bounds a loaded document.
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvdrift {

YAML::Node load_yaml(const std::string& text);
std::vector<YAML::Node> load_yaml_documents(const std::string& text);

inline constexpr int64_t kMaxYamlNodes = 100000;  // far above any real config or sweep file

// Throws Error "WHERE: expands to more than 100000 YAML nodes ..." when `document` does, counting
// each alias's node every time it is used; stops counting at the bound, so it is fast either way.
void check_yaml_size(const YAML::Node& document, const std::string& where);

}  // namespace kvdrift
