#!/usr/bin/env python3
"""How much of a method's teacher-forced drift its causal wrappers remove (docs/analysis.md).

    causal_effect.py RUN.h5 [RUN2.h5 ...] [--pair BASE:WRAPPED ...] [-o OUT.csv] [--figure STEM]
                     [--claim BASE:WRAPPED:STATISTIC ...] [--onset-margin N] [--min-post-onset-steps N]

For each pair of quantizers run side by side (by default every X with X-ts / X-td / X-ees / X-eed, the
`wrap: true_scale | true_direction | equal_error_scale | equal_error_direction` versions of X, and
X-ees against X-eed), on the finished samples of every run (pooled: the prompts are independent units):
  - kl_slope: the within-sample slope of teacher-forced KL against the step (the run log summary's
    `kl_slope`: least squares with each sample's own level removed, steps from `first_step`),
  - kl_mean: the mean teacher-forced KL,
  - kl_slope_post_onset: the same slope over steps from onset + margin on (the later onset of the two
    quantizers per sample), over the samples with enough such steps, when the runs log `onset_step`,
  - kl_amplification_one_step: mean KL teacher-forced / one_step (accumulation across steps), with a
    one_step lane; attn_amplification_static: mean attention error teacher-forced / static, with both,
and for each: both values, the fraction the wrapper removes (1 - wrapped / base) and the paired
difference (wrapped - base), with 95% percentile bootstrap intervals over samples, the two resampled
together (1000 resamples, seed 0), and the exact sign-flip p-value of the per-sample differences.
Fewer than 8 samples: per-sample values and their range instead of intervals. A base whose interval
contains 0: the difference is reported, not the fraction. Holm's adjustment runs over the --claim rows
(default: every row). `--figure` draws each pair's KL per step and their paired difference.
"""
import collections
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdrift_log as log  # noqa: E402
import paired_stats as stats  # noqa: E402
import plot_drift  # noqa: E402  (sets the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

PROG = "causal_effect.py"
RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
WRAPPER_SUFFIXES = {"-ts": "true_scale", "-td": "true_direction", "-ees": "equal_error_scale",
                    "-eed": "equal_error_direction"}
# Rows that state a ratio (amplification) are compared as differences: a percentage of a ratio misleads.
DIFFERENCE_ONLY = ("kl_amplification_one_step", "attn_amplification_static")
COLUMNS = ["base", "wrapped", "statistic", "samples", "base_value", "wrapped_value", "fraction_removed",
           "fraction_removed_ci_low", "fraction_removed_ci_high", "base_ci_low", "base_ci_high",
           "wrapped_ci_low", "wrapped_ci_high", "difference", "difference_ci_low", "difference_ci_high",
           "reported_as", "interval", "per_sample_values", "per_sample_min", "per_sample_max", "p_value",
           "test_samples", "p_holm"]

# One quantizer of one sample: teacher-forced KL per step, the first compared step, the teacher-forced
# lane's onset_step (None: not logged), the one_step lane's KL (None: no such lane), and per lane
# (teacher_forced, static) the attention error's (logged steps, mean over layers) when logged.
Sample = collections.namedtuple("Sample", "kl first_step onset one_step attention")


def sums(x, y):
    """(n, sum x, sum y, sum xx, sum xy) of points (x, y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.array([len(y), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])


def sample_sums(kl, first_step):
    """sums() of one sample's KL over its steps from first_step on."""
    y = np.asarray(kl, dtype=np.float64)[first_step:]
    return sums(np.arange(first_step, first_step + len(y)), y)


def slope(sums, weights):
    """Within-sample least-squares slope of the weighted samples (rows of `sums`): each sample's own
    level removed, then pooled. Weights [samples] give one value, [resamples x samples] one per row."""
    n, sx, sy, sxx, sxy = (sums[:, i] for i in range(5))
    use, count = n >= 2, np.where(n > 0, n, 1)
    cxy = np.where(use, sxy - sx * sy / count, 0.0)
    cxx = np.where(use, sxx - sx * sx / count, 0.0)
    denominator = np.asarray(weights) @ cxx
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 1e-12, (np.asarray(weights) @ cxy) / denominator, np.nan)[()]


