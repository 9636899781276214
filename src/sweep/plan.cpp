#include "sweep/plan.h"

#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/line_difference.h"
#include "core/sha256.h"
#include "io/run_config.h"
#include "model/checkpoint.h"
#include "quant/quantizer.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr int kManifestVersion = 1;
constexpr size_t kSlugLength = 40;
constexpr size_t kHashDigits = 12;
// The most points a sweep plans: 10,000 plan in about 5 s, so this bound is about a minute of planning.
constexpr size_t kMaxGridPoints = 100000;

std::string point_id(const std::vector<std::string>& keys, const std::vector<std::string>& values) {
  std::map<std::string, std::string> sorted;
  for (size_t k = 0; k < keys.size(); ++k) sorted[keys[k]] = values[k];
  std::string canonical, slug;
  for (const auto& [key, value] : sorted) {
    canonical += key + "=" + value + "\n";
    if (!slug.empty()) slug += '_';
    for (char c : value)
      if (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-') slug += c;
  }
  slug = slug.substr(0, kSlugLength);
  slug.erase(0, slug.find_first_not_of("-._"));  // an id must not look like an option or a hidden file
  while (!slug.empty() && slug.back() == '_') slug.pop_back();
  const std::string hash = sha256_hex(canonical).substr(0, kHashDigits);
  return slug.empty() ? hash : slug + "-" + hash;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Writes `text` to `path` through a temporary file and a rename, so readers never see half of it
// and a link at `path` is replaced rather than written through.
void write_atomically(const std::string& path, const std::string& text) {
  const std::string temporary = path + ".tmp";
  std::error_code ignored;
  fs::remove(temporary, ignored);  // a link left there would be written through
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out.flush()) fail("cannot write {}", temporary);
  }
  std::error_code error;
  fs::rename(temporary, path, error);
  if (error) fail("cannot rename {} to {}: {}", temporary, path, error.message());
}

