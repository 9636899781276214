#include "io/strict_yaml.h"

#include <yaml-cpp/eventhandler.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <type_traits>
#include <utility>

namespace kvdrift {

namespace {

namespace fs = std::filesystem;

constexpr int64_t kMaxYamlNodes = 100000;  // far above any real config or sweep file

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

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

// Whether `inner` is `outer` or lies under it, as "quantizers[0].params" lies under "quantizers".
bool holds(const std::string& outer, const std::string& inner) {
  if (inner.compare(0, outer.size(), outer) != 0) return false;
  return inner.size() == outer.size() || inner[outer.size()] == '.' || inner[outer.size()] == '[';
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::istringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);) parts.push_back(part);
  if (text.empty() || text.back() == separator) parts.emplace_back();  // getline drops a trailing empty part
  return parts;
}

std::optional<size_t> parse_index(const std::string& text) {
  size_t index = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), index);
  if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return index;
}

// Throws Error "WHERE: expands to more than 100000 YAML nodes ..." when `document` does, counting each
// alias's node every time it is used; stops counting at the bound, so it is fast either way.
void check_yaml_size(const YAML::Node& document, const std::string& where) {
  int64_t budget = kMaxYamlNodes;
  if (!within(document, budget))
    fail("{}: expands to more than {} YAML nodes (aliases that repeat aliases?); write the values out", where,
         kMaxYamlNodes);
}

}  // namespace

// --- Bounded loading ---

YAML::Node load_yaml(const std::string& text) {
  check_parser_terminates(text);
  return YAML::Load(text);
}

YamlFile read_yaml_file(const std::string& path, const std::string& kind) {
  std::error_code error;
  if (!fs::exists(path, error)) fail("{} file not found: {}", kind, path);
  if (!fs::is_regular_file(path, error))
    fail("{} {} is not a regular file (a device, a FIFO or a folder)", kind, path);
  YamlFile file;
  {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in) fail("cannot read {} file {}", kind, path);
    file.text = text.str();
  }
  std::vector<YAML::Node> documents;
  try {
    check_parser_terminates(file.text);
    documents = YAML::LoadAll(file.text);
  } catch (const YAML::Exception& syntax_error) {
    fail("{}:{}: YAML syntax error: {}", path, syntax_error.mark.line + 1, syntax_error.msg);
  }
  if (documents.size() > 1)
    fail("{}:{}: a {} is one YAML document, but a second one starts here", path, documents[1].Mark().line + 1, kind);
  if (!documents.empty()) file.document = documents.front();
  check_yaml_size(file.document, path);
  return file;
}

// --- Overrides ---

Override parse_set_argument(const std::string& argument) {
  const size_t equals = argument.find('=');
  if (equals == std::string::npos) fail("--set {}: expected KEY=VALUE, e.g. decoding.max_new_tokens=64", argument);
  Override result{argument.substr(0, equals), {}, "--set " + argument, fs::current_path().string()};
  try {
    result.value = load_yaml(argument.substr(equals + 1));
  } catch (const YAML::Exception& error) {
    fail("--set {}: the value is not valid YAML: {}", argument, error.msg);
  }
  check_yaml_size(result.value, result.origin);
  return result;
}

// --- Reading ---

std::string Range::describe() const {
  if (std::isinf(high)) return fmt::format("{} {}", low_open ? ">" : ">=", low);
  return fmt::format("in {}{}, {}]", low_open ? "(" : "[", low, high);
}

Document::Document(YAML::Node root, YamlSource source)
    : root_(root.IsNull() ? YAML::Node(YAML::NodeType::Map) : std::move(root)), source_(std::move(source)) {}