def mean(sums, weights):
    """Mean of y over every point of the weighted samples (as slope(), one value per weight row)."""
    count = np.asarray(weights) @ sums[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (np.asarray(weights) @ sums[:, 2]) / count, np.nan)[()]


def sums_of(samples):
    """[samples x 5] sample_sums of each Sample's teacher-forced KL."""
    return np.array([sample_sums(s.kl, s.first_step) for s in samples]).reshape(-1, 5)


def post_onset_sums(kl, onsets, margin, min_steps):
    """sample_sums of each sample's KL over its steps from onset + margin on (the engine's
    post-onset steps), for the samples that read a quantized position (onset >= 0) and have at least
    min_steps such steps; and the indices of those samples."""
    rows, used = [], []
    for index, (values, onset) in enumerate(zip(kl, onsets)):
        if onset >= 0 and len(values) - (onset + margin) >= min_steps:
            rows.append(sample_sums(values, onset + margin))
            used.append(index)
    return np.array(rows).reshape(-1, 5), used


def post_onset_slope(kl, onsets, margin, min_steps):
    """(within-sample least-squares slope of KL against the step over the steps from onset + margin on,
    number of samples with at least min_steps such steps): slope() on post_onset_sums()."""
    rows, used = post_onset_sums(kl, onsets, margin, min_steps)
    return slope(rows, np.ones(len(used))), len(used)


def read_kl(paths, quantizers, wait_seconds):
    """Per quantizer, a Sample of every finished sample of every run, in the same sample order for all;
    each run's caption; the runs' RunInfo. The runs must pool (one model, each name the same settings)
    and hold at least two finished samples in all; a KL that is not finite is a broken run, refused
    rather than dropped (dropping it would unpair the samples)."""
    rows = {q: [] for q in quantizers}

    def visit(info, path, index, sample, first_step, logged_steps):
        for q in quantizers:
            rows[q].append(read_sample(sample[q], f"{path}: samples/{index}/{q}", first_step, logged_steps))

    infos = log.visit_finished_samples(paths, quantizers, visit, wait_seconds)
    samples = len(rows[quantizers[0]])
    if samples < 2:
        raise log.LogError(f"{', '.join(paths)}: {samples} finished sample{'' if samples == 1 else 's'} in all; "
                           "a paired bootstrap interval needs at least 2")
    return rows, [info.caption() for info in infos], infos


def finite_kl(group, where):
    kl = log.step_values(group, "kl")
    bad = np.flatnonzero(~np.isfinite(kl))
    if len(bad):
        raise log.LogError(f"{where}/kl is {kl[bad[0]]} at step {bad[0]}: a broken run, not a measurement")
    return kl


def read_sample(group, where, first_step, logged_steps):
    """The Sample of one quantizer's group of one finished sample."""
    if "teacher_forced" not in group:
        raise log.LogError(f"{where} has no teacher_forced lane")
    attention = {}
    for lane in ("teacher_forced", "static"):
        if lane in group and "attn_rel_l2" in group[lane]:
            values = group[lane]["attn_rel_l2"][()].astype(np.float64).mean(axis=1)
            attention[lane] = (logged_steps[:len(values)], values)
    one_step = finite_kl(group["one_step"], f"{where}/one_step") if "one_step" in group else None
    return Sample(finite_kl(group["teacher_forced"], f"{where}/teacher_forced"), first_step,
                  log.onset_step(group["teacher_forced"]), one_step, attention)


def attention_sums(samples, lane):
    """[samples x 5] sums() of each sample's attention error (mean over layers) over the logged steps
    that both its teacher-forced and static lanes hold."""
    out = []
    for s in samples:
        steps, values = s.attention[lane]
        shared = min(len(s.attention["teacher_forced"][1]), len(s.attention["static"][1]))
        out.append(sums(steps[:shared], values[:shared]))
    return np.array(out).reshape(-1, 5)


