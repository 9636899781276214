#pragma once
// kvdrift's one reader of YAML inputs (run configs, sweep files, --set overrides): bounded, because a
// malformed file must not hang a run, and strict, because a silently ignored setting wastes one.
// - yaml-cpp 0.7 loops forever on some malformed text (", a", "[a] ,"): load_yaml first runs the parser
//   without building nodes and stops it past a few events per byte. An alias repeats a node without its
//   text (an "alias bomb" of 300 bytes stands for billions of nodes): files and --set values that expand
//   to more than 100,000 nodes are refused.
// - A Document is a YAML tree that knows where each value came from: a line of its file, or an Override
//   (a --set argument, a sweep file's grid value). Values read through it are typed (a quoted "12" is
//   text; yes/no are not booleans), ranged, keys are known and given once, and every error names the
//   dotted key and that origin: "configs/demo.yaml:12: decoding.top_p must be in (0, 1]".
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/enum_names.h"
#include "core/error.h"

namespace kvdrift {

// --- Bounded loading ---

// YAML::Load behind the loop stop; throws YAML::Exception.
YAML::Node load_yaml(const std::string& text);

// A file's one YAML document, bounded, and its text; `kind` names the file in errors ("config file not
// found: PATH", "PATH:12: a config is one YAML document, but a second one starts here").
struct YamlFile {
  std::string text;
  YAML::Node document;  // null for an empty file
};
YamlFile read_yaml_file(const std::string& path, const std::string& kind);

// --- Overrides ---

// One value set over a document: the YAML `value` at the dotted `key` (a number selects a list
// entry: quantizers.0.params.k_bits), from `origin` as errors name it ("--set a.b=1", "sweep.yaml:12"),
// with relative paths in it resolved against `base_dir`.
struct Override {
  std::string key;
  YAML::Node value;
  std::string origin;
  std::string base_dir;
};

// A --set KEY=VALUE argument as typed on a command line: VALUE is YAML (lanes=[static] sets a list),
// bounded like a file; paths in it are relative to the working directory.
Override parse_set_argument(const std::string& argument);

// --- Reading ---

// The allowed values of a number, worded as error messages state them.
struct Range {
  double low = -std::numeric_limits<double>::infinity();
  bool low_open = false;
  double high = std::numeric_limits<double>::infinity();

  bool contains(double value) const { return (low_open ? value > low : value >= low) && value <= high; }
  std::string describe() const;
};
inline const Range kAnyNumber;
inline const Range kNonNegative{0.0};
inline const Range kPositive{0.0, true};
inline const Range kAtLeastOne{1.0};
inline const Range kAtLeastTwo{2.0};  // a slope needs two points
inline const Range kUnitInterval{0.0, true, 1.0};

// Where a document comes from: errors name `file` and its lines, then `context` (a sweep's point:
// ": point ID (key=value ...)"); relative paths written in it resolve against `base_dir`.
struct YamlSource {
  std::string file;
  std::string base_dir;
  std::string context;
};

class Value;
class Mapping;

// A YAML tree with the origin of each of its values. Values and Mappings read from it refer to it, so
// it outlives them.
class Document {
 public:
  // Overrides change `root` itself (yaml-cpp keeps a node's line only in the tree the parser made, so a
  // copy would lose them): give each Document a tree of its own.
  Document(YAML::Node root, YamlSource source);
  Document(const Document&) = delete;
  Document& operator=(const Document&) = delete;

  // Sets the override's value at its key, making mappings on the way where the tree has none; fails
  // naming the override for a key that cannot be set (an entry a list lacks, a key under a scalar).
  void apply(const Override& override);

  Value root() const;  // defined below Value

  // The origin of the innermost override that set `key_path` or a mapping or list holding it, else
  // FILE:LINE at `mark` (FILE alone for a null mark, as for a key that is missing); then the context.
  std::string where(const std::string& key_path, const YAML::Mark& mark) const;
  // Like where, but an override that set part of `key_path` also names it: the origin of a setting as
  // a whole (a quantizer whose params a --set changed).
  std::string where_any(const std::string& key_path, const YAML::Mark& mark) const;
  // The directory relative paths at `key_path` resolve against.
  const std::string& base_dir(const std::string& key_path) const {
    const Applied* applied = override_of(key_path);
    return applied ? applied->base_dir : source_.base_dir;
  }

 private:
  struct Applied {
    std::string key_path;  // as Values name it: quantizers[0].params
    std::string origin;
    std::string base_dir;
  };
  const Applied* override_of(const std::string& key_path) const;
  std::string located(const std::string& location) const { return location + source_.context; }

