#include "sweep/sweep_file.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "core/thread_limit.h"
#include "io/yaml_size.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kTopLevelKeys = {"name", "root", "base", "grid", "zip", "exclude", "launcher"};
const std::vector<std::string> kLocalKeys = {"workers", "devices", "threads"};
const std::vector<std::string> kSlurmKeys = {"partition",     "account",      "time",  "mem",  "cpus_per_task",
                                             "gpus_per_task", "max_parallel", "extra", "setup"};

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

// Whether a quoted scalar would read as something other than a string if written plain.
bool reads_as_non_string(const std::string& text) {
  static const std::set<std::string> kSpecial = {"",     "~",    "null",  "Null",  "NULL", "true",
                                                 "True", "TRUE", "false", "False", "FALSE"};
  return kSpecial.count(text) > 0 || is_yaml_number(text);
}

std::string canonical_yaml(const YAML::Node& node);

void emit_canonical(YAML::Emitter& out, const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null:
      out << YAML::Null;
      break;
    case YAML::NodeType::Scalar:
      if (node.Tag() == "!" && reads_as_non_string(node.Scalar())) {
        out << YAML::DoubleQuoted << node.Scalar();
      } else {
        out << node.Scalar();
      }
      break;
    case YAML::NodeType::Sequence:
      out << YAML::Flow << YAML::BeginSeq;
      for (const YAML::Node& entry : node) emit_canonical(out, entry);
      out << YAML::EndSeq;
      break;
    case YAML::NodeType::Map: {
      // Keys sorted, so that equal mappings written in another order get the same text (and point id).
      std::map<std::string, std::pair<YAML::Node, YAML::Node>> sorted;
      for (const auto& pair : node) sorted.emplace(canonical_yaml(pair.first), std::make_pair(pair.first, pair.second));
      out << YAML::Flow << YAML::BeginMap;
      for (const auto& [text, pair] : sorted) {
        out << YAML::Key;
        emit_canonical(out, pair.first);
        out << YAML::Value;
        emit_canonical(out, pair.second);
      }
      out << YAML::EndMap;
      break;
    }
  }
}

std::string canonical_yaml(const YAML::Node& node) {
  YAML::Emitter out;
  emit_canonical(out, node);
  return out.c_str();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) fail("cannot read sweep file {}", path);
  return text.str();
}

// Reads the nodes of one sweep file; every error names the file and the line.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void reject(int line, const std::string& message) const { fail("{}:{}: {}", file_, line, message); }
  [[noreturn]] void reject(const YAML::Mark& mark, const std::string& message) const { reject(mark.line + 1, message); }

  // The pairs of a mapping in file order; keys must be non-empty names, each given once.
  std::vector<std::pair<YAML::Node, YAML::Node>> pairs(const YAML::Node& node, const YAML::Mark& mark,
                                                       const std::string& what) const {
    if (!node.IsMap()) reject(node.IsDefined() && !node.IsNull() ? node.Mark() : mark, what + " must be a mapping");
    std::vector<std::pair<YAML::Node, YAML::Node>> result;
    std::map<std::string, int> lines;
    for (const auto& pair : node) {
      if (!pair.first.IsScalar() || pair.first.Scalar().empty())
        reject(pair.first.Mark(), what + ": a key must be a name");
      const std::string& key = pair.first.Scalar();
      const auto [first, inserted] = lines.emplace(key, pair.first.Mark().line + 1);
      if (!inserted)
        reject(pair.first.Mark(),
               fmt::format("{}: key '{}' is given twice (first on line {})", what, key, first->second));
      result.emplace_back(pair.first, pair.second);
    }
    return result;
  }

  std::string text(const YAML::Node& node, const YAML::Mark& mark, const std::string& key) const {
    if (!node.IsScalar() || node.Scalar().empty())
      reject(node.IsNull() ? mark : node.Mark(), key + ": expected a non-empty string");
    return node.Scalar();
  }

  int64_t integer(const YAML::Node& node, const YAML::Mark& mark, const std::string& key, int64_t min) const {
    int64_t value = 0;
    const std::string text = node.IsScalar() && node.Tag() != "!" ? node.Scalar() : "";
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (text.empty() || error != std::errc() || end != text.data() + text.size())
      reject(node.IsNull() ? mark : node.Mark(),
             fmt::format("{}: expected an integer, got '{}'", key, canonical_yaml(node)));
    if (value < min) reject(node.Mark(), fmt::format("{} must be >= {}, got {}", key, min, value));
    return value;
  }

  std::vector<std::string> texts(const YAML::Node& node, const YAML::Mark& mark, const std::string& key) const {
    if (!node.IsSequence()) reject(node.IsNull() ? mark : node.Mark(), key + ": expected a list of strings");
    std::vector<std::string> result;
    for (const YAML::Node& entry : node) result.push_back(text(entry, node.Mark(), key));
    return result;
  }

  // A non-empty list of values, each as canonical YAML.
  std::vector<std::string> values(const YAML::Node& node, const YAML::Mark& key_mark, const std::string& what) const {
    if (!node.IsSequence())
      reject(node.IsNull() ? key_mark : node.Mark(),
             fmt::format("{}: expected a list of values (write [X] for a single value X)", what));
    if (node.size() == 0) reject(node.Mark(), fmt::format("{}: the list of values is empty", what));
    std::vector<std::string> result;
    for (const YAML::Node& value : node) result.push_back(canonical_yaml(value));
    return result;
  }

  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

