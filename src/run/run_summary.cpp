#include "run/run_summary.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <map>

#include "core/error.h"
#include "metrics/metric_table.h"
#include "metrics/sample_result.h"
#include "metrics/statistics.h"

namespace kvdrift {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kBootstrapResamples = 1000;
constexpr uint64_t kBootstrapSeed = 0;
constexpr double kBootstrapLevel = 0.95;

using Weights = std::vector<double>;

class Mean {
 public:
  void add(double value) {
    sum_ += value;
    ++count_;
  }
  void add_all(const std::vector<float>& values) {
    for (float value : values) add(value);
  }
  double value() const { return count_ > 0 ? sum_ / static_cast<double>(count_) : kNaN; }

 private:
  double sum_ = 0;
  int64_t count_ = 0;
};

void add_array_if_present(Mean& mean, const h5::Group& lane, const std::string& name) {
  if (lane.exists(name)) mean.add_all(lane.read<float>(name));
}

// One quantity per sample as (x, y) points: a mean pools the y of every point of the drawn samples;
// a slope fits y against x (step) within samples (least squares with each sample's own level
// removed), so prompts that differ in level but not in growth show no slope.
struct PerSample {
  std::vector<stats::LineSums> samples;

  stats::LineSums& next() { return samples.emplace_back(); }
  stats::LineSums merged(const Weights& weights) const {
    stats::LineSums all;
    for (size_t i = 0; i < samples.size(); ++i)
      if (weights[i] > 0) all.add(samples[i], weights[i]);
    return all;
  }
  double mean(const Weights& weights) const { return merged(weights).mean_y(); }
  double slope(const Weights& weights) const {
    double sxy = 0, sxx = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      const stats::LineSums& s = samples[i];
      if (weights[i] == 0 || s.n < 2) continue;
      sxy += weights[i] * (s.sxy - s.sx * s.sy / s.n);
      sxx += weights[i] * (s.sxx - s.sx * s.sx / s.n);
    }
    return sxx > 1e-12 ? sxy / sxx : kNaN;
  }
  int64_t count() const { return static_cast<int64_t>(samples.size()); }
};

// `name` = the statistic on every sample, and `name`_ci_low / _ci_high its bootstrap interval.
void set_with_interval(h5::Group& group, const std::string& name, int64_t samples,
                       const std::function<double(const Weights&)>& statistic) {
  group.set_attribute(name, samples > 0 ? statistic(Weights(samples, 1.0)) : kNaN);
  const stats::Interval interval = samples > 0
                                       ? stats::bootstrap(samples, statistic, kBootstrapResamples, kBootstrapSeed,
                                                          kBootstrapLevel)
                                       : stats::Interval{kNaN, kNaN};
  group.set_attribute(name + "_ci_low", interval.low);
  group.set_attribute(name + "_ci_high", interval.high);
}

void set_mean_with_interval(h5::Group& group, const std::string& name, const PerSample& values) {
  set_with_interval(group, name, values.count(), [&](const Weights& w) { return values.mean(w); });
}

void set_slope_with_interval(h5::Group& group, const std::string& name, const PerSample& values) {
  set_with_interval(group, name, values.count(), [&](const Weights& w) { return values.slope(w); });
}

// Per logged step of a lane: its attention-output error, mean over layers (none when not logged).
std::vector<double> attention_by_step(const h5::Group& lane) {
  if (!lane.exists(metric::attn_rel_l2)) return {};
  std::vector<hsize_t> shape;
  const std::vector<float> values = lane.read<float>(metric::attn_rel_l2, &shape);
  std::vector<double> means;
  if (shape.size() != 2 || shape[1] == 0) return means;
  for (hsize_t step = 0; step < shape[0]; ++step) {
    double sum = 0;
    for (hsize_t layer = 0; layer < shape[1]; ++layer) sum += values[step * shape[1] + layer];
    means.push_back(sum / static_cast<double>(shape[1]));
  }
  return means;
}

// One sample's values per logged step as (step, value) points, from step `from` on.
void add_by_step(stats::LineSums& sample, const std::vector<double>& by_step, const std::vector<int64_t>& logged_steps,
                 int64_t from = 0) {
  for (size_t i = 0; i < by_step.size() && i < logged_steps.size(); ++i)
    if (logged_steps[i] >= from) sample.add(static_cast<double>(logged_steps[i]), by_step[i]);
}

// Growth after the onset (docs/hdf5-schema.md): a lane's values from `onset_margin` steps after its
// first quantized read, in samples that have at least `min_steps` such steps.
struct PostOnset {
  AnalysisSettings settings;

