#include "sweep/sweep_file.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <regex>
#include <set>

#include "core/error.h"
#include "core/sha256.h"
#include "core/thread_limit.h"
#include "io/strict_yaml.h"

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

// A non-empty list of values, each as canonical YAML.
std::vector<std::string> axis_values(const Value& list, const std::string& what) {
  if (!list.node().IsSequence())
    list.reject(fmt::format("{}: expected a list of values (write [X] for a single value X)", what));
  if (list.node().size() == 0) list.reject(fmt::format("{}: the list of values is empty", what));
  std::vector<std::string> result;
  for (const YAML::Node& value : list.node()) result.push_back(canonical_yaml(value));
  return result;
}

// A launcher integer: at least `min`.
int64_t at_least(const Value& value, int64_t min) {
  const int64_t number = value.as<int64_t>();
  if (number < min) value.reject(fmt::format("{} must be >= {}, got {}", value.path(), min, number));
  return number;
}

std::vector<std::string> texts(const Value& list) {
  std::vector<std::string> result;
  for (const Value& entry : list.elements("")) result.push_back(entry.text());
  return result;
}

// Two equal entries of an axis would make every point along them twice.
void check_entries_distinct(const std::string& file, const Axis& axis, int line, const std::string& what) {
  std::map<std::vector<std::string>, size_t> first_entry;
  for (size_t i = 0; i < axis.values.size(); ++i) {
    const auto [first, inserted] = first_entry.emplace(axis.values[i], i);
    if (inserted) continue;
    std::vector<std::string> assignments;
    for (size_t k = 0; k < axis.keys.size(); ++k) assignments.push_back(axis.keys[k] + "=" + axis.values[i][k]);
    fail("{}:{}: {}: entries {} and {} are the same ({}), so their points would be duplicates", file, line, what,
         first->second + 1, i + 1, fmt::join(assignments, ", "));
  }
}

Axis read_grid_key(const std::string& file, const Mapping::Entry& entry) {
  Axis axis;
  axis.keys = {entry.key};
  axis.key_lines = {entry.key_mark.line + 1};
  const std::string what = "grid key '" + entry.key + "'";
  for (std::string& v : axis_values(entry.value, what)) axis.values.push_back({v});
  check_entries_distinct(file, axis, entry.key_mark.line + 1, what);
  return axis;
}

Axis read_zip_group(const std::string& file, const Value& group, size_t index) {
  const std::string what = fmt::format("zip group {}", index + 1);
  Axis axis;
  std::vector<std::vector<std::string>> columns;
  const Mapping keys = group.open_mapping();
  for (const Mapping::Entry& entry : keys.entries()) {
    std::vector<std::string> column = axis_values(entry.value, fmt::format("{}: key '{}'", what, entry.key));
    if (!columns.empty() && column.size() != columns.front().size())
      fail("{}:{}: {}: key '{}' has {} values, but key '{}' has {}: the keys of a zip group vary together, so their "
           "lists must be equally long",
           file, entry.key_mark.line + 1, what, entry.key, column.size(), axis.keys.front(), columns.front().size());
    axis.keys.push_back(entry.key);
    axis.key_lines.push_back(entry.key_mark.line + 1);
    columns.push_back(std::move(column));
  }
  if (columns.empty()) group.reject(what + " is empty");
  axis.values.resize(columns.front().size());
  for (size_t i = 0; i < axis.values.size(); ++i)
    for (const auto& column : columns) axis.values[i].push_back(column[i]);
  check_entries_distinct(file, axis, group.node().Mark().line + 1, what);
  return axis;
}

// Each key once over grid and zip together, and none under another (the later would overwrite part
// of the earlier, or all of it, depending on the order they are applied in).
void check_keys_distinct(const std::string& file, const std::vector<Axis>& axes) {
  std::vector<std::pair<std::string, int>> keys;
  for (const Axis& axis : axes)
    for (size_t k = 0; k < axis.keys.size(); ++k) keys.emplace_back(axis.keys[k], axis.key_lines[k]);
  for (size_t i = 0; i < keys.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      const auto& [a, a_line] = keys[j];
      const auto& [b, b_line] = keys[i];
      if (a == b)
        fail("{}:{}: key '{}' is given twice in grid and zip (first on line {})", file, b_line, b, a_line);
      const auto under = [](const std::string& inner, const std::string& outer) {
        return inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 && inner[outer.size()] == '.';
      };
      if (under(a, b) || under(b, a))
        fail("{}:{}: key '{}' overlaps key '{}' (line {}): one lies inside the other; give one of them", file, b_line,
             b, a, a_line);
    }
  }
}

ExcludeRule read_exclude_rule(const Value& rule, size_t index, const std::vector<Axis>& axes) {
  const std::string what = fmt::format("exclude rule {}", index + 1);
  ExcludeRule result;
  result.line = rule.node().Mark().line + 1;
  const Mapping matches = rule.open_mapping();
  for (const Mapping::Entry& entry : matches.entries()) {
    const Axis* axis = nullptr;
    size_t column = 0;
    for (const Axis& a : axes) {
      const auto it = std::find(a.keys.begin(), a.keys.end(), entry.key);
      if (it != a.keys.end()) {
        axis = &a;
        column = static_cast<size_t>(it - a.keys.begin());
      }
    }
    if (!axis) matches.reject_key(entry.key, fmt::format("{}: '{}' is not a grid or zip key", what, entry.key));
    const std::string text = canonical_yaml(entry.value.node());
    const bool taken = std::any_of(axis->values.begin(), axis->values.end(),
                                   [&](const std::vector<std::string>& point) { return point[column] == text; });
    if (!taken)
      entry.value.reject(fmt::format("{}: key '{}' never takes the value {} in this sweep, so the rule excludes "
                                     "nothing", what, entry.key, text));
    result.matches.emplace_back(entry.key, text);
  }
  if (result.matches.empty()) rule.reject(what + " is empty (it would exclude every point)");
  return result;
}

