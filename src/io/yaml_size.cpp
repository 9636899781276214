#include "io/yaml_size.h"

#include <yaml-cpp/eventhandler.h>

#include <sstream>

#include "core/error.h"

namespace kvdrift {

namespace {

// Counts parser events and throws once there are more than `limit`.
class EventBound : public YAML::EventHandler {
 public:
  explicit EventBound(size_t limit) : limit_(limit) {}
  void OnDocumentStart(const YAML::Mark& mark) override { count(mark); }
  void OnDocumentEnd() override { count(last_); }
  void OnNull(const YAML::Mark& mark, YAML::anchor_t) override { count(mark); }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override { count(mark); }
  void OnScalar(const YAML::Mark& mark, const std::string&, YAML::anchor_t, const std::string&) override {
    count(mark);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {
    count(mark);
  }
  void OnSequenceEnd() override { count(last_); }
  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {
    count(mark);
  }
  void OnMapEnd() override { count(last_); }

 private:
  void count(const YAML::Mark& mark) {
    last_ = mark;
    if (++events_ > limit_)
      throw YAML::ParserException(mark, "the YAML parser makes no progress here (a ',' outside [...] or {...}?)");
  }
  size_t limit_;
  size_t events_ = 0;
  YAML::Mark last_ = YAML::Mark::null_mark();
};

// Runs the parser over `text` without building nodes, stopping a parser that loops.
void check_parser_terminates(const std::string& text) {
  std::istringstream stream(text);
  YAML::Parser parser(stream);
  EventBound bound(4 * text.size() + 16);  // "-" alone is three events: start, null, end
  while (parser.HandleNextDocument(bound)) {
  }
}

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

YAML::Node load_yaml(const std::string& text) {
  check_parser_terminates(text);
  return YAML::Load(text);
}

std::vector<YAML::Node> load_yaml_documents(const std::string& text) {
  check_parser_terminates(text);
  return YAML::LoadAll(text);
}

void check_yaml_size(const YAML::Node& document, const std::string& where) {
  int64_t budget = kMaxYamlNodes;
  if (!within(document, budget))
    fail("{}: expands to more than {} YAML nodes (aliases that repeat aliases?); write the values out", where,
         kMaxYamlNodes);
}

}  // namespace kvdrift
