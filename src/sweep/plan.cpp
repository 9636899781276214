#include "sweep/plan.h"

#include <spdlog/spdlog.h>

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
#include "decode/config_checks.h"
#include "io/run_config.h"
#include "io/strict_yaml.h"
#include "model/checkpoint.h"

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

// The base run config: its file's text (checked when read), parsed afresh for every point because
// overrides change the tree they apply to, and yaml-cpp's copies of a tree lose its line numbers.
struct BaseConfig {
  std::string text;
  YamlSource source;
  bool inline_base = false;  // the text is the sweep file's, the config under its key `base`

  static BaseConfig of(const SweepFile& sweep) {
    if (sweep.inline_base) return {sweep.text, {sweep.path, sweep.file_directory(), ""}, true};
    return {read_yaml_file(sweep.base_path, "config").text,
            {sweep.base_path, fs::path(sweep.base_path).parent_path().string(), ""}};
  }
  YAML::Node parse() const {
    YAML::Node document = load_yaml(text);
    return inline_base ? document["base"] : document;
  }
};

// Every point's run config, built in memory as `kvdrift run` reads it (the base, then the point's
// values as overrides set in the sweep file, then its output) and checked against the model as a run
// checks it before decoding. An error names the origin of the value behind it and the point. Each
// thread has its own (with its own parsed values: a YAML tree is not to be read from two threads).
class PointConfigs {
 public:
  PointConfigs(const SweepFile& sweep, const Manifest& manifest, const BaseConfig& base)
      : sweep_(sweep), manifest_(manifest), base_(base) {
    for (const std::string& key : manifest.keys)
      key_origins_.push_back(fmt::format("{}:{}", sweep.path, sweep.line_of(key)));
  }

  // The resolved config text of `point`.
  std::string resolved_config(const Point& point) {
    YamlSource source = base_.source;
    source.context = fmt::format(": point {} ({})", point.id, manifest_.describe(point));
    std::vector<Override> overrides;
    for (size_t k = 0; k < manifest_.keys.size(); ++k)
      overrides.push_back({manifest_.keys[k], value_node(point.values[k]), key_origins_[k], sweep_.file_directory()});
    overrides.push_back({"output.path", YAML::Node(manifest_.files(point).output), sweep_.path, ""});
    const RunConfig config = load_run_config(base_.parse(), source, overrides);
    const ModelConfig& model = model_config(config.model);
    try {
      check_prefill_fits(config, model);
    } catch (const Error& error) {
      fail("{}{}: {}", sweep_.path, source.context, error.what());
    }
    for (const QuantizerSettings& quantizer : config.quantizers) {
      std::string key = config.model.path + "\n" + quantizer.method;
      for (const auto& [name, value] : quantizer.params) key += "\n" + name + "=" + value;
      if (checked_quantizers_.count(key)) continue;
      make_config_quantizer(quantizer, model);
      checked_quantizers_.insert(key);
    }
    return config.resolved_yaml();
  }

 private:
  // A grid value's YAML, parsed once (the sweep file bounded it).
  const YAML::Node& value_node(const std::string& canonical) {
    auto parsed = values_.find(canonical);
    if (parsed == values_.end()) parsed = values_.emplace(canonical, load_yaml(canonical)).first;
    return parsed->second;
  }

  // The model's shape, read once per model path (its config.json or header, never its weights).
  const ModelConfig& model_config(const ModelSettings& settings) {
    auto cached = models_.find(settings.path);
    if (cached != models_.end()) return cached->second;
    try {
      return models_.emplace(settings.path, read_model_config(settings.path)).first->second;
    } catch (const Error& error) {
      fail("{}: {}", settings.origin, error.what());
    }
  }

  const SweepFile& sweep_;
  const Manifest& manifest_;
  const BaseConfig& base_;
  std::vector<std::string> key_origins_;  // per manifest key: SWEEP:LINE
  std::map<std::string, YAML::Node> values_;
  std::map<std::string, ModelConfig> models_;
  std::set<std::string> checked_quantizers_;
};

// Every point's resolved config, in threads: loading and emitting run configs dominates the plan.
// On failure, the error of the first failing point in manifest order.
void resolve_configs(const SweepFile& sweep, const Manifest& manifest, std::vector<std::string>& configs) {
  const BaseConfig base = BaseConfig::of(sweep);
  const size_t points = manifest.points.size();
  const size_t threads = std::clamp<size_t>(std::min<size_t>(std::thread::hardware_concurrency(), points / 256), 1, 16);
  std::vector<PointConfigs> point_configs(threads, PointConfigs(sweep, manifest, base));
  std::vector<std::optional<Error>> errors(threads);
  std::vector<size_t> error_points(threads, points);
  std::atomic<size_t> first_error{points};
  const auto resolve_range = [&](size_t thread) {
    for (size_t i = thread * points / threads; i < (thread + 1) * points / threads && i < first_error; ++i) {
      try {
        configs[i] = point_configs[thread].resolved_config(manifest.points[i]);
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

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

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