// Two equal entries of an axis would make every point along them twice.
void check_entries_distinct(const Reader& reader, const Axis& axis, int line, const std::string& what) {
  std::map<std::vector<std::string>, size_t> first_entry;
  for (size_t i = 0; i < axis.values.size(); ++i) {
    const auto [first, inserted] = first_entry.emplace(axis.values[i], i);
    if (inserted) continue;
    std::vector<std::string> assignments;
    for (size_t k = 0; k < axis.keys.size(); ++k) assignments.push_back(axis.keys[k] + "=" + axis.values[i][k]);
    reader.reject(line, fmt::format("{}: entries {} and {} are the same ({}), so their points would be duplicates",
                                    what, first->second + 1, i + 1, fmt::join(assignments, ", ")));
  }
}

Axis read_grid_key(const Reader& reader, const YAML::Node& key, const YAML::Node& value) {
  Axis axis;
  axis.keys = {key.Scalar()};
  axis.key_lines = {key.Mark().line + 1};
  const std::string what = "grid key '" + key.Scalar() + "'";
  for (std::string& v : reader.values(value, key.Mark(), what)) axis.values.push_back({v});
  check_entries_distinct(reader, axis, key.Mark().line + 1, what);
  return axis;
}

Axis read_zip_group(const Reader& reader, const YAML::Node& group, size_t index) {
  const std::string what = fmt::format("zip group {}", index + 1);
  Axis axis;
  std::vector<std::vector<std::string>> columns;
  for (const auto& [key, value] : reader.pairs(group, group.Mark(), what)) {
    std::vector<std::string> column = reader.values(value, key.Mark(), fmt::format("{}: key '{}'", what, key.Scalar()));
    if (!columns.empty() && column.size() != columns.front().size())
      reader.reject(key.Mark(),
                    fmt::format("{}: key '{}' has {} values, but key '{}' has {}: the keys of a zip group "
                                "vary together, so their lists must be equally long",
                                what, key.Scalar(), column.size(), axis.keys.front(), columns.front().size()));
    axis.keys.push_back(key.Scalar());
    axis.key_lines.push_back(key.Mark().line + 1);
    columns.push_back(std::move(column));
  }
  if (columns.empty()) reader.reject(group.Mark(), what + " is empty");
  axis.values.resize(columns.front().size());
  for (size_t i = 0; i < axis.values.size(); ++i)
    for (const auto& column : columns) axis.values[i].push_back(column[i]);
  check_entries_distinct(reader, axis, group.Mark().line + 1, what);
  return axis;
}

// Each key once over grid and zip together, and none under another (the later would overwrite part
// of the earlier, or all of it, depending on the order they are applied in).
void check_keys_distinct(const Reader& reader, const std::vector<Axis>& axes) {
  std::vector<std::pair<std::string, int>> keys;
  for (const Axis& axis : axes)
    for (size_t k = 0; k < axis.keys.size(); ++k) keys.emplace_back(axis.keys[k], axis.key_lines[k]);
  for (size_t i = 0; i < keys.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      const auto& [a, a_line] = keys[j];
      const auto& [b, b_line] = keys[i];
      if (a == b)
        reader.reject(b_line, fmt::format("key '{}' is given twice in grid and zip (first on line {})", b, a_line));
      const auto under = [](const std::string& inner, const std::string& outer) {
        return inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '.';
      };
      if (under(a, b) || under(b, a))
        reader.reject(
            b_line, fmt::format("key '{}' overlaps key '{}' (line {}): one lies inside the other; give one of them", b,
                                a, a_line));
    }
  }
}