  // The first step counted, or -1 where the lane never read anything quantized (a log without onsets
  // counts nothing either).
  int64_t first(const h5::Group& lane) const {
    if (!lane.has_attribute(metric::onset_step)) return -1;
    const double onset = lane.attribute<double>(metric::onset_step);
    return onset < 0 ? -1 : static_cast<int64_t>(onset) + settings.onset_margin;
  }
  // (step, value) points of `values` (one per step) from `from` on, when there are enough of them.
  stats::LineSums points(const std::vector<double>& values, int64_t from) const {
    stats::LineSums sums;
    if (from < 0 || static_cast<int64_t>(values.size()) - from < settings.min_post_onset_steps) return sums;
    for (size_t step = static_cast<size_t>(from); step < values.size(); ++step)
      sums.add(static_cast<double>(step), values[step]);
    return sums;
  }
};

std::vector<double> widened(const std::vector<float>& values) { return {values.begin(), values.end()}; }

// Samples whose PerSample entry has points (those that qualified for a post-onset slope).
int64_t with_points(const PerSample& values) {
  return std::count_if(values.samples.begin(), values.samples.end(), [](const stats::LineSums& s) { return s.n > 0; });
}

// Per sample, per role: the worst-5% magnitude share of what attention reads, in both definitions
// (docs/hdf5-schema.md).
struct Worst5Shares {
  std::map<std::string, PerSample> worst5;

  void add(const h5::Group& lane) {
    for (const char* role : {"key", "value"}) {
      const std::string group = metric::token_scale_group(role, "quant");
      if (!lane.exists(group)) continue;
      const h5::Group quant = lane.open_group(group);
      for (const char* name : metric::worst5_shares)
        if (quant.has_attribute(name))
          worst5[fmt::format("{}_quant_{}_mean", role, name)].next().add(0, quant.attribute<double>(name));
    }
  }
  void write(h5::Group& group) const {
    for (const auto& [name, values] : worst5) {
      if (name.find("mean_of_ratios") == std::string::npos) {
        set_mean_with_interval(group, name, values);
      } else {
        group.set_attribute(name, values.mean(Weights(values.count(), 1.0)));
      }
    }
  }
};

struct StaticTotals {
  Worst5Shares worst5;
  PerSample attn_rel_l2;  // (logged step, error)

  void add(const h5::Group& lane, const std::vector<int64_t>& logged_steps) {
    worst5.add(lane);
    add_by_step(attn_rel_l2.next(), attention_by_step(lane), logged_steps);
  }
  void write(h5::Group& group) const {
    set_mean_with_interval(group, "attn_rel_l2_mean", attn_rel_l2);
    set_slope_with_interval(group, "attn_rel_l2_slope", attn_rel_l2);
    worst5.write(group);
  }
};

// The teacher-forced lane, and the one-step lane (the same arrays).
struct TeacherForcedTotals {
  Worst5Shares worst5;
  int64_t first_step = 1;
  PostOnset post_onset;
  std::vector<double> kl;  // every compared step of every sample, for percentiles
  PerSample kl_by_step, final_kl, top1_disagreement, logp_delta, attn_rel_l2, kl_sampled;
  PerSample post_onset_kl, post_onset_attn_rel_l2;
  Mean kl_sampled_infinite;
  bool has_kl_sampled = false;