  YAML::Node root_;
  YamlSource source_;
  std::vector<Applied> applied_;  // an override replaces the earlier ones it holds
};

// One node of a Document with its key path ("quantizers[1].name"). Typed reads fail with that path
// and where the value came from. A key that is absent reads as a null Value.
class Value {
 public:
  Value(const Document& document, YAML::Node node, std::string path, YAML::Mark mark)
      : document_(&document), node_(std::move(node)), path_(std::move(path)), mark_(mark) {}

  const std::string& path() const { return path_; }
  const YAML::Node& node() const { return node_; }
  bool is_null() const { return node_.IsNull(); }
  std::string where() const { return document_->where(path_, mark_); }
  std::string origin() const { return document_->where_any(path_, mark_); }
  const std::string& base_dir() const { return document_->base_dir(path_); }
  [[noreturn]] void reject(const std::string& message) const { fail("{}: {}", where(), message); }

  // T: std::string (any scalar, as written), bool, int64_t, uint64_t or double (plain scalars: a
  // quoted "12" is text, not a number). Numbers must lie in `range`. Defined for these in the .cpp.
  template <typename T>
  T as(const Range& range = kAnyNumber) const;
  template <typename T>
  T as_or(const T& fallback, const Range& range = kAnyNumber) const {
    return is_null() ? fallback : as<T>(range);
  }
  // A string that is not empty.
  std::string text() const {
    std::string value = as<std::string>();
    if (value.empty()) reject(fmt::format("{} must not be empty", path_));
    return value;
  }

  // A string from `allowed`; `fallback` (if given) when null.
  std::string one_of(const std::vector<std::string>& allowed, const std::string& noun,
                     const std::optional<std::string>& fallback = std::nullopt) const;

  // The enum value named by a string of `table`, with `fallback` (second form) when null.
  template <typename Enum, size_t N>
  Enum choice(const EnumName<Enum> (&table)[N], const std::string& noun) const {
    return *parse_enum(table, one_of(enum_names(table), noun));
  }
  template <typename Enum, size_t N>
  Enum choice(const EnumName<Enum> (&table)[N], const std::string& noun, Enum fallback) const {
    return is_null() ? fallback : choice(table, noun);
  }

  // The entries of a list; a non-empty one unless `noun` is empty.
  std::vector<Value> elements(const std::string& noun) const;

  // A mapping (null reads as empty) whose keys must be among `known_keys`; with none given, keys of
  // any name (a quantizer's params, which its own parser checks).
  Mapping mapping(const std::vector<std::string>& known_keys) const;
  Mapping open_mapping() const;

 private:
  [[noreturn]] void expected(const std::string& what) const;
  Mapping mapping(const std::vector<std::string>* known_keys) const;

  const Document* document_;
  YAML::Node node_;
  std::string path_;
  YAML::Mark mark_;  // the value's own position, or its key's when the value is null
};

// A mapping of a Document. Construction checks its keys: each a name given once and, unless the
// mapping is open, one of the known keys.
class Mapping {
 public:
  struct Entry {
    std::string key;
    YAML::Mark key_mark;
    Value value;
  };

  Mapping(const Document& document, const YAML::Node& node, std::string path,
          const std::vector<std::string>* known_keys);

  // The value at `key`; a null Value when the key is absent.
  Value at(const std::string& key) const {
    if (const Entry* entry = find(key)) return entry->value;
    return Value(*document_, YAML::Node(), child_path(key), YAML::Mark::null_mark());
  }
  Value required(const std::string& key) const;
  std::string required_text(const std::string& key) const { return required(key).text(); }
  bool has(const std::string& key) const { return !at(key).is_null(); }

  // An error located at the key itself, for settings that are wrong in combination with others.
  [[noreturn]] void reject_key(const std::string& key, const std::string& message) const;

  const std::vector<Entry>& entries() const { return entries_; }

 private:
  std::string child_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  const Entry* find(const std::string& key) const {
    for (const Entry& entry : entries_)
      if (entry.key == key) return &entry;
    return nullptr;
  }

  const Document* document_;
  std::string path_;
  std::vector<Entry> entries_;
};

inline Value Document::root() const { return Value(*this, root_, "", root_.Mark()); }
inline Mapping Value::mapping(const std::vector<std::string>& known_keys) const { return mapping(&known_keys); }
inline Mapping Value::open_mapping() const { return mapping(nullptr); }

}  // namespace kvdrift