def ratio_of_means(top, bottom):
    """The statistic mean(top) / mean(bottom) of weighted samples."""
    def statistic(weights):
        with np.errstate(invalid="ignore", divide="ignore"):
            return mean(top, weights) / mean(bottom, weights)
    return statistic


def post_onset_statistic(base, other, settings):
    """pair_statistics' kl_slope_post_onset entry (a list of one, or empty) and notes: each sample from
    the later of the two teacher-forced onsets on, the samples that qualify for both."""
    if any(s.onset is None for s in base + other):
        return [], ["kl_slope_post_onset: not computed, the runs did not log onset_step"]
    margin, min_steps = settings["onset_margin"], settings["min_post_onset_steps"]
    onsets = [max(b.onset, o.onset) if min(b.onset, o.onset) >= 0 else -1 for b, o in zip(base, other)]
    pb, used = post_onset_sums([s.kl for s in base], onsets, margin, min_steps)
    po, used_other = post_onset_sums([s.kl for s in other], onsets, margin, min_steps)
    if used != used_other or len(used) < 2:
        return [], [f"kl_slope_post_onset: not computed, {len(used)} of {len(base)} samples have at least "
                    f"{min_steps} steps from onset + {margin} on (a paired interval needs 2)"]
    return [("kl_slope_post_onset", lambda w: slope(pb, w), lambda w: slope(po, w), used)], []


def pair_statistics(base, other, settings):
    """[(name, base statistic, other statistic, index of the samples used)] that the samples of a pair
    allow (a statistic maps weights [resamples x samples used] to values), and notes on those left out."""
    everyone = list(range(len(base)))
    sb, so = sums_of(base), sums_of(other)
    found = [("kl_slope", lambda w: slope(sb, w), lambda w: slope(so, w), everyone),
             ("kl_mean", lambda w: mean(sb, w), lambda w: mean(so, w), everyone)]
    post_onset, notes = post_onset_statistic(base, other, settings)
    found += post_onset
    if all(s.one_step is not None for s in base + other):
        ob = np.array([sample_sums(s.one_step, s.first_step) for s in base])
        oo = np.array([sample_sums(s.one_step, s.first_step) for s in other])
        found.append(("kl_amplification_one_step", ratio_of_means(sb, ob), ratio_of_means(so, oo), everyone))
    if all(len(s.attention) == 2 for s in base + other):
        found.append(("attn_amplification_static",
                      ratio_of_means(attention_sums(base, "teacher_forced"), attention_sums(base, "static")),
                      ratio_of_means(attention_sums(other, "teacher_forced"), attention_sums(other, "static")),
                      everyone))
    return found, notes


def percentile_interval(values):
    """The LEVEL percentile interval of the finite bootstrap values; NaN when at most half are finite."""
    values = values[np.isfinite(values)]
    if len(values) <= RESAMPLES / 2:
        return np.nan, np.nan
    low, high = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return low, high


def compare(base_statistic, other_statistic, samples):
    """Both statistics, the fraction removed (1 − other / base) and the difference (other − base):
    point values, paired bootstrap intervals and per-sample values, as a dict of (value, low, high)
    triples and per-sample arrays; and the sign-flip p-value of the per-sample differences."""
    values = {}
    for weights, key in ((np.ones((1, samples)), "point"),
                         (stats.resample_weights(samples, RESAMPLES, SEED), "boot"), (np.eye(samples), "each")):
        b, o = np.atleast_1d(base_statistic(weights)), np.atleast_1d(other_statistic(weights))
        with np.errstate(invalid="ignore", divide="ignore"):
            values[key] = {"base": b, "other": o, "fraction": np.where(b != 0, 1 - o / b, np.nan),
                           "difference": o - b}
    result = {name: (values["point"][name][0],) + percentile_interval(values["boot"][name])
              for name in ("base", "other", "fraction", "difference")}
    result["each"] = values["each"]
    differences = values["each"]["difference"]
    differences = differences[np.isfinite(differences)]
    result["p_value"], result["test_samples"] = stats.sign_flip_pvalue(differences), len(differences)
    return result