void read_launcher(const Value& value, SweepFile& sweep) {
  const Mapping launcher = value.open_mapping();
  sweep.launcher_kind = launcher.required("kind").one_of({"local", "slurm"}, "launcher");
  const bool local = sweep.launcher_kind == "local";
  const std::vector<std::string>& known = local ? kLocalKeys : kSlurmKeys;
  for (const Mapping::Entry& entry : launcher.entries()) {
    const std::string& key = entry.key;
    const Value& v = entry.value;
    if (key == "kind") continue;
    if (!contains(known, key)) {
      const bool other_kind = contains(local ? kSlurmKeys : kLocalKeys, key);
      launcher.reject_key(key, other_kind ? fmt::format("{} belongs to launcher kind {}, not {}", v.path(),
                                                        local ? "slurm" : "local", sweep.launcher_kind)
                                          : fmt::format("unknown key '{}' (known for kind {}: kind, {})", v.path(),
                                                        sweep.launcher_kind, fmt::join(known, ", ")));
    }
    if (key == "workers") sweep.local.workers = at_least(v, 1);
    if (key == "threads") {
      sweep.local.threads = at_least(v, 1);
      if (sweep.local.threads > kMaxThreads)
        v.reject(fmt::format("{} must be <= {}, got {}", v.path(), kMaxThreads, sweep.local.threads));
    }
    if (key == "devices") {
      static const std::regex kDeviceForm("cpu|cuda:[0-9]+");
      sweep.local.devices = texts(v);
      if (sweep.local.devices.empty()) v.reject(v.path() + ": the list is empty");
      for (const std::string& device : sweep.local.devices)
        if (!std::regex_match(device, kDeviceForm))
          v.reject(fmt::format("{}: expected cpu or cuda:N, got '{}'", v.path(), device));
    }
    if (key == "partition") sweep.slurm.partition = v.text();
    if (key == "account") sweep.slurm.account = v.text();
    if (key == "time") sweep.slurm.time = v.text();
    if (key == "mem") sweep.slurm.mem = v.text();
    if (key == "cpus_per_task") sweep.slurm.cpus_per_task = at_least(v, 1);
    if (key == "gpus_per_task") sweep.slurm.gpus_per_task = at_least(v, 0);
    if (key == "max_parallel") sweep.slurm.max_parallel = at_least(v, 1);
    if (key == "extra") sweep.slurm.extra = texts(v);
    if (key == "setup") sweep.slurm.setup = v.text();
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
  const YamlFile file = read_yaml_file(path, "sweep");
  if (!file.document.IsMap()) fail("{}: a sweep file is a mapping with keys {}", path, fmt::join(kTopLevelKeys, ", "));
  SweepFile sweep;
  sweep.path = fs::absolute(path).lexically_normal().string();
  sweep.text = file.text;
  sweep.text_sha256 = sha256_hex(file.text);
  const Document document(file.document, {path, sweep.file_directory(), ""});
  const Mapping top = document.root().mapping(kTopLevelKeys);

  const Value name = top.required("name");
  sweep.name = name.text();
  static const std::regex kNameForm("[A-Za-z0-9._-]+");
  if (!std::regex_match(sweep.name, kNameForm) || sweep.name == "." || sweep.name == "..")
    name.reject(fmt::format("name '{}' may only hold letters, digits, '.', '_' and '-' (it names a directory)",
                            sweep.name));
  sweep.root = (fs::path(sweep.file_directory()) / top.required_text("root")).lexically_normal().string();

  const Value base = top.required("base");
  if (base.node().IsMap()) {
    sweep.inline_base = true;
  } else {
    sweep.base_path = (fs::path(sweep.file_directory()) / base.text()).lexically_normal().string();
    std::error_code error;
    if (!fs::is_regular_file(sweep.base_path, error))
      base.reject(fmt::format("base: config file not found: {}", sweep.base_path));
  }

  if (top.has("grid")) {
    const Mapping grid = top.at("grid").open_mapping();
    if (grid.entries().empty()) top.reject_key("grid", "grid is empty: give at least one key with its values");
    for (const Mapping::Entry& entry : grid.entries()) sweep.axes.push_back(read_grid_key(path, entry));
  }
  if (top.has("zip")) {
    const Value zip = top.at("zip");
    if (!zip.node().IsSequence() || zip.node().size() == 0)
      top.reject_key("zip", "zip must be a non-empty list of groups (mappings of keys to equally long lists)");
    const std::vector<Value> groups = zip.elements("group");
    for (size_t i = 0; i < groups.size(); ++i) sweep.axes.push_back(read_zip_group(path, groups[i], i));
  }
  if (sweep.axes.empty()) fail("{}: the sweep has no axes: give grid (or zip) keys with lists of values", path);
  check_keys_distinct(path, sweep.axes);

  if (top.has("exclude")) {
    const Value exclude = top.at("exclude");
    if (!exclude.node().IsSequence())
      top.reject_key("exclude", "exclude must be a list of rules (mappings of keys to values)");
    const std::vector<Value> rules = exclude.elements("");
    for (size_t i = 0; i < rules.size(); ++i) sweep.excludes.push_back(read_exclude_rule(rules[i], i, sweep.axes));
  }

  read_launcher(top.required("launcher"), sweep);
  return sweep;
}

}  // namespace kvdrift::sweep