void Document::apply(const Override& override) {
  const auto reject = [&](const std::string& message) { fail("{}: {}", located(override.origin), message); };
  const std::vector<std::string> keys = split(override.key, '.');
  if (contains(keys, "")) reject(fmt::format("'{}' is not a dotted key such as decoding.max_new_tokens", override.key));
  const YAML::Node value = YAML::Clone(override.value);  // later overrides must not reach into the caller's node

  YAML::Node node = root_;
  std::string path;
  std::string first_added;  // the first key this override adds: everything under it comes from here
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::string& key = keys[i];
    const bool last = i + 1 == keys.size();
    if (node.IsSequence()) {
      const std::optional<size_t> index = parse_index(key);
      if (!index || *index >= node.size())
        reject(fmt::format("{} has {} entries, so '{}' names none (entries are numbered from 0)", path, node.size(),
                           key));
      path += fmt::format("[{}]", *index);
      if (last) {
        node[*index] = value;
      } else {
        node.reset(node[*index]);  // reset rebinds the handle; operator= would overwrite the node
      }
      continue;
    }
    if (node.IsNull()) node = YAML::Node(YAML::NodeType::Map);  // e.g. "model:" left empty in the file
    if (!node.IsMap()) reject(fmt::format("{} holds a single value, not a mapping with key '{}'", path, key));
    path += path.empty() ? key : "." + key;
    const bool exists = static_cast<bool>(std::as_const(node)[key]);  // the const lookup adds nothing
    if (!exists && first_added.empty()) first_added = path;
    if (last) {
      node[key] = value;
    } else {
      if (!exists) node[key] = YAML::Node(YAML::NodeType::Map);
      node.reset(node[key]);
    }
  }
  const std::string key_path = first_added.empty() ? path : first_added;
  applied_.erase(std::remove_if(applied_.begin(), applied_.end(),
                                [&](const Applied& earlier) { return holds(key_path, earlier.key_path); }),
                 applied_.end());
  applied_.push_back({key_path, override.origin, override.base_dir});
}

const Document::Applied* Document::override_of(const std::string& key_path) const {
  const Applied* found = nullptr;
  for (const Applied& applied : applied_)
    if (holds(applied.key_path, key_path) && (!found || applied.key_path.size() > found->key_path.size()))
      found = &applied;
  return found;
}

std::string Document::where(const std::string& key_path, const YAML::Mark& mark) const {
  if (const Applied* applied = override_of(key_path)) return located(applied->origin);
  return located(mark.is_null() ? source_.file : fmt::format("{}:{}", source_.file, mark.line + 1));
}

std::string Document::where_any(const std::string& key_path, const YAML::Mark& mark) const {
  if (override_of(key_path) == nullptr) {
    for (auto applied = applied_.rbegin(); applied != applied_.rend(); ++applied)
      if (holds(key_path, applied->key_path)) return located(applied->origin);
  }
  return where(key_path, mark);
}

std::string Value::one_of(const std::vector<std::string>& allowed, const std::string& noun,
                          const std::optional<std::string>& fallback) const {
  if (fallback && is_null()) return *fallback;
  const std::string value = as<std::string>();
  if (!contains(allowed, value))
    reject(fmt::format("{}: unknown {} '{}' (known: {})", path_, noun, value, fmt::join(allowed, ", ")));
  return value;
}

std::vector<Value> Value::elements(const std::string& noun) const {
  if (!node_.IsSequence()) expected("a list");
  if (node_.size() == 0 && !noun.empty()) reject(fmt::format("{}: empty list names no {}", path_, noun));
  std::vector<Value> entries;
  for (const YAML::Node& entry : node_)
    entries.emplace_back(*document_, entry, fmt::format("{}[{}]", path_, entries.size()), entry.Mark());
  return entries;
}

Mapping Value::mapping(const std::vector<std::string>* known_keys) const {
  if (!is_null() && !node_.IsMap()) expected("a mapping");
  return Mapping(*document_, node_, path_, known_keys);
}