def table_row(base, other, name, samples, c):
    """The CSV row of one comparison, with the reporting rules applied: fewer than 8 samples, the
    interval columns stay empty and the per-sample values of the reported quantity stand in their place;
    a base whose interval (or per-sample range) contains 0, the difference is reported."""
    small = samples < stats.MIN_SAMPLES_FOR_INTERVAL
    each = c["each"]
    finite_base = each["base"][np.isfinite(each["base"])]
    base_interval = (finite_base.min(), finite_base.max()) if small and len(finite_base) else c["base"][1:]
    reported = "difference" if name in DIFFERENCE_ONLY else stats.relative_change(base_interval, None, None)[0]
    row = {"base": base, "wrapped": other, "statistic": name, "samples": samples}
    for value_column, prefix, key in (("base_value", "base", "base"), ("wrapped_value", "wrapped", "other"),
                                      ("fraction_removed", "fraction_removed", "fraction"),
                                      ("difference", "difference", "difference")):
        value, low, high = c[key]
        row[value_column] = value
        row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = (np.nan, np.nan) if small else (low, high)
    per_sample = each[reported]
    finite = per_sample[np.isfinite(per_sample)]
    row.update(reported_as=reported, interval="per-sample" if small else "bootstrap",
               per_sample_values=" ".join(plot_drift._csv_cell(float(v)) or "nan" for v in per_sample) if small else "",
               per_sample_min=finite.min() if small and len(finite) else np.nan,
               per_sample_max=finite.max() if small and len(finite) else np.nan,
               p_value=c["p_value"], test_samples=c["test_samples"], p_holm=np.nan)
    row["_per_sample"] = each  # for the printed table; not a column
    return row


def reported_text(row):
    """'removed 75% [70%, 80%]' or 'difference (wrapped − base) -0.9 [...]', with the small-n rule."""
    column = "fraction_removed" if row["reported_as"] == "fraction" else "difference"
    text = stats.describe_interval(row[column], row[f"{column}_ci_low"], row[f"{column}_ci_high"],
                                   row["_per_sample"][row["reported_as"]],
                                   ".0%" if column == "fraction_removed" else ".3g")
    return ("removed " if column == "fraction_removed" else "difference (wrapped − base) ") + text


def value_text(row, column):
    value, low, high = row[f"{column}_value"], row[f"{column}_ci_low"], row[f"{column}_ci_high"]
    return f"{value:.4g}" if row["interval"] == "per-sample" else f"{value:.4g} [{low:.4g}, {high:.4g}]"


def claims_table(rows):
    """Holm's adjustment over the claims `rows` (each with p_value): sets each row's p_holm and returns
    the lines that print them."""
    for row, adjusted in zip(rows, stats.holm([row["p_value"] for row in rows])):
        row["p_holm"] = adjusted
    lines = [f"claims (Holm's step-down adjustment over {len(rows)}):"]
    lines += [f"  {row['base']}:{row['wrapped']}:{row['statistic']}  p = {row['p_value']:.4g}, "
              f"Holm-adjusted p = {row['p_holm']:.4g}" for row in rows]
    return lines


def pick_claims(rows, claims):
    """The rows named by --claim BASE:WRAPPED:STATISTIC (every row when none is named)."""
    if not claims:
        return rows
    by_name = {f"{r['base']}:{r['wrapped']}:{r['statistic']}": r for r in rows}
    for claim in claims:
        if claim not in by_name:
            raise log.LogError(f"--claim {claim}: no such row (rows: {', '.join(by_name)})")
    return [by_name[claim] for claim in claims]


def print_table(rows, notes, settings):
    print(f"{'base':<16} {'wrapped':<18} {'statistic':<26} base · wrapped · removed or difference · sign-flip p")
    for r in rows:
        print(f"{r['base']:<16} {r['wrapped']:<18} {r['statistic']:<26} {value_text(r, 'base')} · "
              f"{value_text(r, 'wrapped')} · {reported_text(r)} · p = {r['p_value']:.3g}")
    if any(r["statistic"] == "kl_slope_post_onset" for r in rows):
        print(f"post-onset slopes: steps from onset + {settings['onset_margin']} on, samples with at least "
              f"{settings['min_post_onset_steps']} such steps (the later onset of the pair)")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")