ExcludeRule read_exclude_rule(const Reader& reader, const YAML::Node& rule, size_t index,
                              const std::vector<Axis>& axes) {
  const std::string what = fmt::format("exclude rule {}", index + 1);
  ExcludeRule result;
  result.line = rule.Mark().line + 1;
  for (const auto& [key, value] : reader.pairs(rule, rule.Mark(), what)) {
    const Axis* axis = nullptr;
    size_t column = 0;
    for (const Axis& a : axes) {
      const auto it = std::find(a.keys.begin(), a.keys.end(), key.Scalar());
      if (it != a.keys.end()) {
        axis = &a;
        column = static_cast<size_t>(it - a.keys.begin());
      }
    }
    if (!axis) reader.reject(key.Mark(), fmt::format("{}: '{}' is not a grid or zip key", what, key.Scalar()));
    const std::string text = canonical_yaml(value);
    const bool taken = std::any_of(axis->values.begin(), axis->values.end(),
                                   [&](const std::vector<std::string>& point) { return point[column] == text; });
    if (!taken)
      reader.reject(value.IsNull() ? key.Mark() : value.Mark(),
                    fmt::format("{}: key '{}' never takes the value {} in this sweep, so the rule excludes nothing",
                                what, key.Scalar(), text));
    result.matches.emplace_back(key.Scalar(), text);
  }
  if (result.matches.empty()) reader.reject(rule.Mark(), what + " is empty (it would exclude every point)");
  return result;
}

void read_launcher(const Reader& reader, const YAML::Node& node, const YAML::Mark& mark, SweepFile& sweep) {
  const auto pairs = reader.pairs(node, mark, "launcher");
  const auto kind = std::find_if(pairs.begin(), pairs.end(), [](const auto& p) { return p.first.Scalar() == "kind"; });
  if (kind == pairs.end()) reader.reject(node.Mark(), "launcher: missing required key 'kind' (local or slurm)");
  sweep.launcher_kind = reader.text(kind->second, kind->first.Mark(), "launcher.kind");
  if (sweep.launcher_kind != "local" && sweep.launcher_kind != "slurm")
    reader.reject(kind->second.Mark(),
                  fmt::format("launcher.kind: unknown launcher '{}' (known: local, slurm)", sweep.launcher_kind));
  const bool local = sweep.launcher_kind == "local";
  const std::vector<std::string>& known = local ? kLocalKeys : kSlurmKeys;
  for (const auto& [key_node, value] : pairs) {
    const std::string& key = key_node.Scalar();
    const std::string path = "launcher." + key;
    const YAML::Mark key_mark = key_node.Mark();
    if (key == "kind") continue;
    if (!contains(known, key)) {
      const bool other_kind = contains(local ? kSlurmKeys : kLocalKeys, key);
      reader.reject(key_mark, other_kind ? fmt::format("{} belongs to launcher kind {}, not {}", path,
                                                       local ? "slurm" : "local", sweep.launcher_kind)
                                         : fmt::format("unknown key '{}' (known for kind {}: kind, {})", path,
                                                       sweep.launcher_kind, fmt::join(known, ", ")));
    }
    if (key == "workers") sweep.local.workers = reader.integer(value, key_mark, path, 1);
    if (key == "threads") {
      sweep.local.threads = reader.integer(value, key_mark, path, 1);
      if (sweep.local.threads > kMaxThreads)
        reader.reject(value.Mark(), fmt::format("{} must be <= {}, got {}", path, kMaxThreads, sweep.local.threads));
    }
    if (key == "devices") {
      static const std::regex kDeviceForm("cpu|cuda:[0-9]+");
      sweep.local.devices = reader.texts(value, key_mark, path);
      if (sweep.local.devices.empty()) reader.reject(value.Mark(), path + ": the list is empty");
      for (const std::string& device : sweep.local.devices)
        if (!std::regex_match(device, kDeviceForm))
          reader.reject(value.Mark(), fmt::format("{}: expected cpu or cuda:N, got '{}'", path, device));
    }
    if (key == "partition") sweep.slurm.partition = reader.text(value, key_mark, path);
    if (key == "account") sweep.slurm.account = reader.text(value, key_mark, path);
    if (key == "time") sweep.slurm.time = reader.text(value, key_mark, path);
    if (key == "mem") sweep.slurm.mem = reader.text(value, key_mark, path);
    if (key == "cpus_per_task") sweep.slurm.cpus_per_task = reader.integer(value, key_mark, path, 1);
    if (key == "gpus_per_task") sweep.slurm.gpus_per_task = reader.integer(value, key_mark, path, 0);
    if (key == "max_parallel") sweep.slurm.max_parallel = reader.integer(value, key_mark, path, 1);
    if (key == "extra") sweep.slurm.extra = reader.texts(value, key_mark, path);
    if (key == "setup") sweep.slurm.setup = reader.text(value, key_mark, path);
  }
}

}  // namespace