  void add(const h5::Group& lane, const std::vector<int64_t>& logged_steps) {
    worst5.add(lane);
    const std::vector<float> sample_kl = lane.read<float>(metric::kl);
    const std::vector<float> agree = lane.read<float>(metric::top1_agree);
    const std::vector<float> delta = lane.read<float>(metric::logp_delta);
    stats::LineSums &kl_sample = kl_by_step.next(), &agree_sample = top1_disagreement.next(),
                    &delta_sample = logp_delta.next(), &final_sample = final_kl.next();
    for (size_t step = static_cast<size_t>(first_step); step < sample_kl.size(); ++step) {
      kl.push_back(sample_kl[step]);
      kl_sample.add(static_cast<double>(step), sample_kl[step]);
      agree_sample.add(static_cast<double>(step), 1.0 - agree[step]);
      delta_sample.add(static_cast<double>(step), delta[step]);
    }
    if (sample_kl.size() > static_cast<size_t>(first_step)) final_sample.add(0, sample_kl.back());
    if (lane.exists(metric::kl_sampled)) {
      has_kl_sampled = true;
      stats::LineSums& sampled = kl_sampled.next();
      const std::vector<float> values = lane.read<float>(metric::kl_sampled);
      for (size_t step = static_cast<size_t>(first_step); step < values.size(); ++step) {
        kl_sampled_infinite.add(std::isinf(values[step]) ? 1.0 : 0.0);
        sampled.add(static_cast<double>(step), values[step]);  // LineSums skips the infinite ones
      }
    }
    add_by_step(attn_rel_l2.next(), attention_by_step(lane), logged_steps);
    const int64_t from = post_onset.first(lane);
    post_onset_kl.samples.push_back(post_onset.points(widened(sample_kl), from));
    stats::LineSums& attention = post_onset_attn_rel_l2.next();
    const auto logged_after = std::count_if(logged_steps.begin(), logged_steps.end(), [&](int64_t s) { return s >= from; });
    if (from >= 0 && static_cast<int64_t>(sample_kl.size()) - from >= post_onset.settings.min_post_onset_steps &&
        logged_after >= 2)
      add_by_step(attention, attention_by_step(lane), logged_steps, from);
  }
  void write(h5::Group& group) const {
    set_slope_with_interval(group, "post_onset_kl_slope", post_onset_kl);
    set_slope_with_interval(group, "post_onset_attn_rel_l2_slope", post_onset_attn_rel_l2);
    group.set_attribute("post_onset_samples", with_points(post_onset_kl));
    set_mean_with_interval(group, "kl_mean", kl_by_step);
    group.set_attribute("kl_median", stats::percentile(kl, 50));
    group.set_attribute("kl_p90", stats::percentile(kl, 90));
    group.set_attribute("kl_p99", stats::percentile(kl, 99));
    set_mean_with_interval(group, "final_kl_mean", final_kl);
    set_mean_with_interval(group, "top1_disagreement_mean", top1_disagreement);
    group.set_attribute("logp_delta_mean", logp_delta.mean(Weights(logp_delta.count(), 1.0)));
    set_slope_with_interval(group, "kl_slope", kl_by_step);
    set_mean_with_interval(group, "attn_rel_l2_mean", attn_rel_l2);
    set_slope_with_interval(group, "attn_rel_l2_slope", attn_rel_l2);
    if (has_kl_sampled) {
      set_mean_with_interval(group, "kl_sampled_mean", kl_sampled);
      group.set_attribute("kl_sampled_infinite_fraction", kl_sampled_infinite.value());
    }
    worst5.write(group);
  }
};

struct FreeRunningTotals {
  Worst5Shares worst5;
  // Kaplan–Meier: a token mismatch or a length difference is a divergence at first_divergence; an
  // identical or censored lane was seen not to diverge for first_divergence steps.
  std::vector<double> times;
  std::vector<bool> diverged;
  // Every class the spec names is counted, even when no sample falls in it.
  std::map<Outcome, int64_t> outcomes = {
      {Outcome::Identical, 0}, {Outcome::TokenMismatch, 0}, {Outcome::LengthOnly, 0}, {Outcome::Censored, 0}};

  void add(const h5::Group& lane, const std::vector<int64_t>&) {
    worst5.add(lane);
    const std::string text = lane.attribute<std::string>("outcome");
    const std::optional<Outcome> outcome = parse_enum(kOutcomeNames, text);
    if (!outcome) fail("{}: '{}' has an unknown outcome '{}'", lane.file_path(), lane.path(), text);
    times.push_back(static_cast<double>(lane.attribute<int64_t>("first_divergence")));
    diverged.push_back(*outcome == Outcome::TokenMismatch || *outcome == Outcome::LengthOnly);
    ++outcomes[*outcome];
  }
  void write(h5::Group& group) const {
    const stats::Survival survival = stats::kaplan_meier(times, diverged);
    set_with_interval(group, "first_divergence_km_median", static_cast<int64_t>(times.size()),
                      [&](const Weights& w) { return stats::kaplan_meier(times, diverged, w).median; });
    group.set_attribute("first_divergence_at_risk", survival.at_risk_at_median);
    group.set_attribute("first_divergence_events", survival.events);
    group.set_attribute("first_divergence_censored", survival.censored);
    for (const auto& [outcome, count] : outcomes)
      group.set_attribute(std::string("outcome_") + outcome_name(outcome), count);
    group.set_attribute("identical_fraction",
                        static_cast<double>(outcomes.at(Outcome::Identical)) / static_cast<double>(times.size()));
    worst5.write(group);
  }
};

// One quantizer's totals over the finished samples, read back from the file.
class QuantizerTotals {
 public:
  QuantizerTotals(int64_t first_step, const AnalysisSettings& settings) : post_onset_{settings} {
    for (auto* lane : {&teacher_forced_, &one_step_}) {
      lane->totals.first_step = first_step;
      lane->totals.post_onset = post_onset_;
    }
  }