def trailing_mean(matrix, window):
    """Each sample's mean over steps [t - window + 1, t] (NaN past its end)."""
    valid = np.isfinite(matrix)
    # cumulative sums with `window` leading zero columns: a window's sum is a difference of two
    totals = np.pad(np.cumsum(np.where(valid, matrix, 0.0), axis=1), ((0, 0), (window, 0)))
    counts = np.pad(np.cumsum(valid, axis=1), ((0, 0), (window, 0)))
    steps = matrix.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (totals[:, window:] - totals[:, :steps]) / (counts[:, window:] - counts[:, :steps])
    return np.where(valid, out, np.nan)


def step_curves(base_kl, other_kl, window):
    """CSV rows of the paired figure: per step, the mean over samples of base, other and other − base
    (each sample's trailing `window`-step mean KL), with 95% percentile bootstrap bands over samples
    resampled together and the max-t band that holds over all steps at once."""
    base = trailing_mean(log.stack_padded([s.kl for s in base_kl]), window)
    other = trailing_mean(log.stack_padded([s.kl for s in other_kl]), window)
    rows = []
    for series, matrix in (("base", base), ("other", other), ("difference", other - base)):
        band = stats.simultaneous_band(matrix, RESAMPLES, SEED, LEVEL)
        rows += [{"series": series, "step": step, "samples": int(band.samples[step]), "center": band.mean[step],
                  "low": band.pointwise_low[step], "high": band.pointwise_high[step],
                  "simultaneous_low": band.low[step], "simultaneous_high": band.high[step]}
                 for step in range(matrix.shape[1]) if band.samples[step]]
    return rows


FIGURE_COLUMNS = ["base", "other", "series", "step", "samples", "center", "low", "high", "simultaneous_low",
                  "simultaneous_high"]


def paired_figure(path_stem, pairs, kl, rows, window, caption):
    """PATH.png/.pdf/.csv: per pair, both methods' teacher-forced KL per step and their paired
    difference, with bootstrap bands."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(13, 4.2 * len(pairs) + 0.5), squeeze=False)
    csv_rows = []
    for row, (base, other) in enumerate(pairs):
        curves = step_curves(kl[base], kl[other], window)
        csv_rows += [dict(base=base, other=other, **r) for r in curves]
        ax_kl, ax_diff = axes[row]
        for series, name, color in (("base", base, "tab:orange"), ("other", other, "tab:red"),
                                    ("difference", f"{other} − {base}", "tab:blue")):
            mine = [r for r in curves if r["series"] == series]
            ax = ax_diff if series == "difference" else ax_kl
            steps = [r["step"] for r in mine]
            ax.plot(steps, [r["center"] for r in mine], color=color, linewidth=1.4, label=name)
            ax.fill_between(steps, [r["low"] for r in mine], [r["high"] for r in mine], color=color, alpha=0.2,
                            linewidth=0)
            if series == "difference":
                for end in ("simultaneous_low", "simultaneous_high"):
                    ax.plot(steps, [r[end] for r in mine], color=color, linewidth=0.9, linestyle="--",
                            label="simultaneous 95% band (max-t)" if end == "simultaneous_low" else None)
        samples = len(kl[base])
        ax_kl.set_title(f"({chr(97 + 2 * row)}) teacher-forced KL, mean over {samples} samples", fontsize=10)
        ax_kl.set_ylabel(f"KL(p_ref ‖ p_lane) [nats], trailing {window}-step mean")
        ax_diff.axhline(0.0, color="gray", linewidth=0.8)
        verdict = verdict_text(base, other, {r["statistic"]: r for r in rows if (r["base"], r["wrapped"]) == (base, other)})
        ax_diff.set_title(f"({chr(98 + 2 * row)}) paired difference {other} − {base}\n"
                          + "\n".join(textwrap.wrap(verdict, 80, break_on_hyphens=False)), fontsize=10)
        ax_diff.set_ylabel("difference in KL [nats]")
        for ax in (ax_kl, ax_diff):
            ax.set_xlabel("decoding step [tokens]")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=9, loc="upper left")
    fig.suptitle("Paired comparison of teacher-forced drift: lines = mean over samples, bands = 95% "
                 f"percentile bootstrap over samples ({RESAMPLES} resamples, paired)", fontsize=11)
    plot_drift.finish_figure(fig, caption, legend=([], []))  # the caption wrapped below, room for the title above
    for ext in ("png", "pdf"):
        fig.savefig(f"{path_stem}.{ext}", dpi=130)
    plt.close(fig)
    plot_drift.write_csv(f"{path_stem}.csv", FIGURE_COLUMNS, csv_rows)


def verdict_text(base, other, rows):
    """The figure's words for a pair's slope and mean rows: "other's KL slope 29% [22, 35] lower (p = 0.004),
    mean KL ... than base's"; with fewer than 8 samples or a base interval containing 0, each as printed."""
    parts = [("KL slope", rows["kl_slope"]), ("mean KL", rows["kl_mean"])]
    p = {label: f" (p = {row['p_value']:.2g})" for label, row in parts}
    if all(row["reported_as"] == "fraction" and row["interval"] == "bootstrap" for _, row in parts):
        return (f"{other}'s " + ", ".join(f"{label} " + _lower((row["fraction_removed"], row["fraction_removed_ci_low"],
                                                                 row["fraction_removed_ci_high"])) + p[label]
                                          for label, row in parts) + f" than {base}'s")
    return "; ".join(f"{label}: {reported_text(row)}{p[label]}" for label, row in parts)