bool is_yaml_number(const std::string& canonical_text) {
  static const std::regex kNumber(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  return std::regex_match(canonical_text, kNumber);
}

std::string SweepFile::directory() const { return (fs::path(root) / name).string(); }

std::string SweepFile::file_directory() const { return fs::path(path).parent_path().string(); }

std::vector<std::string> SweepFile::keys() const {
  std::vector<std::string> result;
  for (const Axis& axis : axes) result.insert(result.end(), axis.keys.begin(), axis.keys.end());
  return result;
}

int SweepFile::line_of(const std::string& key) const {
  for (const Axis& axis : axes)
    for (size_t k = 0; k < axis.keys.size(); ++k)
      if (axis.keys[k] == key) return axis.key_lines[k];
  return 0;
}

SweepFile load_sweep_file(const std::string& path) {
  std::error_code error;
  if (!fs::is_regular_file(path, error)) fail("sweep file not found: {}", path);
  SweepFile sweep;
  sweep.path = fs::absolute(path).lexically_normal().string();
  const std::string text = read_text(path);
  sweep.text_sha256 = sha256_hex(text);
  const Reader reader(path);
  YAML::Node document;
  try {
    document = load_yaml(text);
  } catch (const YAML::Exception& syntax_error) {
    fail("{}:{}: YAML syntax error: {}", path, syntax_error.mark.line + 1, syntax_error.msg);
  }
  check_yaml_size(document, path);
  if (!document.IsMap()) fail("{}: a sweep file is a mapping with keys {}", path, fmt::join(kTopLevelKeys, ", "));

  std::map<std::string, std::pair<YAML::Node, YAML::Mark>> sections;
  for (const auto& [key, value] : reader.pairs(document, document.Mark(), "the sweep file")) {
    if (!contains(kTopLevelKeys, key.Scalar()))
      reader.reject(key.Mark(),
                    fmt::format("unknown key '{}' (known: {})", key.Scalar(), fmt::join(kTopLevelKeys, ", ")));
    sections[key.Scalar()] = {value, key.Mark()};
  }
  const auto required = [&](const std::string& key) -> const std::pair<YAML::Node, YAML::Mark>& {
    const auto it = sections.find(key);
    if (it == sections.end()) fail("{}: missing required key '{}'", path, key);
    return it->second;
  };

  const auto& [name, name_mark] = required("name");
  sweep.name = reader.text(name, name_mark, "name");
  static const std::regex kNameForm("[A-Za-z0-9._-]+");
  if (!std::regex_match(sweep.name, kNameForm) || sweep.name == "." || sweep.name == "..")
    reader.reject(
        name.Mark(),
        fmt::format("name '{}' may only hold letters, digits, '.', '_' and '-' (it names a directory)", sweep.name));
  const auto& [root, root_mark] = required("root");
  sweep.root = (fs::path(sweep.file_directory()) / reader.text(root, root_mark, "root")).lexically_normal().string();

  const auto& [base, base_mark] = required("base");
  sweep.base_line = base_mark.line + 1;
  if (base.IsMap()) {
    for (const auto& [section, value] : reader.pairs(base, base_mark, "base"))
      sweep.inline_base_overrides.push_back(section.Scalar() + "=" + canonical_yaml(value));
  } else {
    sweep.base_path =
        (fs::path(sweep.file_directory()) / reader.text(base, base_mark, "base")).lexically_normal().string();
    if (!fs::is_regular_file(sweep.base_path, error))
      reader.reject(base.Mark(), fmt::format("base: config file not found: {}", sweep.base_path));
  }

  if (const auto it = sections.find("grid"); it != sections.end()) {
    const auto pairs = reader.pairs(it->second.first, it->second.second, "grid");
    if (pairs.empty()) reader.reject(it->second.second, "grid is empty: give at least one key with its values");
    for (const auto& [key, value] : pairs) sweep.axes.push_back(read_grid_key(reader, key, value));
  }
  if (const auto it = sections.find("zip"); it != sections.end()) {
    const YAML::Node& groups = it->second.first;
    if (!groups.IsSequence() || groups.size() == 0)
      reader.reject(it->second.second,
                    "zip must be a non-empty list of groups (mappings of keys to equally long lists)");
    for (size_t i = 0; i < groups.size(); ++i) sweep.axes.push_back(read_zip_group(reader, groups[i], i));
  }
  if (sweep.axes.empty()) fail("{}: the sweep has no axes: give grid (or zip) keys with lists of values", path);
  check_keys_distinct(reader, sweep.axes);

  if (const auto it = sections.find("exclude"); it != sections.end()) {
    const YAML::Node& rules = it->second.first;
    if (!rules.IsSequence())
      reader.reject(it->second.second, "exclude must be a list of rules (mappings of keys to values)");
    for (size_t i = 0; i < rules.size(); ++i)
      sweep.excludes.push_back(read_exclude_rule(reader, rules[i], i, sweep.axes));
  }

  const auto& [launcher, launcher_mark] = required("launcher");
  read_launcher(reader, launcher, launcher_mark, sweep);
  return sweep;
}

}  // namespace kvdrift::sweep