  void add(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    ++samples_;
    add_lane(quantizer, Lane::Static, static_, logged_steps);
    add_lane(quantizer, Lane::TeacherForced, teacher_forced_, logged_steps);
    add_lane(quantizer, Lane::OneStep, one_step_, logged_steps);
    add_lane(quantizer, Lane::FreeRunning, free_running_, logged_steps);
    add_gap(quantizer, logged_steps);
    add_accumulation(quantizer, logged_steps);
  }

  RunSummaryRow write(h5::Group group, const std::string& name) const {
    group.set_attribute("samples", samples_);
    group.set_attribute("first_step", teacher_forced_.totals.first_step);
    group.set_attribute("bootstrap_resamples", kBootstrapResamples);
    group.set_attribute("bootstrap_seed", static_cast<int64_t>(kBootstrapSeed));
    group.set_attribute("bootstrap_level", kBootstrapLevel);
    group.set_attribute("bits_per_element_mean", bits_per_element_.value());
    group.set_attribute("key_quant_E_T_mean", key_quant_E_T_.value());
    group.set_attribute("value_quant_E_T_mean", value_quant_E_T_.value());
    group.set_attribute("onset_margin", post_onset_.settings.onset_margin);
    group.set_attribute("min_post_onset_steps", post_onset_.settings.min_post_onset_steps);
    if (gap_.count() > 0) {
      set_mean_with_interval(group, "attn_gap_mean", gap_);
      set_slope_with_interval(group, "attn_gap_slope", gap_);
    }
    write_accumulation(group);
    write_lane(group, Lane::Static, static_);
    write_lane(group, Lane::TeacherForced, teacher_forced_);
    write_lane(group, Lane::OneStep, one_step_);
    write_lane(group, Lane::FreeRunning, free_running_);
    const auto& tf = teacher_forced_.totals;
    return {name, tf.kl_by_step.mean(Weights(tf.kl_by_step.count(), 1.0)),
            stats::kaplan_meier(free_running_.totals.times, free_running_.totals.diverged).median,
            bits_per_element_.value()};
  }

 private:
  template <typename Totals>
  struct LaneTotals {
    int64_t samples = 0;
    Totals totals;
  };

  template <typename Totals>
  void add_lane(const h5::Group& quantizer, Lane kind, LaneTotals<Totals>& lane_totals,
                const std::vector<int64_t>& logged_steps) {
    const char* name = lane_name(kind);
    if (!quantizer.exists(name)) return;
    const h5::Group lane = quantizer.open_group(name);
    ++lane_totals.samples;
    lane_totals.totals.add(lane, logged_steps);
    // Accounting, from every lane.
    if (lane.has_attribute("bits_per_element")) bits_per_element_.add(lane.attribute<double>("bits_per_element"));
    add_array_if_present(key_quant_E_T_, lane, "key/quant/E_T");
    add_array_if_present(value_quant_E_T_, lane, "value/quant/E_T");
  }

  // Teacher-forced minus static attention error at the same logged steps: what earlier errors add.
  void add_gap(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    const char* static_lane = lane_name(Lane::Static);
    const char* teacher_lane = lane_name(Lane::TeacherForced);
    if (!quantizer.exists(fmt::format("{}/{}", static_lane, metric::attn_rel_l2)) ||
        !quantizer.exists(fmt::format("{}/{}", teacher_lane, metric::attn_rel_l2)))
      return;
    const std::vector<double> static_error = attention_by_step(quantizer.open_group(static_lane));
    const std::vector<double> teacher_error = attention_by_step(quantizer.open_group(teacher_lane));
    std::vector<double> gap(std::min(static_error.size(), teacher_error.size()));
    for (size_t i = 0; i < gap.size(); ++i) gap[i] = teacher_error[i] - static_error[i];
    add_by_step(gap_.next(), gap, logged_steps);
  }