def _lower(effect):
    """'29% [22, 35] lower' from (fraction removed, low, high); '5% [-12, 21] higher' when the point
    estimate is an increase."""
    if not all(np.isfinite(effect)):
        return "n/a (a zero or undefined base)"
    fraction, low, high = (round(100 * value) for value in effect)  # whole percents, never "-0"
    if fraction < 0:
        return f"{-fraction}% [{-high}, {-low}] higher"
    return f"{fraction}% [{low}, {high}] lower"


def default_pairs(paths, wait_seconds):
    """Every X with a wrapped X-ts, X-td, X-ees or X-eed beside it, and X-ees against X-eed."""
    with log.open_run_file(paths[0], wait_seconds=wait_seconds) as handle:
        quantizers = log.RunInfo(handle, paths[0]).quantizers
    pairs = [(q[:-len(s)], q) for q in quantizers for s in WRAPPER_SUFFIXES if q.endswith(s)
             and q[:-len(s)] in quantizers]
    pairs += [(q, q[:-len("-ees")] + "-eed") for q in quantizers if q.endswith("-ees")
              and q[:-len("-ees")] + "-eed" in quantizers]
    if not pairs:
        raise log.LogError(f"{paths[0]}: no quantizer X with a wrapped X-ts, X-td, X-ees or X-eed beside it; "
                           "pass --pair")
    return pairs


def onset_settings(infos, args):
    """onset_margin and min_post_onset_steps: the command line's, else the runs' own (which must agree)."""
    settings = {}
    for name in log.ONSET_DEFAULTS:
        found = {info.path: info.onset_settings()[name] for info in infos}
        distinct = list(dict.fromkeys(found.values()))
        if getattr(args, name) is None and len(distinct) > 1:
            first, second = (next(path for path, value in found.items() if value == v) for v in distinct[:2])
            raise log.LogError(f"pooled runs: {name} is {distinct[0]} in {first} but {distinct[1]} in {second}; "
                               f"pass --{name.replace('_', '-')}")
        settings[name] = distinct[0] if getattr(args, name) is None else getattr(args, name)
    return settings


