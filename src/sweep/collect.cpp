#include "sweep/collect.h"


#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <set>

#include "core/error.h"
#include "io/hdf5.h"
#include "io/run_config.h"
#include "sweep/status.h"

namespace kvdrift::sweep {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kSweepSchemaVersion = 1;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

using Metrics = std::map<std::string, double>;  // column name -> value

// The attributes of `group` as `prefix + name`, and those of its subgroups as `prefix + sub.name`.
void read_metrics(const h5::Group& group, const std::string& prefix, Metrics& metrics) {
  for (const std::string& name : group.attribute_names())
    if (const auto value = group.numeric_attribute(name)) metrics[prefix + name] = *value;
  for (const std::string& child : group.child_groups()) read_metrics(group.open_group(child), prefix + child + ".", metrics);
}

struct Row {
  const Point* point;
  std::string status, quantizer, method;
  Metrics metrics;
};

// A CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

std::string csv_number(double value) { return std::isnan(value) ? "" : fmt::format("{:.17g}", value); }

// One column of the table: text or float64.
struct Column {
  std::string name;
  std::vector<std::string> texts;
  std::vector<double> numbers;
  bool numeric = false;
  std::string cell(size_t row) const { return numeric ? csv_number(numbers[row]) : csv_field(texts[row]); }
};

void replace_file(const std::string& temporary, const std::string& path) {
  std::error_code error;
  fs::rename(temporary, path, error);
  if (error) fail("cannot rename {} to {}: {}", temporary, path, error.message());
}

void write_csv(const std::string& path, const std::vector<Column>& columns, size_t rows) {
  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    for (size_t c = 0; c < columns.size(); ++c) out << (c ? "," : "") << csv_field(columns[c].name);
    out << "\n";
    for (size_t r = 0; r < rows; ++r) {
      for (size_t c = 0; c < columns.size(); ++c) out << (c ? "," : "") << columns[c].cell(r);
      out << "\n";
    }
    if (!out.flush()) fail("cannot write {}", temporary);
  }
  replace_file(temporary, path);
}

void write_h5(const std::string& path, const Manifest& manifest, const std::vector<Column>& columns) {
  const std::string temporary = path + ".tmp";
  {
    h5::File file = h5::File::create(temporary, /*truncate=*/true);
    file.set_attribute("sweep_schema_version", kSweepSchemaVersion);
    file.set_attribute("sweep_name", manifest.name);
    file.set_attribute("grid_keys", fmt::format("{}", fmt::join(manifest.keys, "\n")));
    h5::Group rows = file.create_group("rows");
    std::vector<std::string> names;
    for (const Column& column : columns) {
      names.push_back(column.name);
      if (column.numeric) {
        rows.write<double>(column.name, column.numbers, {column.numbers.size()});
      } else {
        rows.write_strings(column.name, column.texts);
      }
    }
    rows.set_attribute("columns", fmt::format("{}", fmt::join(names, "\n")));
    file.close();
  }
  replace_file(temporary, path);
}

}  // namespace

CollectSummary collect(const Manifest& manifest) {
  const std::vector<PointStatus> statuses = point_statuses(manifest);
  std::vector<size_t> order(manifest.points.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return manifest.points[a].id < manifest.points[b].id; });

  CollectSummary summary;
  std::vector<Row> rows;
  std::set<std::string> metric_names;
  for (size_t index : order) {
    const Point& point = manifest.points[index];
    const PointStatus& status = statuses[index];
    if (status.state != State::Done) {
      summary.incomplete.emplace_back(point.id, state_name(status.state));
      rows.push_back({&point, state_name(status.state), "", "", {}});
      continue;
    }
    ++summary.complete_points;
    const PointFiles files = manifest.files(point);
    const RunConfig config = load_run_config(files.config, {});
    const h5::File run = h5::File::open_read(files.output);
    for (const QuantizerSettings& quantizer : config.quantizers) {
      Row& row = rows.emplace_back(Row{&point, "done", quantizer.name, quantizer.method, {}});
      const std::string group = "/summary/" + quantizer.name;
      if (!run.exists(group)) fail("{}: complete, but has no {} group", files.output, group);
      read_metrics(run.open_group(group), "", row.metrics);
      for (const auto& [name, value] : row.metrics) metric_names.insert(name);
    }
  }

  std::vector<Column> columns;
  const auto text_column = [&](const std::string& name, auto value_of) {
    Column& column = columns.emplace_back(Column{name, {}, {}, false});
    for (const Row& row : rows) column.texts.push_back(value_of(row));
  };
  text_column("point", [](const Row& row) { return row.point->id; });
  text_column("status", [](const Row& row) { return row.status; });
  text_column("quantizer", [](const Row& row) { return row.quantizer; });
  text_column("method", [](const Row& row) { return row.method; });
  for (size_t k = 0; k < manifest.keys.size(); ++k) {
    if (!manifest.numeric[k]) {
      text_column(manifest.keys[k], [k](const Row& row) { return row.point->values[k]; });
      continue;
    }
    Column& column = columns.emplace_back(Column{manifest.keys[k], {}, {}, true});
    for (const Row& row : rows) column.numbers.push_back(std::strtod(row.point->values[k].c_str(), nullptr));
  }
  for (const std::string& name : metric_names) {
    Column& column = columns.emplace_back(Column{name, {}, {}, true});
    for (const Row& row : rows) {
      const auto it = row.metrics.find(name);
      column.numbers.push_back(it == row.metrics.end() ? kNaN : it->second);
    }
  }
  std::set<std::string> seen;
  for (const Column& column : columns)
    if (!seen.insert(column.name).second)
      fail("{}: column '{}' would appear twice in the summary (a grid key named like a metric)", manifest.sweep_file,
           column.name);

  summary.rows = rows.size();
  summary.csv_path = (fs::path(manifest.directory) / "summary.csv").string();
  summary.h5_path = (fs::path(manifest.directory) / "summary.h5").string();
  write_csv(summary.csv_path, columns, rows.size());
  write_h5(summary.h5_path, manifest, columns);
  return summary;
}

}  // namespace kvdrift::sweep
