#pragma once
// kvdrift's one reader of YAML inputs: run configs, sweep files and --set overrides. Strict, because a
// silently ignored setting wastes a research run; bounded, because a malformed file must not hang it.
//
// Bounds. yaml-cpp 0.7 loops forever on some malformed text (a ',' where a top-level node starts:
// ", a", "[a] ,"), building nodes until memory runs out: load_yaml runs a first pass that stops such a
// loop (text yields a few parser events per byte at most; more is the loop, thrown as a
// YAML::ParserException where it spins). A YAML alias repeats a node without repeating its text, so a
// few hundred bytes can stand for billions of nodes (an "alias bomb"): check_yaml_size bounds a
// loaded document.
//
// Strictness. A Document is a YAML tree that knows where each of its values came from: a line of its
// file, or an Override (a --set argument, a sweep file's grid value). Values read through it are typed
// (a quoted "12" is text, not a number; yes/no are text, not booleans), checked against ranges and
// known keys, keys are given once, and every error names the dotted key and that origin:
// "configs/demo.yaml:12: decoding.top_p must be in (0, 1]", "--set decoding.top_p=2: ...".
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/enum_names.h"
#include "core/error.h"

namespace kvdrift {

// --- Bounded loading ---

YAML::Node load_yaml(const std::string& text);
std::vector<YAML::Node> load_yaml_documents(const std::string& text);

inline constexpr int64_t kMaxYamlNodes = 100000;  // far above any real config or sweep file

// Throws Error "WHERE: expands to more than 100000 YAML nodes ..." when `document` does, counting
// each alias's node every time it is used; stops counting at the bound, so it is fast either way.
void check_yaml_size(const YAML::Node& document, const std::string& where);

// A file's one YAML document, bounded, and its text. `kind` names the file in errors ("config":
// "config file not found: PATH", "PATH:12: a config is one YAML document, but a second one starts
// here"; syntax errors name the line).
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

// Where a document comes from: errors name `file` and its lines; relative paths written in it resolve
// against `base_dir`; `context`, when given, follows every location an error names (a sweep names the
// point there: ": point ID (key=value ...)").
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

  Value root() const;
  const YamlSource& source() const { return source_; }

  // The origin of the innermost override that set `key_path` or a mapping or list holding it, else
  // FILE:LINE at `mark` (FILE alone for a null mark, as for a key that is missing); then the context.
  std::string where(const std::string& key_path, const YAML::Mark& mark) const;
  // Like where, but an override that set part of `key_path` also names it: the origin of a setting as
  // a whole (a quantizer whose params a --set changed).
  std::string where_any(const std::string& key_path, const YAML::Mark& mark) const;
  // Whether an override set `key_path` or a mapping or list holding it.
  bool overridden(const std::string& key_path) const { return override_of(key_path) != nullptr; }
  // The directory relative paths at `key_path` resolve against.
  const std::string& base_dir(const std::string& key_path) const;

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
  // The 1-based line in the document's file; 0 for a value an override set or a missing one.
  int line() const;
  std::string where() const { return document_->where(path_, mark_); }
  std::string origin() const { return document_->where_any(path_, mark_); }
  const std::string& base_dir() const { return document_->base_dir(path_); }
  [[noreturn]] void reject(const std::string& message) const { fail("{}: {}", where(), message); }

  // T: std::string (any scalar, as written), bool, int64_t, uint64_t or double (plain scalars: a
  // quoted "12" is text, not a number). Numbers must lie in `range`.
  template <typename T>
  T as(const Range& range = kAnyNumber) const;
  template <typename T>
  T as_or(const T& fallback, const Range& range = kAnyNumber) const {
    return is_null() ? fallback : as<T>(range);
  }
  // A string that is not empty.
  std::string text() const;

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

  // A mapping (null reads as empty) whose keys must be among `known_keys`.
  Mapping mapping(const std::vector<std::string>& known_keys) const;
  // A mapping with keys of any name (a quantizer's params, which its own parser checks).
  Mapping open_mapping() const;

  [[noreturn]] void expected(const std::string& what) const;

 private:
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
  Value at(const std::string& key) const;
  Value required(const std::string& key) const;
  std::string required_text(const std::string& key) const { return required(key).text(); }
  bool has(const std::string& key) const { return !at(key).is_null(); }

  // An error located at the key itself, for settings that are wrong in combination with others.
  [[noreturn]] void reject_key(const std::string& key, const std::string& message) const;

  const std::vector<Entry>& entries() const { return entries_; }

 private:
  std::string child_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  const Entry* find(const std::string& key) const;

  const Document* document_;
  std::string path_;
  std::vector<Entry> entries_;
};

// --- Value::as, here because it is a template ---

namespace strict_yaml_detail {
// The number in a plain scalar's text, or why there is none.
template <typename T>
struct Number {
  T value{};
  bool parsed = false;
  bool out_of_range = false;  // an integer beyond T, written as one
};
Number<int64_t> parse_int64(const std::string& text);
Number<uint64_t> parse_uint64(const std::string& text);
Number<double> parse_double(const std::string& text);
bool is_plain(const YAML::Node& node);
std::optional<bool> parse_bool(const YAML::Node& node);
}  // namespace strict_yaml_detail

template <typename T>
T Value::as(const Range& range) const {
  namespace detail = strict_yaml_detail;
  if constexpr (std::is_same_v<T, std::string>) {
    if (!node_.IsScalar()) expected("a string");
    return node_.Scalar();
  } else if constexpr (std::is_same_v<T, bool>) {
    if (const std::optional<bool> value = detail::parse_bool(node_)) return *value;
    expected("true or false");
  } else {
    static_assert(std::is_same_v<T, int64_t> || std::is_same_v<T, uint64_t> || std::is_same_v<T, double>);
    const std::string text = detail::is_plain(node_) ? node_.Scalar() : "";
    detail::Number<T> number;
    if constexpr (std::is_same_v<T, int64_t>) number = detail::parse_int64(text);
    if constexpr (std::is_same_v<T, uint64_t>) number = detail::parse_uint64(text);
    if constexpr (std::is_same_v<T, double>) number = detail::parse_double(text);
    if (number.out_of_range)
      reject(fmt::format("{} must be an integer from {} to {}, got {}", path_, std::numeric_limits<T>::min(),
                         std::numeric_limits<T>::max(), text));
    if (!number.parsed)
      expected(std::is_same_v<T, double> ? "a number" : std::is_signed_v<T> ? "an integer" : "a non-negative integer");
    if (!range.contains(static_cast<double>(number.value))) reject(fmt::format("{} must be {}", path_, range.describe()));
    return number.value;
  }
}

}  // namespace kvdrift