def check_arguments(args, parser):
    if args.window < 1:
        parser.error(f"--window must be at least 1, got {args.window}")
    if args.onset_margin is not None and args.onset_margin < 0:
        parser.error(f"--onset-margin must be at least 0, got {args.onset_margin}")
    if args.min_post_onset_steps is not None and args.min_post_onset_steps < 2:
        parser.error(f"--min-post-onset-steps must be at least 2, got {args.min_post_onset_steps}")


def parse_args(argv):
    parser = log.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5")
    parser.add_argument("--pair", action="append", default=[], metavar="BASE:WRAPPED",
                        help="quantizer names (repeatable; default: every X with X-ts / X-td / X-ees / X-eed, "
                             "and X-ees:X-eed)")
    parser.add_argument("-o", "--output", help="also write the table as CSV (must not exist)")
    parser.add_argument("--figure", metavar="STEM",
                        help="also draw each pair's KL per step and paired difference: STEM.png, STEM.pdf, "
                             "STEM.csv (none may exist)")
    parser.add_argument("--window", type=int, default=16,
                        help="the figure's trailing mean over steps, per sample (default 16)")
    parser.add_argument("--claim", action="append", default=[], metavar="BASE:WRAPPED:STATISTIC",
                        help="a row that states a claim (repeatable): Holm's adjustment runs over these "
                             "(default: over every row)")
    parser.add_argument("--onset-margin", type=int, metavar="N",
                        help="post-onset slopes start N steps after the onset (default: the run's, else 16)")
    parser.add_argument("--min-post-onset-steps", type=int, metavar="N",
                        help="a sample enters post-onset slopes with at least N such steps (default: the "
                             "run's, else 64)")
    args = parser.parse_args(argv)
    check_arguments(args, parser)
    return args


def check_outputs(args):
    outputs = ([args.output] if args.output else []) + (
        [f"{args.figure}.{ext}" for ext in ("png", "pdf", "csv")] if args.figure else [])
    for i, path in enumerate(outputs):
        if os.path.exists(path):
            raise log.LogError(f"{path} exists; remove it or choose another path")
        if os.path.abspath(path) in map(os.path.abspath, outputs[:i]):
            raise log.LogError(f"{path}: both the table (-o) and the figure's CSV; choose another path")
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise log.LogError(f"{path}: no directory {os.path.dirname(path)}")


def check_pairs(pairs):
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(pair):
            raise log.LogError(f"--pair {':'.join(pair)}: expected BASE:WRAPPED")
        if pair[0] == pair[1]:
            raise log.LogError(f"--pair {':'.join(pair)}: a quantizer against itself")
        if pair in pairs[:i]:
            raise log.LogError(f"--pair {':'.join(pair)}: given twice")


def comparison_rows(pairs, kl, settings):
    """Every statistic of every pair as a table row, and the notes on statistics left out."""
    rows, notes = [], []
    for base, other in pairs:
        found, left_out = pair_statistics(kl[base], kl[other], settings)
        notes += left_out
        for name, base_statistic, other_statistic, used in found:
            rows.append(table_row(base, other, name, len(used), compare(base_statistic, other_statistic, len(used))))
    return rows, notes


def main(argv=None):
    args = parse_args(argv)
    try:
        log.check_distinct(args.runs)
        pairs = [tuple(p.split(":", 1)) for p in args.pair] or default_pairs(args.runs, 10.0)
        check_pairs(pairs)
        check_outputs(args)
        kl, captions, infos = read_kl(args.runs, sorted({q for pair in pairs for q in pair}), 10.0)
        settings = onset_settings(infos, args)
        rows, notes = comparison_rows(pairs, kl, settings)
        claims = claims_table(pick_claims(rows, args.claim))
    except (log.LogError, OSError) as error:
        log.fail_cli(PROG, error)
    print_table(rows, notes, settings)
    print("\n".join(claims))
    if args.output:
        plot_drift.write_csv(args.output, COLUMNS, rows)
    if args.figure:
        samples = len(next(iter(kl.values())))
        paired_figure(args.figure, pairs, kl, rows, args.window, plot_drift.runs_caption(captions, samples))
    return 0


if __name__ == "__main__":
    sys.exit(log.run_unwinding_on_signals(main))