void Value::expected(const std::string& what) const {
  std::string got = node_.IsNull() ? "nothing" : node_.IsSequence() ? "a list" : node_.IsMap() ? "a mapping" : "";
  if (node_.IsScalar()) got = fmt::format("{}'{}'", node_.Tag() == "!" ? "the quoted string " : "", node_.Scalar());
  reject(fmt::format("{}: expected {}, got {}", path_, what, got));
}

Mapping::Mapping(const Document& document, const YAML::Node& node, std::string path,
                 const std::vector<std::string>* known_keys)
    : document_(&document), path_(std::move(path)) {
  for (const auto& pair : node) {
    const YAML::Node& key_node = pair.first;
    if (!key_node.IsScalar() || key_node.Scalar().empty())
      fail("{}: {}: a key must be a name", document.where(path_, key_node.Mark()), path_.empty() ? "the file" : path_);
    const std::string& key = key_node.Scalar();
    const std::string key_path = child_path(key);
    const std::string where = document.where(key_path, key_node.Mark());
    if (known_keys && !contains(*known_keys, key))
      fail("{}: unknown key '{}' (known: {})", where, key_path, fmt::join(*known_keys, ", "));
    if (const Entry* first = find(key))
      fail("{}: key '{}' is given twice (first on line {})", where, key_path, first->key_mark.line + 1);
    const YAML::Node& value = pair.second;
    const YAML::Mark value_mark = value.IsNull() ? key_node.Mark() : value.Mark();
    entries_.push_back({key, key_node.Mark(), Value(document, value, key_path, value_mark)});
  }
}

Value Mapping::required(const std::string& key) const {
  Value value = at(key);
  if (value.is_null())
    fail("{}: missing required key '{}'", document_->where(value.path(), YAML::Mark::null_mark()), value.path());
  return value;
}

void Mapping::reject_key(const std::string& key, const std::string& message) const {
  const Entry* entry = find(key);
  fail("{}: {}", document_->where(child_path(key), entry ? entry->key_mark : YAML::Mark::null_mark()), message);
}

template <typename T>
T Value::as(const Range& range) const {
  const bool plain = node_.IsScalar() && node_.Tag() != "!";  // YAML tags quoted scalars "!"
  if constexpr (std::is_same_v<T, std::string>) {
    if (!node_.IsScalar()) expected("a string");
    return node_.Scalar();
  } else if constexpr (std::is_same_v<T, bool>) {
    // YAML 1.2 core schema booleans; yes/no/on/off are text there, so they are errors here.
    static const std::set<std::string> kTrue = {"true", "True", "TRUE"}, kFalse = {"false", "False", "FALSE"};
    if (plain && kTrue.count(node_.Scalar())) return true;
    if (plain && kFalse.count(node_.Scalar())) return false;
    expected("true or false");
  } else {
    T number{};
    const std::string text = plain ? node_.Scalar() : "";
    const bool plus_sign = text.size() > 1 && text[0] == '+' && text[1] != '-';  // YAML allows "+1"; from_chars not
    const auto [end, error] = std::from_chars(text.data() + plus_sign, text.data() + text.size(), number);
    const bool whole_text = !text.empty() && end == text.data() + text.size();
    if (std::is_integral_v<T> && whole_text && error == std::errc::result_out_of_range)
      reject(fmt::format("{} must be an integer from {} to {}, got {}", path_, std::numeric_limits<T>::min(),
                         std::numeric_limits<T>::max(), text));
    if (!whole_text || error != std::errc() || !std::isfinite(static_cast<double>(number)))
      expected(std::is_same_v<T, double> ? "a number" : std::is_signed_v<T> ? "an integer" : "a non-negative integer");
    if (!range.contains(static_cast<double>(number))) reject(fmt::format("{} must be {}", path_, range.describe()));
    return number;
  }
}
template std::string Value::as<std::string>(const Range&) const;
template bool Value::as<bool>(const Range&) const;
template int64_t Value::as<int64_t>(const Range&) const;
template uint64_t Value::as<uint64_t>(const Range&) const;
template double Value::as<double>(const Range&) const;


}  // namespace kvdrift