  // Teacher-forced against one-step, per sample: their mean KL and attention error over the compared
  // steps (the ratio says how much accumulation across steps adds to one step's propagation), and the
  // TF - one-step KL gap per step after the onset (its slope: does that part grow?).
  void add_accumulation(const h5::Group& quantizer, const std::vector<int64_t>& logged_steps) {
    const char* teacher_lane = lane_name(Lane::TeacherForced);
    const char* one_step_lane = lane_name(Lane::OneStep);
    if (!quantizer.exists(teacher_lane) || !quantizer.exists(one_step_lane)) return;
    const h5::Group teacher = quantizer.open_group(teacher_lane), one_step = quantizer.open_group(one_step_lane);
    const std::vector<float> teacher_kl = teacher.read<float>(metric::kl), one_step_kl = one_step.read<float>(metric::kl);
    const int64_t first_step = teacher_forced_.totals.first_step;
    stats::LineSums &teacher_mean = accumulation_kl_[0].next(), &one_step_mean = accumulation_kl_[1].next();
    std::vector<double> gap(std::min(teacher_kl.size(), one_step_kl.size()));
    for (size_t step = 0; step < gap.size(); ++step) {
      gap[step] = static_cast<double>(teacher_kl[step]) - one_step_kl[step];
      if (static_cast<int64_t>(step) < first_step) continue;
      teacher_mean.add(static_cast<double>(step), teacher_kl[step]);
      one_step_mean.add(static_cast<double>(step), one_step_kl[step]);
    }
    post_onset_gap_.samples.push_back(post_onset_.points(gap, post_onset_.first(teacher)));
    add_by_step(accumulation_attention_[0].next(), attention_by_step(teacher), logged_steps);
    add_by_step(accumulation_attention_[1].next(), attention_by_step(one_step), logged_steps);
  }

  void write_accumulation(h5::Group& group) const {
    if (accumulation_kl_[0].count() == 0) return;
    const auto ratio = [](const std::array<PerSample, 2>& pair) {
      return [&pair](const Weights& w) { return pair[0].mean(w) / pair[1].mean(w); };
    };
    set_with_interval(group, "tf_over_one_step_kl_ratio", accumulation_kl_[0].count(), ratio(accumulation_kl_));
    set_with_interval(group, "tf_over_one_step_attn_rel_l2_ratio", accumulation_attention_[0].count(),
                      ratio(accumulation_attention_));
    set_slope_with_interval(group, "post_onset_tf_minus_one_step_kl_slope", post_onset_gap_);
    group.set_attribute("post_onset_gap_samples", with_points(post_onset_gap_));
  }

  template <typename Totals>
  static void write_lane(h5::Group& group, Lane kind, const LaneTotals<Totals>& lane_totals) {
    if (lane_totals.samples == 0) return;
    h5::Group lane = group.create_group(lane_name(kind));
    lane.set_attribute("samples", lane_totals.samples);
    lane_totals.totals.write(lane);
  }

  int64_t samples_ = 0;
  Mean bits_per_element_, key_quant_E_T_, value_quant_E_T_;
  PerSample gap_;
  LaneTotals<StaticTotals> static_;
  LaneTotals<TeacherForcedTotals> teacher_forced_, one_step_;
  PostOnset post_onset_;
  std::array<PerSample, 2> accumulation_kl_, accumulation_attention_;  // teacher-forced, one-step
  PerSample post_onset_gap_;
  LaneTotals<FreeRunningTotals> free_running_;
};

}  // namespace

std::vector<RunSummaryRow> write_summary(const h5::Group& samples, const std::set<int64_t>& finished,
                                         const std::vector<std::string>& quantizer_names,
                                         const SummarySettings& settings, h5::Group& summary) {
  std::vector<RunSummaryRow> rows;
  for (const std::string& name : quantizer_names) {
    QuantizerTotals totals(settings.first_step, settings.analysis);
    for (int64_t index : finished) {
      const h5::Group sample = samples.open_group(std::to_string(index));
      if (!sample.exists(name)) continue;
      const std::vector<int64_t> logged_steps =
          sample.exists("logged_steps") ? sample.read<int64_t>("logged_steps") : std::vector<int64_t>{};
      totals.add(sample.open_group(name), logged_steps);
    }
    rows.push_back(totals.write(summary.create_group(name), name));
  }
  return rows;
}

std::vector<RunSummaryRow> read_summary_rows(const std::string& path, const std::vector<std::string>& quantizer_names) {
  const h5::File file = h5::File::open_read(path);
  std::vector<RunSummaryRow> rows;
  for (const std::string& name : quantizer_names) {
    const h5::Group summary = file.open_group("summary/" + name);
    const auto lane_value = [&](Lane lane, const char* attribute) {
      const char* lane_group = lane_name(lane);
      return summary.exists(lane_group) ? summary.open_group(lane_group).attribute<double>(attribute) : kNaN;
    };
    rows.push_back({name, lane_value(Lane::TeacherForced, "kl_mean"),
                    lane_value(Lane::FreeRunning, "first_divergence_km_median"),
                    summary.attribute<double>("bits_per_element_mean")});
  }
  return rows;
}

}  // namespace kvdrift