// An empty config file for load_run_config when the base is inline (its sections come as overrides).
class EmptyConfigFile {
 public:
  EmptyConfigFile() {
    path_ = (fs::temp_directory_path() / "kvdrift-inline-base-XXXXXX").string();
    const int fd = ::mkstemp(path_.data());
    if (fd < 0) fail("cannot create a temporary file in {}", fs::temp_directory_path().string());
    ::close(fd);
  }
  ~EmptyConfigFile() {
    std::error_code ignored;
    fs::remove(path_, ignored);
  }
  EmptyConfigFile(const EmptyConfigFile&) = delete;
  EmptyConfigFile& operator=(const EmptyConfigFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs with the working directory set to `dir` and restores it: load_run_config resolves relative
// paths of --set values against the working directory, and grid values are relative to the sweep file.
class WorkingDirectory {
 public:
  explicit WorkingDirectory(const std::string& dir) : previous_(fs::current_path()) { fs::current_path(dir); }
  ~WorkingDirectory() {
    std::error_code ignored;
    fs::current_path(previous_, ignored);
  }
  WorkingDirectory(const WorkingDirectory&) = delete;
  WorkingDirectory& operator=(const WorkingDirectory&) = delete;

 private:
  fs::path previous_;
};

// A YAML double-quoted scalar, for a path given as a --set value.
std::string quoted(const std::string& text) { return nlohmann::json(text).dump(); }

// Builds every point's run config and checks it as `kvdrift run` would, before anything is written.
class PointValidator {
 public:
  // `inline_base`: the empty file standing in for an inline base, else null.
  PointValidator(const SweepFile& sweep, const Manifest& manifest, const EmptyConfigFile* inline_base)
      : sweep_(sweep), manifest_(manifest), inline_base_(inline_base) {}

  // The resolved config text of `point`.
  std::string resolved_config(const Point& point) {
    std::vector<std::string> overrides = sweep_.inline_base_overrides;
    for (size_t k = 0; k < manifest_.keys.size(); ++k) overrides.push_back(manifest_.keys[k] + "=" + point.values[k]);
    overrides.push_back("output.path=" + quoted(manifest_.files(point).output));
    const std::string& base = inline_base_ ? inline_base_->path() : sweep_.base_path;
    std::optional<RunConfig> config;
    try {
      config = load_run_config(base, overrides);
    } catch (const Error& error) {
      std::string message = error.what();
      if (inline_base_) replace_all(message, inline_base_->path(), "base");
      reject(point, line_named_in(message), message);
    }
    check_quantizers(point, *config);
    return config->resolved_yaml();
  }

 private:
  [[noreturn]] void reject(const Point& point, int line, const std::string& message) const {
    fail("{}:{}: point {} ({}): {}", sweep_.path, line, point.id, manifest_.describe(point), message);
  }

  // Each distinct quantizer once per model: what the engine does when a run starts.
  void check_quantizers(const Point& point, const RunConfig& config) {
    for (size_t i = 0; i < config.quantizers.size(); ++i) {
      const QuantizerSettings& quantizer = config.quantizers[i];
      std::string key = config.model.path + "\n" + quantizer.method;
      for (const auto& [name, value] : quantizer.params) key += "\n" + name + "=" + value;
      if (checked_quantizers_.count(key)) continue;
      int64_t model_head_dim = 0;
      try {
        model_head_dim = head_dim(config.model.path);
      } catch (const Error& error) {
        reject(point, line_of_setting("model.path"), error.what());
      }
      try {
        make_quantizer(quantizer.method, quantizer.params, model_head_dim);
      } catch (const Error& error) {
        reject(point, line_of_setting(fmt::format("quantizers.{}", i)),
               fmt::format("quantizers '{}': {}", quantizer.name, error.what()));
      }
      checked_quantizers_.insert(key);
    }
  }

  // The line of the first grid key that sets `setting`, part of it or all of it, else the base's.
  int line_of_setting(const std::string& setting) const {
    const auto holds = [](const std::string& outer, const std::string& inner) {
      return inner.rfind(outer, 0) == 0 && (inner.size() == outer.size() || inner[outer.size()] == '.');
    };
    for (const std::string& key : manifest_.keys)
      if (holds(key, setting) || holds(setting, key)) return sweep_.line_of(key);
    return sweep_.base_line;
  }

  int64_t head_dim(const std::string& model_path) {
    const auto cached = head_dims_.find(model_path);
    if (cached != head_dims_.end()) return cached->second;
    const std::string synthetic_prefix = "synthetic:";
    int64_t dim = 0;
    std::error_code error;
    if (model_path.rfind(synthetic_prefix, 0) == 0) {
      dim = synthetic_config(model_path.substr(synthetic_prefix.size())).head_dim;
    } else if (fs::is_directory(model_path, error)) {
      dim = read_hf_config(model_path).head_dim;
    } else {
      // llama2.c files keep the shape in a header before the weights; they are small models.
      dim = read_llama2c_layout(model_path).config.head_dim;
    }
    head_dims_[model_path] = dim;
    return dim;
  }

  // The sweep-file line of the key an error names ("--set KEY=..."), else the base's line.
  int line_named_in(const std::string& message) const {
    const std::string marker = "--set ";
    const size_t start = message.find(marker);
    if (start != std::string::npos) {
      const size_t end = message.find('=', start);
      const int line = sweep_.line_of(message.substr(start + marker.size(), end - start - marker.size()));
      if (line > 0) return line;
    }
    return sweep_.base_line;
  }

  static void replace_all(std::string& text, const std::string& from, const std::string& to) {
    for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
      text.replace(at, from.size(), to);
  }

  const SweepFile& sweep_;
  const Manifest& manifest_;
  const EmptyConfigFile* inline_base_;
  std::set<std::string> checked_quantizers_;
  std::map<std::string, int64_t> head_dims_;
};

// Every point's resolved config, in threads: loading and emitting run configs dominates the plan
// (about 0.5 ms a point). On failure, the error of the first failing point in manifest order.
void resolve_configs(const SweepFile& sweep, const Manifest& manifest, std::vector<std::string>& configs) {
  std::optional<EmptyConfigFile> inline_base;
  if (sweep.base_path.empty()) inline_base.emplace();
  const WorkingDirectory working_directory(sweep.file_directory());
  const size_t points = manifest.points.size();
  const size_t threads = std::clamp<size_t>(std::min<size_t>(std::thread::hardware_concurrency(), points / 256), 1, 16);
  std::vector<std::optional<Error>> errors(threads);
  std::vector<size_t> error_points(threads, points);
  std::atomic<size_t> first_error{points};
  const auto resolve_range = [&](size_t thread) {
    PointValidator validator(sweep, manifest, inline_base ? &*inline_base : nullptr);
    for (size_t i = thread * points / threads; i < (thread + 1) * points / threads && i < first_error; ++i) {
      try {
        configs[i] = validator.resolved_config(manifest.points[i]);
      } catch (const Error& error) {
        errors[thread] = error;
        error_points[thread] = i;
        for (size_t seen = first_error; i < seen && !first_error.compare_exchange_weak(seen, i);) {
        }
        return;
      }
    }
  };
  std::vector<std::thread> workers;
  for (size_t t = 1; t < threads; ++t) workers.emplace_back(resolve_range, t);
  resolve_range(0);
  for (std::thread& worker : workers) worker.join();
  for (size_t t = 0; t < threads; ++t)
    if (errors[t] && error_points[t] == first_error) throw *errors[t];
}

bool holds_results(const PointFiles& files) {
  std::error_code error;
  return fs::exists(files.output, error) || fs::exists(files.log, error) || fs::exists(files.exit_status, error);
}

std::string manifest_text(const Manifest& manifest) {
  Json json;
  json["manifest_version"] = kManifestVersion;
  json["name"] = manifest.name;
  json["sweep_file"] = manifest.sweep_file;
  json["sweep_sha256"] = manifest.sweep_sha256;
  json["keys"] = manifest.keys;
  json["numeric"] = manifest.numeric;
  Json points = Json::array();
  for (const Point& point : manifest.points) {
    Json values = Json::object();
    for (size_t k = 0; k < manifest.keys.size(); ++k) values[manifest.keys[k]] = point.values[k];
    points.push_back({{"id", point.id}, {"values", values}});
  }
  json["points"] = std::move(points);
  return json.dump(1) + "\n";
}

std::string manifest_path(const SweepFile& sweep) { return (fs::path(sweep.directory()) / "manifest.json").string(); }

}  // namespace

PointFiles point_files(const std::string& sweep_directory, const std::string& id) {
  const std::string dir = (fs::path(sweep_directory) / "runs" / id).string();
  return {dir, dir + "/config.yaml", dir + "/log.txt", dir + "/exit_status", dir + "/running", dir + "/run.h5",
          dir + "/point.lock"};
}

std::string Manifest::describe(const Point& point) const {
  std::string text;
  for (size_t k = 0; k < keys.size(); ++k) text += (k ? " " : "") + keys[k] + "=" + point.values[k];
  return text;
}

Manifest expand(const SweepFile& sweep) {
  Manifest manifest;
  manifest.name = sweep.name;
  manifest.sweep_file = sweep.path;
  manifest.sweep_sha256 = sweep.text_sha256;
  manifest.directory = sweep.directory();
  manifest.keys = sweep.keys();
  manifest.numeric.assign(manifest.keys.size(), true);
  size_t column = 0;
  for (const Axis& axis : sweep.axes) {
    for (size_t k = 0; k < axis.keys.size(); ++k, ++column)
      for (const auto& entry : axis.values)
        if (!is_yaml_number(entry[k])) manifest.numeric[column] = false;
  }

  std::vector<std::vector<std::pair<size_t, std::string>>> rules;  // key index -> value
  for (const ExcludeRule& rule : sweep.excludes) {
    auto& matches = rules.emplace_back();
    for (const auto& [key, value] : rule.matches)
      matches.emplace_back(std::find(manifest.keys.begin(), manifest.keys.end(), key) - manifest.keys.begin(), value);
  }

  // Counted before anything is expanded: a grid of 10^10 points would grow memory without end.
  size_t grid_points = 1;
  std::vector<std::string> sizes;
  for (const Axis& axis : sweep.axes) {
    sizes.push_back(fmt::format("{} ({})", axis.values.size(), fmt::join(axis.keys, ", ")));
    grid_points = grid_points > kMaxGridPoints ? grid_points : grid_points * axis.values.size();
  }
  if (grid_points > kMaxGridPoints)
    fail("{}: the grid has more than {} points ({}); split it into several sweeps, or zip axes that vary together",
         sweep.path, kMaxGridPoints, fmt::join(sizes, " x "));

  // A mixed-radix counter over the axes, the last axis fastest.
  std::vector<size_t> index(sweep.axes.size(), 0);
  std::map<std::string, size_t> id_owner;
  for (bool more = true; more;) {
    Point point;
    for (size_t a = 0; a < sweep.axes.size(); ++a) {
      const auto& entry = sweep.axes[a].values[index[a]];
      point.values.insert(point.values.end(), entry.begin(), entry.end());
    }
    const bool excluded = std::any_of(rules.begin(), rules.end(), [&](const auto& matches) {
      return std::all_of(matches.begin(), matches.end(),
                         [&](const auto& match) { return point.values[match.first] == match.second; });
    });
    if (!excluded) {
      point.id = point_id(manifest.keys, point.values);
      const auto [owner, inserted] = id_owner.emplace(point.id, manifest.points.size());
      if (!inserted)  // distinct values with equal ids: a hash collision, in practice never
        fail("{}: points ({}) and ({}) get the same id {}", sweep.path,
             manifest.describe(manifest.points[owner->second]), manifest.describe(point), point.id);
      manifest.points.push_back(std::move(point));
    }
    more = false;
    for (size_t a = sweep.axes.size(); a-- > 0;) {
      if (++index[a] < sweep.axes[a].values.size()) {
        more = true;
        break;
      }
      index[a] = 0;
    }
  }
  if (manifest.points.empty()) fail("{}: the exclude rules exclude every point of the grid", sweep.path);
  return manifest;
}

PlanSummary write_plan(const SweepFile& sweep, bool force, Manifest* manifest_out, std::optional<WriterLock>* lock) {
  const auto start = std::chrono::steady_clock::now();
  const Manifest manifest = expand(sweep);
  PlanSummary summary;
  summary.points = manifest.points.size();

  // Every config first: an invalid point or a conflict stops the plan before anything is written.
  std::vector<std::string> configs(manifest.points.size());
  enum class Action { Keep, Write, Reset };
  std::vector<Action> actions(manifest.points.size(), Action::Write);
  resolve_configs(sweep, manifest, configs);
  std::optional<WriterLock> own_lock;
  std::optional<WriterLock>& held = lock ? *lock : own_lock;
  if (!held)
    held.emplace((fs::path(manifest.directory) / "sweep.lock").string(), "sweep " + manifest.directory,
                 "one `kvdrift sweep plan` or `submit` of a sweep at a time; wait for it to end");
  std::vector<std::string> conflicts;
  for (size_t i = 0; i < manifest.points.size(); ++i) {
    const Point& point = manifest.points[i];
    const PointFiles files = manifest.files(point);
    std::error_code error;
    if (!fs::exists(files.config, error)) continue;
    const std::string old_text = read_text(files.config);
    if (old_text == configs[i]) {
      actions[i] = Action::Keep;
    } else if (holds_results(files)) {
      actions[i] = Action::Reset;
      conflicts.push_back(fmt::format("point {} ({}): its config changed since it ran ({}: {})", point.id,
                                      manifest.describe(point), files.config, describe_line_difference(old_text, configs[i], "before", "now")));
    }
  }
  if (!conflicts.empty() && !force)
    fail("{}: {}{}; plan again with --force to delete the results of the changed points", sweep.path, conflicts.front(),
         conflicts.size() > 1 ? fmt::format(" (and {} more points)", conflicts.size() - 1) : "");

  fs::create_directories(fs::path(manifest.directory) / "runs");
  for (size_t i = 0; i < manifest.points.size(); ++i) {
    const PointFiles files = manifest.files(manifest.points[i]);
    if (actions[i] == Action::Keep) {
      ++summary.unchanged;
      continue;
    }
    if (actions[i] == Action::Reset) {
      for (const std::string& result : {files.output, files.log, files.exit_status}) fs::remove(result);
      ++summary.reset;
    }
    // Replaced, never written through: a config.yaml that is a link to another file leaves that file
    // alone. A plan killed here leaves a config that differs from its point's and a run directory
    // without results, so the next plan rewrites it. The manifest comes last.
    fs::create_directory(files.dir);
    write_atomically(files.config, configs[i]);
    ++summary.written;
  }
  const std::string text = manifest_text(manifest);
  const std::string path = manifest_path(sweep);
  std::error_code error;
  if (!fs::exists(path, error) || read_text(path) != text) write_atomically(path, text);
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (manifest_out) *manifest_out = manifest;
  return summary;
}

Manifest read_manifest(const SweepFile& sweep) {
  const std::string path = manifest_path(sweep);
  std::error_code error;
  if (!fs::exists(path, error))
    fail("{}: no plan at {}: run `kvdrift sweep plan {}` first", sweep.path, path, sweep.path);
  Json json;
  try {
    json = Json::parse(read_text(path));
    Manifest manifest;
    if (json_int64(json.at("manifest_version")) != kManifestVersion)
      fail("{}: manifest_version {} is not {}: plan again", path, json.at("manifest_version").dump(), kManifestVersion);
    manifest.name = json.at("name").get<std::string>();
    manifest.sweep_file = json.at("sweep_file").get<std::string>();
    manifest.sweep_sha256 = json.at("sweep_sha256").get<std::string>();
    manifest.directory = sweep.directory();
    manifest.keys = json.at("keys").get<std::vector<std::string>>();
    manifest.numeric = json.at("numeric").get<std::vector<bool>>();
    for (const Json& entry : json.at("points")) {
      Point point;
      point.id = entry.at("id").get<std::string>();
      for (const std::string& key : manifest.keys)
        point.values.push_back(entry.at("values").at(key).get<std::string>());
      manifest.points.push_back(std::move(point));
    }
    if (manifest.sweep_sha256 != sweep.text_sha256)
      spdlog::warn("{} changed since it was planned; `kvdrift sweep plan {}` brings the plan up to date", sweep.path,
                   sweep.path);
    return manifest;
  } catch (const nlohmann::json::exception& bad) {
    fail("{}: not a sweep manifest ({}): plan again", path, bad.what());
  }
}

}  // namespace kvdrift::sweep
