#include "io/yaml_size.h"

#include "core/error.h"

namespace kvdrift {

namespace {

// Counts `node` and what it holds against `budget`; false once the budget is spent.
bool within(const YAML::Node& node, int64_t& budget) {
  if (--budget < 0) return false;
  if (node.IsSequence()) {
    for (const auto& child : node)
      if (!within(child, budget)) return false;
  } else if (node.IsMap()) {
    for (const auto& entry : node)
      if (!within(entry.first, budget) || !within(entry.second, budget)) return false;
  }
  return true;
}

}  // namespace

void check_yaml_size(const YAML::Node& document, const std::string& where) {
  int64_t budget = kMaxYamlNodes;
  if (!within(document, budget))
    fail("{}: expands to more than {} YAML nodes (aliases that repeat aliases?); write the values out", where,
         kMaxYamlNodes);
}

}  // namespace kvdrift
