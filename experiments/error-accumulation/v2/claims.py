#!/usr/bin/env python3
"""The second edition's claims, tested on its runs (README.md here; docs/analysis.md).

    claims.py --accumulation RUN.h5 [RUN.h5 ...] [--free-running RUN.h5 ...] -o DIR [--overwrite]

Reads the accumulation runs (v2-smollm2.yaml: none, kivi-paper, kvarn and their equal-error wrappers -ees
and -eed, lanes teacher_forced and one_step), pooled: the prompts are independent units. Writes
`claims.md` and `claims.csv`, one row per claim: the samples entering, the effect (the mean of a
per-sample value), its 95% interval (bootstrap over samples, or the per-sample values with fewer than 8),
the exact sign-flip p-value, Holm's adjustment over every claim of the table, and a verdict. Claims:
  (b) accumulation across steps, per method: the teacher-forced / one-step amplification of post-onset
      KL (log ratio > 0) and the post-onset slope of the per-step KL gap teacher-forced − one-step (> 0);
  (c) KVarN against KIVI-paper: post-onset teacher-forced KL level and slope (KVarN lower);
  causal: at equal error energy, amplification and level of M-ees (all error as token scale) against
      M-eed (all as direction) (scale accumulates more readily: ees − eed > 0);
  (a) the relative magnitude share of the worst 5% rows per layer, KVarN against KIVI-paper (KVarN
      lower), per layer and pooled over layers, with and without the layer that contributes most.
Post-onset: the steps from onset + onset_margin on, in samples with at least min_post_onset_steps of
them (the runs' `analysis` settings), each sample's onset the later of the lanes compared.
Figures (PNG, PDF and the CSV of the numbers drawn): drift aligned at onset, the paired KVarN − KIVI-paper
difference, the per-layer shares, the equal-error comparison; with --free-running runs also survival
(Kaplan–Meier of first divergence, with the noise floor of two references decoded in different batches)
and, once they are scored (score.py), accuracy against divergence with `accuracy.md`/`accuracy.csv`.
"""
import collections
import math
import os
import sys
import types
import warnings

import numpy as np

ANALYSIS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "analysis")
sys.path.insert(0, os.path.normpath(ANALYSIS_DIR))
import causal_effect  # noqa: E402
import kvdrift_log as log  # noqa: E402
import paired_stats as stats  # noqa: E402
import plot_drift  # noqa: E402  (sets the Agg backend)
import score  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

PROG = "claims.py"
RESAMPLES, SEED, LEVEL = causal_effect.RESAMPLES, causal_effect.SEED, causal_effect.LEVEL
ALPHA = 0.05
METHODS = ("kivi-paper", "kvarn")
WRAPPERS = ("-ees", "-eed")
ACCUMULATION_QUANTIZERS = tuple(m + s for m in METHODS for s in ("",) + WRAPPERS)
WORST5_KINDS = [(tensor, kind) for kind in ("quant", "drift") for tensor in log.TENSORS]
WINDOW = 16  # the figures' trailing mean per sample, as in causal_effect.py's figure
# The runs' own onset_margin and min_post_onset_steps (causal_effect.onset_settings without an override).
RUN_SETTINGS = types.SimpleNamespace(onset_margin=None, min_post_onset_steps=None)

# One colour and line style per method, for every figure: a method's family shares its colour, the
# equal-error wrappers are dashed (scale) and dotted (direction), k4v2 dash-dotted in a darker shade.
METHOD_STYLE = {
    "none": {"color": "0.45", "linestyle": "-"},
    "kivi-paper": {"color": "tab:orange", "linestyle": "-"},
    "kivi-paper-ees": {"color": "tab:orange", "linestyle": "--"},
    "kivi-paper-eed": {"color": "tab:orange", "linestyle": ":"},
    "kivi-paper-k4v2": {"color": "#8c4a00", "linestyle": "-."},
    "kvarn": {"color": "tab:red", "linestyle": "-"},
    "kvarn-ees": {"color": "tab:red", "linestyle": "--"},
    "kvarn-eed": {"color": "tab:red", "linestyle": ":"},
    "kvarn-k4v2": {"color": "#7a0010", "linestyle": "-."},
    "reference": {"color": "black", "linestyle": "-"},
    "noise floor": {"color": "black", "linestyle": (0, (1, 1))},
}


def style(name):
    """The method's entry of METHOD_STYLE; a name the table lacks gets plot_drift's style at an index its
    letters fix, so that it keeps its style from figure to figure."""
    return METHOD_STYLE.get(name) or plot_drift.series_style(sum(map(ord, name)))


# ---------------------------------------------------------------------------------------------
# Reading the runs.

# One quantizer of one accumulation sample: causal_effect's Sample (teacher-forced KL, its onset, the
# one_step KL), the one_step lane's onset, and per (tensor, kind) the teacher-forced lane's
# (worst5_relative_share_per_layer, worst5_relative_share_pooled).
Cache = collections.namedtuple("Cache", "sample one_step_onset worst5")
# One prompt of the accumulation runs: (dataset path, prompt_id), reference tokens, {quantizer: Cache}.
Prompt = collections.namedtuple("Prompt", "key reference_tokens caches")
# One sample of the free-running runs: its prompt key, reference tokens and dataset directory.
FreeSample = collections.namedtuple("FreeSample", "key reference_tokens dataset")


def prompt_key(run, sample):
    """(dataset path, prompt_id): prompt ids are `<file stem>:<i>`, and GSM8K's and MATH500's files are
    both test.jsonl, so the id alone does not name a prompt."""
    return os.path.normpath(str(run.prompts.get("path", ""))), log.attr_str(sample.attrs, "prompt_id")


def prompt_label(key):
    """`gsm8k/test:3`: a prompt key as the CSVs name it."""
    return f"{os.path.basename(os.path.dirname(key[0]))}/{key[1]}"


def dataset_of(run):
    """The directory that holds the prompts (`gsm8k`, `math500`)."""
    return os.path.basename(os.path.dirname(os.path.normpath(str(run.prompts.get("path", "")))))


def note_prompt(seen, key, where):
    """Records that `where` holds the prompt `key`: a prompt given twice to one pooled set would count twice."""
    if key in seen:
        raise log.LogError(f"{where}: prompt {key[1]} of {key[0]} is also {seen[key]}; pool each prompt once")
    seen[key] = where


def read_cache(group, where, first_step, logged_steps, run):
    """The Cache of one quantizer's group of one finished accumulation sample."""
    if "one_step" not in group:
        raise log.LogError(f"{where} has no one_step lane (the accumulation runs log teacher_forced and one_step)")
    sample = causal_effect.read_sample(group, where, first_step, logged_steps)
    if len(sample.kl) != len(sample.one_step):
        raise log.LogError(f"{where}: teacher_forced kl has {len(sample.kl)} steps but one_step kl "
                           f"{len(sample.one_step)} (both follow the reference to its end: a damaged file)")
    one_step_onset = log.onset_step(group["one_step"])
    if sample.onset is None or one_step_onset is None:
        raise run.lacks_onset()
    worst5 = {}
    for tensor, kind in WORST5_KINDS:
        name = f"teacher_forced/{tensor}/{kind}"
        if f"{name}/worst5_relative_share_per_layer" in group:
            worst5[tensor, kind] = (group[f"{name}/worst5_relative_share_per_layer"][()].astype(np.float64),
                                    float(group[name].attrs.get("worst5_relative_share_pooled", np.nan)))
    return Cache(sample, one_step_onset, worst5)


def read_accumulation(paths):
    """The prompts of every finished sample of the runs (each prompt once), the runs' RunInfo and the
    post-onset settings. The runs must pool (one model, each quantizer the same settings)."""
    log.check_distinct(paths)
    prompts, seen = [], {}

    def visit(info, path, index, sample, first_step, logged):
        key = prompt_key(info, sample)
        note_prompt(seen, key, log.sample_where(path, index))
        caches = {q: read_cache(sample[q], f"{path}: samples/{index}/{q}", first_step, logged, info)
                  for q in ACCUMULATION_QUANTIZERS}
        prompts.append(Prompt(key, log.require(sample, "reference_tokens")[()], caches))

    infos = log.visit_finished_samples(paths, ACCUMULATION_QUANTIZERS, visit)
    if not prompts:
        raise log.LogError(f"{', '.join(paths)}: no finished samples")
    return prompts, infos, causal_effect.onset_settings(infos, RUN_SETTINGS)


def read_free_running(paths):
    """The free-running lanes pooled per quantizer (kvdrift_log's SeriesData, samples as (run, index)),
    each sample's FreeSample, the runs, and per scored GSM8K sample {lane: correct} (lane `reference`
    or a quantizer)."""
    runs, series = log.read_runs(paths, [], "teacher_forced", "quant")
    pooled = {data.quantizer: data for data in log.pool_series(series) if data.first_divergence}
    for data in pooled.values():
        if len(data.first_divergence) != len(data.samples):
            raise log.LogError(f"{data.run.path}: some finished samples of '{data.quantizer}' lack the "
                               "free_running lane")
    samples, correct, seen = {}, {}, {}
    for run in runs:
        with log.open_run_file(run.path) as handle:
            for index in run.samples:  # the samples read_runs read, though more may have finished since
                where = log.sample_where(run.path, index)
                with log.reading(where):
                    sample = handle[f"samples/{index}"]
                    key = prompt_key(run, sample)
                    note_prompt(seen, key, where)
                    samples[run.path, index] = FreeSample(key, log.require(sample, "reference_tokens")[()],
                                                          dataset_of(run))
            if run.scores and run.scores["task"] == "gsm8k":
                for lane, group in handle["scores"].items():
                    flags = group if lane == "reference" else group["free_running"]
                    for index, flag in zip(flags["sample"][()], flags["correct"][()]):
                        correct.setdefault((run.path, int(index)), {})[lane] = int(flag)
    return pooled, samples, runs, correct


# ---------------------------------------------------------------------------------------------
# Per-sample post-onset measures.

def later_onsets(*lanes):
    """Per sample, the latest of the lanes' onsets (each a list over samples); -1 where one never read a
    quantized position."""
    return [max(onsets) if min(onsets) >= 0 else -1 for onsets in zip(*lanes)]


def per_sample_means(rows):
    """Each sample's mean from its causal_effect.sums() row."""
    return rows[:, 2] / rows[:, 0]


def per_sample_slopes(rows):
    """Each sample's least-squares slope against the step from its sums() row."""
    return np.atleast_1d(causal_effect.slope(rows, np.eye(len(rows)))) if len(rows) else np.zeros(0)


def post_onset_measures(prompts, names, settings, with_one_step):
    """Per quantizer in `names`, per sample over its post-onset steps: `tf_mean` and `tf_slope` of the
    teacher-forced KL and, `with_one_step`, `one_step_mean`, `amplification` (tf_mean / one_step_mean) and
    `gap_slope` (slope of teacher-forced − one-step KL); `samples`, the indices of the prompts these are
    of. Every quantizer over the same steps: each sample's onset is the later of every compared lane's
    (causal_effect's rule for a pair), and the samples that enter are those with at least
    min_post_onset_steps such steps."""
    caches = {name: [p.caches[name] for p in prompts] for name in names}
    lanes = [[c.sample.onset for c in caches[name]] for name in names]
    if with_one_step:
        lanes += [[c.one_step_onset for c in caches[name]] for name in names]
    onsets = later_onsets(*lanes)

    def post_onset(arrays):
        return causal_effect.post_onset_sums(arrays, onsets, settings["onset_margin"],
                                             settings["min_post_onset_steps"])

    measures, used = {}, None
    for name in names:
        tf, used_here = post_onset([c.sample.kl for c in caches[name]])
        if used is not None and used_here != used:
            raise log.LogError(f"quantizers {names[0]} and {name} have teacher-forced lanes of different lengths")
        used = used_here
        entry = {"tf_mean": per_sample_means(tf), "tf_slope": per_sample_slopes(tf), "samples": used}
        if with_one_step:
            one_step, _ = post_onset([c.sample.one_step for c in caches[name]])
            gap, _ = post_onset([c.sample.kl - c.sample.one_step for c in caches[name]])
            with np.errstate(divide="ignore", invalid="ignore"):
                entry.update(one_step_mean=per_sample_means(one_step), gap_slope=per_sample_slopes(gap),
                             amplification=entry["tf_mean"] / per_sample_means(one_step))
        measures[name] = entry
    return measures


def worst5_matrices(prompts, method, tensor, kind):
    """[samples x layers] of `method`'s per-layer worst-5% relative share (NaN where a layer read nothing
    quantized, or a sample did not log it), and the engine's pooled share per sample."""
    entries = [p.caches[method].worst5.get((tensor, kind)) for p in prompts]
    layers = max((len(e[0]) for e in entries if e is not None), default=0)
    per_layer = np.full((len(prompts), layers), np.nan)
    pooled = np.full(len(prompts), np.nan)
    for row, entry in enumerate(entries):
        if entry is not None:
            per_layer[row, :len(entry[0])], pooled[row] = entry
    return per_layer, pooled


# ---------------------------------------------------------------------------------------------
# Claims: one test per row, Holm over the table.

def paired_test(values):
    """{n, effect (mean of the finite per-sample values), ci_low, ci_high (95% percentile bootstrap of that
    mean over samples; NaN with fewer than 8 samples, where the per-sample values are reported instead),
    interval, p_value (exact sign-flip), per_sample, dropped (non-finite values left out)}."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    n = len(finite)
    result = {"n": n, "effect": finite.mean() if n else np.nan, "ci_low": np.nan, "ci_high": np.nan,
              "interval": "per-sample" if n < stats.MIN_SAMPLES_FOR_INTERVAL else "bootstrap",
              "p_value": stats.sign_flip_pvalue(finite), "per_sample": finite, "dropped": len(values) - n}
    if n >= stats.MIN_SAMPLES_FOR_INTERVAL:
        boot = stats.resample_weights(n, RESAMPLES, SEED) @ finite / n
        result["ci_low"], result["ci_high"] = causal_effect.percentile_interval(boot)
    return result


CLAIM_COLUMNS = ["id", "claim", "statistic", "expected", "n", "effect", "ci_low", "ci_high", "interval",
                 "per_sample_min", "per_sample_max", "p_value", "p_holm", "verdict", "values", "detail"]


def claim_row(claim_id, claim, statistic, expected, values, levels="", detail=""):
    """A table row: `values` are the per-sample values whose mean the claim is about; `expected` is the
    sign the claim states ("> 0" or "< 0")."""
    test = paired_test(values)
    each = test["per_sample"]
    if test["dropped"]:
        detail = f"{test['dropped']} sample(s) without a finite value left out (for the shares: samples that never " \
                 "read a quantized position). " + detail
    return {"id": claim_id, "claim": claim, "statistic": statistic, "expected": expected, "n": test["n"],
            "effect": test["effect"], "ci_low": test["ci_low"], "ci_high": test["ci_high"],
            "interval": test["interval"], "per_sample_min": each.min() if len(each) else np.nan,
            "per_sample_max": each.max() if len(each) else np.nan, "p_value": test["p_value"], "p_holm": np.nan,
            "verdict": "", "values": levels, "detail": detail, "_per_sample": each}


def verdict(effect, p_holm, expected):
    """`supported` (Holm p < 0.05 in the stated direction), `refuted` (significant the other way),
    `not shown` otherwise, `not tested` without a p-value."""
    if not np.isfinite(p_holm):
        return "not tested"
    if p_holm >= ALPHA or effect == 0:
        return "not shown"
    return "supported" if (effect > 0) == (expected == "> 0") else "refuted"


def adjust(rows):
    """Holm's adjustment over every row of the table, and the verdicts."""
    for row, adjusted in zip(rows, stats.holm([row["p_value"] for row in rows])):
        row["p_holm"] = adjusted
        row["verdict"] = verdict(row["effect"], adjusted, row["expected"])
    return rows


def accumulation_rows(prompts, method, settings):
    """(b): the amplification of post-onset KL by feeding errors forward, and the growth of the gap."""
    measures = post_onset_measures(prompts, [method], settings, with_one_step=True)
    m = measures[method]
    levels = (f"TF KL {average(m['tf_mean']):.3g}, one-step KL {average(m['one_step_mean']):.3g} nats; "
              f"amplification ×{np.exp(average(np.log(m['amplification']))):.3g} (geometric mean)")
    return [claim_row(f"b-amplification-{method}", f"{method}: teacher-forced KL exceeds one-step KL after onset",
                      "log(mean TF KL / mean one-step KL), post-onset", "> 0", np.log(m["amplification"]), levels),
            claim_row(f"b-gap-slope-{method}", f"{method}: the TF − one-step KL gap grows after onset",
                      "slope of TF − one-step KL [nats/step], post-onset", "> 0", m["gap_slope"],
                      f"mean gap TF − one-step {average(m['tf_mean'] - m['one_step_mean']):.3g} nats")]


def method_rows(prompts, settings):
    """(c): KVarN against KIVI-paper, paired, over the later onset of the two."""
    kivi, kvarn = METHODS
    measures = post_onset_measures(prompts, [kivi, kvarn], settings, with_one_step=False)
    a, b = measures[kivi], measures[kvarn]
    return [claim_row("c-level", "KVarN's post-onset TF KL is below KIVI-paper's", "kvarn − kivi-paper mean TF KL "
                      "[nats], post-onset", "< 0", b["tf_mean"] - a["tf_mean"],
                      f"kivi-paper {average(a['tf_mean']):.3g}, kvarn {average(b['tf_mean']):.3g} nats"),
            claim_row("c-slope", "KVarN's post-onset TF KL grows more slowly than KIVI-paper's",
                      "kvarn − kivi-paper TF KL slope [nats/step], post-onset", "< 0", b["tf_slope"] - a["tf_slope"],
                      f"kivi-paper {average(a['tf_slope']):.3g}, kvarn {average(b['tf_slope']):.3g} nats/step")]


def causal_rows(prompts, method, settings):
    """At equal error energy: does token-scale error (M-ees) accumulate more than direction error (M-eed)?"""
    ees, eed = (method + suffix for suffix in WRAPPERS)
    amp = post_onset_measures(prompts, [ees, eed], settings, with_one_step=True)
    level = post_onset_measures(prompts, [ees, eed], settings, with_one_step=False)
    geometric = {name: np.exp(average(np.log(amp[name]["amplification"]))) for name in (ees, eed)}
    return [claim_row(f"causal-amplification-{method}", f"{method}: at equal error energy, scale error is "
                      "amplified more than direction error", "log amplification, ees − eed", "> 0",
                      np.log(amp[ees]["amplification"]) - np.log(amp[eed]["amplification"]),
                      f"amplification ×{geometric[ees]:.3g} (ees), ×{geometric[eed]:.3g} (eed), geometric means"),
            claim_row(f"causal-level-{method}", f"{method}: at equal error energy, scale error gives more "
                      "post-onset TF KL than direction error", "ees − eed mean TF KL [nats], post-onset", "> 0",
                      level[ees]["tf_mean"] - level[eed]["tf_mean"],
                      f"ees {average(level[ees]['tf_mean']):.3g}, eed {average(level[eed]['tf_mean']):.3g} nats")]


Worst5 = collections.namedtuple("Worst5", "tensor kind kivi kvarn difference pooled_kivi pooled_kvarn")


def worst5_data(prompts, tensor, kind):
    kivi, pooled_kivi = worst5_matrices(prompts, METHODS[0], tensor, kind)
    kvarn, pooled_kvarn = worst5_matrices(prompts, METHODS[1], tensor, kind)
    return Worst5(tensor, kind, kivi, kvarn, kvarn - kivi, pooled_kivi, pooled_kvarn)


def layer_means(matrix):
    """Per layer (column), the mean over the samples with a value; NaN where none has one."""
    return stats.step_means(matrix, np.ones((1, len(matrix))))[0]


def average(values):
    """The mean of the finite values, NaN without one (no warning)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return values.mean() if len(values) else np.nan


def mean_over_layers(difference, dropped=None):
    """Per sample, the mean over layers (those both methods read quantized) of the paired difference,
    leaving out layer `dropped`."""
    keep = np.ones(difference.shape[1], dtype=bool)
    if dropped is not None:
        keep[dropped] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sample with no layer read quantized: NaN, left out
        return np.nanmean(difference[:, keep], axis=1)


def worst5_row(data):
    """(a): KVarN's relative worst-5% magnitude share against KIVI-paper's, per layer and pooled over
    layers (each sample's mean over layers of the paired difference), and whether one layer decides it."""
    name = f"{data.tensor}/{data.kind}"
    per_layer = layer_means(data.difference)
    present = np.flatnonzero(np.isfinite(per_layer))
    pooled = mean_over_layers(data.difference)
    row = claim_row(f"a-worst5-{data.tensor}-{data.kind}", f"{name}: KVarN's worst-5% magnitude share (relative) "
                    "is below KIVI-paper's", "kvarn − kivi-paper share, mean over layers", "< 0", pooled)
    if not len(present):
        row["detail"] += f"not logged: no {name}/worst5_relative_share_per_layer in the runs"
        return row
    lower = int(np.sum(per_layer[present] < 0))
    significant = sum(stats.sign_flip_pvalue(column[np.isfinite(column)]) < ALPHA and average(column) < 0
                      for column in data.difference[:, present].T)
    # the layer whose mean difference pulls hardest in the direction of the pooled effect
    sign = -1.0 if average(pooled) < 0 else 1.0
    largest = present[np.argmax(sign * per_layer[present])]
    without = paired_test(mean_over_layers(data.difference, largest))
    decides = (row["p_value"] < ALPHA) != (without["p_value"] < ALPHA) or np.sign(without["effect"]) != sign
    row["values"] = (f"kivi-paper {average(data.kivi):.3g}, kvarn {average(data.kvarn):.3g} (mean over layers "
                     f"and samples); engine's pooled share {average(data.pooled_kivi):.3g} vs "
                     f"{average(data.pooled_kvarn):.3g}")
    without_text = stats.describe_interval(without["effect"], without["ci_low"], without["ci_high"],
                                           without["per_sample"], "+.3g")
    row["_layers"] = f"KVarN lower in {lower} of {len(present)} layers"  # for the figure; not a column
    row["detail"] += (f"{row['_layers']} ({significant} with unadjusted sign-flip "
                     f"p < {ALPHA}); largest contributor layer {largest} (mean difference {per_layer[largest]:+.3g}): "
                     f"without it {without_text}, p = {without['p_value']:.3g}: "
                     + ("that layer decides it (without it the sign turns or p crosses 0.05, unadjusted)" if decides
                        else "no single layer decides it (same sign and p on the same side of 0.05 without it)"))
    return row


def claim_rows(prompts, settings):
    rows = []
    for method in METHODS:
        rows += accumulation_rows(prompts, method, settings)
    rows += method_rows(prompts, settings)
    for method in METHODS:
        rows += causal_rows(prompts, method, settings)
    rows += [worst5_row(worst5_data(prompts, tensor, kind)) for tensor, kind in WORST5_KINDS]
    return adjust(rows)


# ---------------------------------------------------------------------------------------------
# Free running: survival, the noise floor, accuracy.

def common_prefix(first, second):
    """The number of leading tokens two sequences share."""
    shared = min(len(first), len(second))
    differ = np.flatnonzero(np.asarray(first[:shared]) != np.asarray(second[:shared]))
    return int(differ[0]) if len(differ) else shared


def reference_divergence(pairs):
    """First divergence and outcome (kvdrift's words) of each pair of reference token sequences: a token
    mismatch (an event), identical (censored at their length), or one a proper prefix of the other, which
    is `censored` at the shorter's end: reference tokens end with the end token, so the shorter stream was
    cut by its step limit before any difference showed, not stopped."""
    first_divergence, outcome = [], []
    for a, b in pairs:
        d = common_prefix(a, b)
        first_divergence.append(d)
        outcome.append("token_mismatch" if d < min(len(a), len(b)) else "censored" if len(a) != len(b)
                       else "identical")
    return first_divergence, outcome


def step_text(value):
    """A Kaplan–Meier median or interval end: `not reached` for +inf."""
    return "not reached" if math.isinf(value) else f"{value:g}"


def median_text(km):
    return f"{step_text(km['median'])} [{step_text(km['median_low'])}, {step_text(km['median_high'])}]"


def km_median(curve):
    """The Kaplan–Meier median: the first step where S ≤ 0.5, +inf when never (kvdrift's definition)."""
    below = np.flatnonzero(curve <= 0.5)
    return float(below[0]) if len(below) else math.inf


def survival_with_band(first_divergence, outcome, steps):
    """kvdrift_log.survival_curve, its 95% pointwise band and the median's 95% interval from a percentile
    bootstrap over samples (1000 resamples, seed 0; an unreached median stays +inf)."""
    first_divergence, outcome = np.asarray(first_divergence), np.asarray(outcome)
    curve, at_risk = log.survival_curve(first_divergence, outcome, steps)
    weights = stats.resample_weights(len(first_divergence), RESAMPLES, SEED).astype(np.int64)
    boot = np.array([log.survival_curve(np.repeat(first_divergence, w), np.repeat(outcome, w), steps)[0]
                     for w in weights])
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    medians = np.quantile([km_median(c) for c in boot], [(1 - LEVEL) / 2, (1 + LEVEL) / 2], method="inverted_cdf")
    return {"curve": curve, "at_risk": at_risk, "low": low, "high": high, "median": km_median(curve),
            "median_low": medians[0], "median_high": medians[1], "samples": len(first_divergence)}


def noise_floor(free_samples, prompts):
    """The first divergence between the free-running runs' reference and the accumulation runs' for the
    prompts in both: two references of one prompt decoded in different batch compositions."""
    accumulation = {p.key: p.reference_tokens for p in prompts}
    pairs = [(accumulation[s.key], s.reference_tokens) for s in free_samples.values() if s.key in accumulation]
    first_divergence, outcome = reference_divergence(pairs)
    return first_divergence, outcome, max((max(len(a), len(b)) for a, b in pairs), default=0)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p of discordant counts b (reference right, quantizer wrong) and c: twice the
    smaller binomial(b + c, 1/2) tail, at most 1; 1 without discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


ACCURACY_COLUMNS = ["lane", "correct", "scored", "accuracy", "wilson_low", "wilson_high", "b_reference_only",
                    "c_quantizer_only", "mcnemar_p", "km_median_first_divergence", "km_median_low",
                    "km_median_high", "divergence_samples"]


def accuracy_rows(correct, gsm8k_survival, quantizers):
    """Per lane (the reference, then each of `quantizers` that was scored): GSM8K accuracy with its Wilson
    interval (score.py's), the exact McNemar test against the reference over the samples both were scored
    on, and the Kaplan–Meier median first divergence over the GSM8K samples."""
    with_scores = {lane for flags in correct.values() for lane in flags}
    lanes = ["reference"] + [name for name in quantizers if name in with_scores]
    rows = []
    for lane in lanes:
        paired = [(f["reference"], f[lane]) for f in correct.values() if lane in f and "reference" in f]
        hits, scored, accuracy, low, high = score.accuracy_summary([q for _, q in paired])
        b = sum(r == 1 and q == 0 for r, q in paired)
        c = sum(r == 0 and q == 1 for r, q in paired)
        km = gsm8k_survival.get(lane, {})
        rows.append({"lane": lane, "correct": hits, "scored": scored, "accuracy": accuracy, "wilson_low": low,
                     "wilson_high": high, "b_reference_only": b if lane != "reference" else "",
                     "c_quantizer_only": c if lane != "reference" else "",
                     "mcnemar_p": mcnemar_exact(b, c) if lane != "reference" else np.nan,
                     "km_median_first_divergence": km.get("median", np.nan),
                     "km_median_low": km.get("median_low", np.nan),
                     "km_median_high": km.get("median_high", np.nan), "divergence_samples": km.get("samples", "")})
    return rows


def survival_by_quantizer(pooled, free_samples, dataset=None):
    """survival_with_band per quantizer over its free-running samples (of `dataset` only, when given)."""
    result = {}
    for name, data in pooled.items():
        keep = [i for i, key in enumerate(data.samples) if dataset is None or free_samples[key].dataset == dataset]
        if keep:
            result[name] = survival_with_band([data.first_divergence[i] for i in keep], [data.outcome[i] for i in keep],
                                              max(data.free_running_steps[i] for i in keep))
    return result


# ---------------------------------------------------------------------------------------------
# Figures: each returns (figure, CSV columns, CSV rows, shared legend?); save_figure writes NAME.png
# (150 dpi), NAME.pdf and NAME.csv.

FIGURE_NAMES = ("drift_onset", "paired_kvarn_kivi", "worst5_per_layer", "equal_error", "survival",
                "accuracy_divergence")
STEPS_SINCE_ONSET = "steps since onset [tokens]"


def drawn_width(counts, total):
    """How many leading steps since onset to draw: those that at least 8 samples reach (all samples with
    fewer in all), so that no median or band rests on a handful of samples."""
    enough = counts >= min(stats.MIN_SAMPLES_FOR_INTERVAL, total)
    return int(np.argmin(enough)) if not enough.all() else len(counts)


def aligned_matrix(arrays, onsets):
    """[samples x steps since onset] of each per-step array from its sample's onset on (NaN past its end);
    the samples that never read a quantized position left out (kvdrift_log.since_onset)."""
    shifted = [log.since_onset(np.arange(len(a)), a, onset) for a, onset in zip(arrays, onsets)]
    return log.stack_padded([values for _, values in filter(None, shifted)])


def lane_curve(prompts, name, lane):
    """(steps since onset, samples, q25, median, q75) over samples of each sample's trailing 16-step mean KL
    of one quantizer's lane, each sample from the later of its teacher-forced and one-step onsets (claim
    (b)'s steps). Per-step KL varies by orders of magnitude from token to token; the window shows the level."""
    caches = [p.caches[name] for p in prompts]
    onsets = later_onsets([c.sample.onset for c in caches], [c.one_step_onset for c in caches])
    matrix = aligned_matrix([c.sample.kl if lane == "teacher_forced" else c.sample.one_step for c in caches], onsets)
    matrix = causal_effect.trailing_mean(matrix, WINDOW)
    counts = np.isfinite(matrix).sum(axis=0)
    width = drawn_width(counts, len(matrix))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q25, median, q75 = np.nanpercentile(matrix[:, :width], [25, 50, 75], axis=0)
    return np.arange(width), counts[:width], q25, median, q75


def drift_onset_figure(prompts, settings):
    """Per method family (the method, -ees, -eed), teacher-forced and one-step KL against the steps since
    onset (lane_curve), one y axis for all four panels; the samples behind each point below."""
    fig = plt.figure(figsize=(13, 10.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.55])
    panels, rows = [], []
    for r, method in enumerate(METHODS):
        for c, lane in enumerate(("teacher_forced", "one_step")):
            ax = fig.add_subplot(grid[r, c])
            panels.append(ax)
            for name in (method,) + tuple(method + s for s in WRAPPERS):
                x, counts, q25, median, q75 = lane_curve(prompts, name, lane)
                ax.plot(x, median, linewidth=1.4, label=name, **style(name))
                ax.fill_between(x, q25, q75, color=style(name)["color"], alpha=0.12, linewidth=0)
                rows += [{"quantizer": name, "lane": lane, "steps_since_onset": int(s), "samples": int(n),
                          "median": m, "q25": lo, "q75": hi} for s, n, m, lo, hi in zip(x, counts, median, q25, q75)]
            ax.axvline(settings["onset_margin"], color="gray", linewidth=0.8, linestyle="--")
            ax.set_title(f"({chr(97 + 2 * r + c)}) {method} family, {lane.replace('_', '-')} KL", fontsize=10)
            ax.set_ylabel(f"KL(p_ref ‖ p_lane) [nats], trailing {WINDOW}-step mean")
            ax.set_xlabel(STEPS_SINCE_ONSET)
            ax.grid(True, alpha=0.3)
    values = [v for row in rows for v in (row["q25"], row["median"], row["q75"])]
    for ax in panels:
        if plot_drift.use_log_scale(values, "auto"):
            ax.set_yscale("log")
            ax.set_ylim(plot_drift.log_floor(values) / 2, max(v for v in values if np.isfinite(v)) * 1.5)
        else:
            ax.set_ylim(0, max(v for v in values if np.isfinite(v)) * 1.05)
        ax.set_xlim(0, max(row["steps_since_onset"] for row in rows))
    counts_ax = fig.add_subplot(grid[2, :], sharex=panels[0])
    for name in ACCUMULATION_QUANTIZERS:
        mine = [r for r in rows if r["quantizer"] == name and r["lane"] == "teacher_forced"]
        counts_ax.step([r["steps_since_onset"] for r in mine], [r["samples"] for r in mine], where="mid",
                       linewidth=0.9, **style(name))
    caches = [p.caches[METHODS[0]] for p in prompts]
    never = sum(o < 0 for o in later_onsets([c.sample.onset for c in caches], [c.one_step_onset for c in caches]))
    counts_ax.set_title(f"(e) samples behind each point (of {len(prompts)}; {never} never read a quantized position "
                        f"under {METHODS[0]}); points drawn where at least "
                        f"{min(stats.MIN_SAMPLES_FOR_INTERVAL, len(prompts))} samples remain", fontsize=10)
    counts_ax.set_xlabel(STEPS_SINCE_ONSET)
    counts_ax.set_ylabel("samples")
    counts_ax.set_ylim(bottom=0)
    counts_ax.grid(True, alpha=0.3)
    fig.suptitle("Drift aligned at onset (each sample from the later of its teacher-forced and one-step onsets): "
                 f"each sample's trailing {WINDOW}-step mean KL,\nmedian over samples, bands = interquartile range; "
                 "dashed vertical line: onset + onset_margin, where the post-onset claims start", fontsize=11)
    return fig, ["quantizer", "lane", "steps_since_onset", "samples", "median", "q25", "q75"], rows, True


def paired_figure(prompts, settings, rows_by_id, labels=METHODS):
    """KVarN − KIVI-paper teacher-forced KL against the steps since the later onset of the two: both
    means and their paired difference (each sample's trailing 16-step mean) with causal_effect.py's
    pointwise and max-t simultaneous bands, over the steps at least 8 samples reach. `labels`: how the
    title names the two methods (with their settings, so that the bit widths show)."""
    kivi, kvarn = ([p.caches[name].sample for p in prompts] for name in METHODS)
    onsets = later_onsets([s.onset for s in kivi], [s.onset for s in kvarn])
    counts = np.isfinite(aligned_matrix([s.kl for s in kivi], onsets)).sum(axis=0)
    kept = [i for i, o in enumerate(onsets) if o >= 0]
    width = drawn_width(counts, len(kept))
    # causal_effect.step_curves on each sample's KL from its onset on, cut where fewer than 8 samples remain
    aligned = [[samples[i]._replace(kl=samples[i].kl[onsets[i]:onsets[i] + width]) for i in kept]
               for samples in (kivi, kvarn)]
    curves = causal_effect.step_curves(*aligned, WINDOW)
    fig = plt.figure(figsize=(12, 9))
    grid = fig.add_gridspec(3, 1, height_ratios=[1, 1, 0.45])
    ax_kl, ax_diff = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    for series, name, ax in (("base", METHODS[0], ax_kl), ("other", METHODS[1], ax_kl),
                             ("difference", f"{METHODS[1]} − {METHODS[0]}", ax_diff)):
        mine = [r for r in curves if r["series"] == series]
        x = [r["step"] for r in mine]
        line = style(name) if series != "difference" else {"color": "tab:blue", "linestyle": "-"}
        ax.plot(x, [r["center"] for r in mine], linewidth=1.4, label=name, **line)
        ax.fill_between(x, [r["low"] for r in mine], [r["high"] for r in mine], color=line["color"], alpha=0.2,
                        linewidth=0, label="pointwise 95% band" if series == "difference" else None)
        if series == "difference":
            for end in ("simultaneous_low", "simultaneous_high"):
                ax.plot(x, [r[end] for r in mine], color="tab:blue", linewidth=0.9, linestyle="--",
                        label="simultaneous 95% band (max-t)" if end == "simultaneous_low" else None)
    ax_diff.axhline(0, color="gray", linewidth=0.8)
    level, slope = rows_by_id["c-level"], rows_by_id["c-slope"]
    ax_kl.set_title(f"(a) teacher-forced KL, mean over samples (trailing {WINDOW}-step mean per sample)", fontsize=10)
    ax_kl.set_ylabel("KL(p_ref ‖ p_lane) [nats]")
    ax_kl.set_ylim(bottom=0)
    ax_diff.set_title(f"(b) paired difference {METHODS[1]} − {METHODS[0]}\npost-onset claims (steps from onset + "
                      f"{settings['onset_margin']}, n = {level['n']}): level {level['effect']:+.3g} nats "
                      f"(p = {level['p_value']:.2g}, Holm {level['p_holm']:.2g}), "
                      f"slope {slope['effect']:+.3g} nats/step "
                      f"(p = {slope['p_value']:.2g}, Holm {slope['p_holm']:.2g})",
                      fontsize=10)
    ax_diff.set_ylabel("difference in KL [nats]")
    ax_counts = fig.add_subplot(grid[2], sharex=ax_kl)
    mine = [r for r in curves if r["series"] == "difference"]
    ax_counts.step([r["step"] for r in mine], [r["samples"] for r in mine], where="mid", color="tab:blue",
                   linewidth=0.9)
    ax_counts.set_title(f"(c) samples behind each point (of {len(prompts)}; drawn where at least "
                        f"{min(stats.MIN_SAMPLES_FOR_INTERVAL, len(kept))} remain)", fontsize=10)
    ax_counts.set_ylabel("samples")
    ax_counts.set_ylim(bottom=0)
    for ax in (ax_kl, ax_diff, ax_counts):
        ax.axvline(settings["onset_margin"], color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel("steps since the later onset of the two [tokens]")
        ax.grid(True, alpha=0.3)
        if ax is not ax_counts:
            ax.legend(fontsize=9, loc="upper left")
    fig.suptitle(f"Paired comparison, aligned at onset: {labels[1]}\nagainst {labels[0]}\nbands: 95% percentile "
                 f"bootstrap over samples ({RESAMPLES} resamples, paired)", fontsize=11)
    rows = [{("steps_since_onset" if k == "step" else k): v for k, v in r.items()} for r in curves]
    return fig, ["series", "steps_since_onset", "samples", "center", "low", "high", "simultaneous_low",
                 "simultaneous_high"], rows, False


def worst5_figure(prompts, rows_by_id):
    """Per layer, the two methods' mean worst-5% relative magnitude share with 95% bootstrap intervals."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True, squeeze=False)
    rows = []
    for (tensor, kind), ax in zip(WORST5_KINDS, [axes[0, 0], axes[1, 0], axes[0, 1], axes[1, 1]]):
        data = worst5_data(prompts, tensor, kind)
        for name, matrix in ((METHODS[0], data.kivi), (METHODS[1], data.kvarn)):
            band = stats.simultaneous_band(matrix, RESAMPLES, SEED, LEVEL)
            layers = np.flatnonzero(band.samples > 0)
            ax.errorbar(layers, band.mean[layers], yerr=[band.mean[layers] - band.pointwise_low[layers],
                                                         band.pointwise_high[layers] - band.mean[layers]],
                        marker="o", markersize=3, capsize=2, linewidth=1.2, label=name, **style(name))
            rows += [{"quantizer": name, "tensor": tensor, "kind": kind, "layer": int(layer),
                      "samples": int(band.samples[layer]), "mean": band.mean[layer],
                      "low": band.pointwise_low[layer], "high": band.pointwise_high[layer]} for layer in layers]
        row = rows_by_id[f"a-worst5-{tensor}-{kind}"]
        ax.set_title(f"{tensor}s, {kind}: {row.get('_layers', 'not logged')}\nkvarn − kivi-paper (mean over layers) "
                     f"{row['effect']:+.3g}, p = {row['p_value']:.2g}, Holm p = {row['p_holm']:.2g} (n = {row['n']})",
                     fontsize=9)
        ax.set_ylabel("worst-5% magnitude share, relative\nΣ(E_M/‖x‖²) / Σ(E_T/‖x‖²)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    fig.suptitle("Magnitude share of the worst 5% of rows per layer (relative error, rows read quantized), teacher-"
                 "forced lane:\nmean over samples, 95% percentile bootstrap intervals over samples", fontsize=11)
    return fig, ["quantizer", "tensor", "kind", "layer", "samples", "mean", "low", "high"], rows, True


def equal_error_panel(ax, per_sample, names, labels, geometric):
    """Per-sample points of two quantizers joined by a line per sample (`labels`: the samples' prompts),
    and each one's mean (geometric with `geometric`) with its 95% interval beside them; returns the CSV rows."""
    rows = []
    values = np.array([per_sample[name] for name in names])  # [2 x samples], the same samples
    for sample, pair in zip(labels, values.T):
        ax.plot([0, 1], pair, color="0.75", linewidth=0.6, zorder=1)
        rows += [{"quantizer": name, "sample": sample, "value": v, "low": np.nan, "high": np.nan}
                 for name, v in zip(names, pair)]
    for x, name in enumerate(names):
        ax.scatter(np.full(values.shape[1], x), values[x], s=12, color=style(name)["color"], zorder=2,
                   marker="o" if name.endswith("-ees") else "s", label=f"{name}: per sample")
        test = paired_test(np.log(values[x]) if geometric else values[x])
        ends = np.array([test["effect"], test["ci_low"], test["ci_high"]])
        centre, low, high = np.exp(ends) if geometric else ends
        ax.errorbar([x + 0.18], [centre], yerr=[[centre - low], [high - centre]] if np.isfinite(low) else None,
                    color="black", marker="D", markersize=5, capsize=4, zorder=3,
                    label=("geometric mean" if geometric else "mean") + " and 95% interval")
        rows.append({"quantizer": name, "sample": "geometric mean" if geometric else "mean", "value": centre,
                     "low": low, "high": high})
    ax.set_xticks([0, 1], names)
    ax.set_xlim(-0.4, 1.5)
    ax.grid(True, axis="y", alpha=0.3)
    return rows


def equal_error_figure(prompts, settings, rows_by_id):
    """At equal error energy: amplification (TF / one-step) and post-onset TF KL of M-ees against M-eed."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5), squeeze=False)
    rows = []
    for col, method in enumerate(METHODS):
        names = [method + suffix for suffix in WRAPPERS]
        amp = post_onset_measures(prompts, names, settings, with_one_step=True)
        level = post_onset_measures(prompts, names, settings, with_one_step=False)
        for r, (statistic, measures, key, geometric) in enumerate(
                (("amplification", amp, "amplification", True), ("level", level, "tf_mean", False))):
            ax = axes[r, col]
            labels = [prompt_label(prompts[i].key) for i in measures[names[0]]["samples"]]
            panel = equal_error_panel(ax, {n: measures[n][key] for n in names}, names, labels, geometric)
            rows += [dict(row, method=method, statistic=statistic) for row in panel]
            claim = rows_by_id[f"causal-{statistic}-{method}"]
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            what = "log(ees/eed)" if geometric else "ees − eed"
            ax.set_title(f"({chr(97 + 2 * r + col)}) {method}: {what} {claim['effect']:+.3g}, p = "
                         f"{claim['p_value']:.2g}, Holm p = {claim['p_holm']:.2g} (n = {claim['n']})", fontsize=10)
            ax.set_ylabel("mean TF KL / mean one-step KL, post-onset [ratio]" if geometric
                          else "mean TF KL, post-onset [nats]")
            if geometric:
                ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    fig.suptitle("Equal error energy: all of the method's error as token scale (-ees) or as direction (-eed).\n"
                 "Grey lines join one sample; black diamonds: (geometric) mean with 95% bootstrap interval over "
                 f"samples; post-onset steps from onset + {settings['onset_margin']}", fontsize=11)
    return fig, ["method", "statistic", "quantizer", "sample", "value", "low", "high"], rows, True


def survival_figure(curves):
    """Kaplan–Meier survival (survival_with_band) of each quantizer's free-running lane and of the noise
    floor (reference against reference of the other sweep), with 95% bootstrap bands; samples at risk below."""
    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, 0.4])
    ax, ax_risk = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    rows = []
    for name, km in curves.items():
        steps = np.arange(np.flatnonzero(km["at_risk"])[-1] + 1 if km["at_risk"].any() else 0)  # while observed
        median = step_text(km["median"])
        label = (f"{name} · {km['samples']} samples · median {median}" if name != "noise floor" else
                 f"noise floor: the two sweeps' references · {km['samples']} prompts · median {median}")
        shown = len(steps)
        ax.step(steps, km["curve"][:shown], where="post", linewidth=1.5, label=label, **style(name))
        ax.fill_between(steps, km["low"][:shown], km["high"][:shown], step="post", color=style(name)["color"],
                        alpha=0.12, linewidth=0)
        ax_risk.step(steps, km["at_risk"][:shown], where="post", linewidth=0.9, **style(name))
        rows += [{"series": name, "step": int(t), "samples": km["samples"], "at_risk": int(n), "survival": s,
                  "low": lo, "high": hi}
                 for t, n, s, lo, hi in zip(steps, km["at_risk"], km["curve"], km["low"], km["high"])]
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("P(still identical to the reference through step t)")
    ax.legend(fontsize=8.5, loc="center right")
    ax_risk.set_ylabel("samples at risk")
    ax_risk.set_ylim(bottom=0)
    for a in (ax, ax_risk):
        a.set_xlabel("decoding step [tokens]")
        a.grid(True, alpha=0.3)
    fig.suptitle("Free-running: Kaplan–Meier survival of the reference trajectory (identical or cut samples "
                 "censored);\nbands: 95% pointwise percentile bootstrap over samples", fontsize=11)
    return fig, ["series", "step", "samples", "at_risk", "survival", "low", "high"], rows, False


def accuracy_figure(rows, steps):
    """GSM8K accuracy (Wilson 95%) against the Kaplan–Meier median first divergence (bootstrap 95%); a median
    not reached is drawn at the right edge with an arrow."""
    fig, ax = plt.subplots(figsize=(10, 6.5))
    reference = rows[0]
    ax.axhspan(reference["wilson_low"], reference["wilson_high"], color="black", alpha=0.07, linewidth=0)
    ax.axhline(reference["accuracy"], color="black", linewidth=1,
               label=f"reference {reference['correct']}/{reference['scored']} (band: Wilson 95%)")
    for row, marker in zip(rows[1:], "osD^vPX*" * len(rows)):  # a marker each: methods may share a point
        finite = np.isfinite(row["km_median_first_divergence"])
        x = row["km_median_first_divergence"] if finite else steps
        low = row["km_median_low"] if np.isfinite(row["km_median_low"]) else steps
        high = row["km_median_high"] if np.isfinite(row["km_median_high"]) else steps
        ax.errorbar([x], [row["accuracy"]], xerr=[[x - low], [high - x]],
                    yerr=[[row["accuracy"] - row["wilson_low"]], [row["wilson_high"] - row["accuracy"]]],
                    marker=marker if finite else ">", markersize=7, capsize=3, color=style(row["lane"])["color"],
                    markerfacecolor="none", markeredgewidth=1.5,
                    label=f"{row['lane']}: {row['correct']}/{row['scored']}, McNemar p = {row['mcnemar_p']:.2g}"
                          + ("" if finite else " (median not reached)"))
    ax.set_xlim(0, steps * 1.05)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("Kaplan–Meier median first divergence on GSM8K [decoding step]")
    ax.set_ylabel("GSM8K accuracy (free-running reply)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8.5, loc="best")
    fig.suptitle("GSM8K accuracy against first divergence: Wilson 95% intervals (accuracy), 95% bootstrap "
                 "intervals (median)", fontsize=11)
    return fig, ACCURACY_COLUMNS, rows, False


# ---------------------------------------------------------------------------------------------
# Writing: claims.md and .csv, accuracy.md and .csv, the figures; staged, then moved into DIR.

OUTPUT_FILES = (["claims.md", "claims.csv", "accuracy.md", "accuracy.csv"]
                + [f"{name}.{ext}" for name in FIGURE_NAMES for ext in ("png", "pdf", "csv")])
FIGURE_TEXT = {
    "drift_onset": "teacher-forced and one-step KL against the steps since onset, per method family, median and "
                   "interquartile range over samples; (e) the samples behind each point",
    "paired_kvarn_kivi": "KVarN − KIVI-paper teacher-forced KL since the later onset of the two, mean over samples "
                         "with pointwise and simultaneous (max-t) 95% bands; (c) the samples behind each point",
    "worst5_per_layer": "the worst-5% relative magnitude share per layer, keys and values, quant and drift, "
                        "KIVI-paper against KVarN, with 95% bootstrap intervals",
    "equal_error": "amplification and post-onset level of -ees against -eed, per sample, with the (geometric) "
                   "mean and its 95% interval",
    "survival": "Kaplan–Meier survival of each free-running lane and of the noise floor, with 95% bootstrap bands",
    "accuracy_divergence": "GSM8K accuracy against the Kaplan–Meier median first divergence, one point per method",
}


def save_figure(stage, name, made, caption):
    """`made`: (figure, CSV columns, CSV rows, whether the panels' labelled artists make one legend under
    them; else the panels carry their own)."""
    fig, columns, rows, shared_legend = made
    plot_drift.finish_figure(fig, caption, legend=None if shared_legend else ([], []))
    fig.savefig(os.path.join(stage, f"{name}.png"), dpi=150)
    fig.savefig(os.path.join(stage, f"{name}.pdf"))
    plt.close(fig)
    plot_drift.write_csv(os.path.join(stage, f"{name}.csv"), columns, rows)


def effect_text(row):
    return stats.describe_interval(row["effect"], row["ci_low"], row["ci_high"], row["_per_sample"])


def claims_markdown(rows, infos, settings, samples, free_lines):
    lines = [f"# Claims of the second edition ({os.path.basename(infos[0].model_path)})", "",
             f"Accumulation runs, pooled ({samples} finished samples; prompts are independent units):"]
    for info in infos:
        lines.append(f"- `{info.path}`: {info.caption()}" + (f" ({info.unfinished} unfinished sample(s) left out)"
                                                              if info.unfinished else ""))
    lines += ["", "Quantizers: " + "; ".join(f"`{infos[0].quantizer_label(name)}`" for name in ACCUMULATION_QUANTIZERS)]
    lines += ["", f"Post-onset steps: from onset + {settings['onset_margin']} on, in the samples with at least "
              f"{settings['min_post_onset_steps']} of them (the runs' `analysis` settings); a sample's onset is the "
              "later of the `onset_step` of every lane compared (teacher-forced and one-step for (b) and the "
              f"amplifications, teacher-forced for the levels and slopes). n: the samples entering, of the {samples}. "
              "Effect: the mean over samples of the "
              "per-sample value named in the statistic; 95% percentile bootstrap over samples (1000 resamples, "
              f"seed 0), or with n < {stats.MIN_SAMPLES_FOR_INTERVAL} the per-sample values and their range. p: exact "
              "sign-flip test of the per-sample values (all patterns up to 16 samples, 20,000 random ones above); "
              f"Holm's adjustment over the {len(rows)} claims. Verdict: **supported** when Holm p < {ALPHA} in the "
              "expected direction, **refuted** when Holm p < 0.05 the other way, **not shown** otherwise. The "
              "causal rows state the token-scale mechanism (scale error accumulates more readily than direction "
              "error at equal energy): refuted means direction error accumulates more.", "",
              "| id | claim | statistic | expected | n | effect [95% CI] | p | Holm p | verdict | values |",
              "|---|---|---|---|---:|---|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['id']} | {row['claim']} | {row['statistic']} | {row['expected']} | {row['n']} | "
                     f"{effect_text(row)} | {row['p_value']:.3g} | {row['p_holm']:.3g} | **{row['verdict']}** | "
                     f"{row['values']} |")
    lines += ["", "Notes:"] + [f"- {row['id']}: {row['detail']}" for row in rows if row["detail"]]
    lines += [""] + free_lines + ["", "## Figures", ""]
    return lines


def free_running_lines(curves, pooled, floor, accuracy_note):
    """claims.md's section on the free-running runs: the noise floor and each lane's survival (`curves`:
    survival_with_band per quantizer and of the noise floor)."""
    first_divergence, outcome, _ = floor
    lines = ["## Free running", ""]
    if first_divergence:
        km = curves["noise floor"]
        mismatches = sorted(d for d, o in zip(first_divergence, outcome) if o == "token_mismatch")
        lines.append(f"Noise floor (the two sweeps decode each prompt in different batch compositions): of the "
                     f"{len(first_divergence)} prompts in both, {outcome.count('identical')} have identical references "
                     f"over their whole length, {outcome.count('censored')} agree until the shorter one was cut by its "
                     f"step limit, and {len(mismatches)} differ in a token"
                     + (f", at steps {mismatches}" if mismatches else "") + "; Kaplan–Meier "
                     f"median first divergence of the two references {median_text(km)}.")
    else:
        lines.append("Noise floor: no prompt is in both the free-running and the accumulation runs.")
    lines += ["", "| quantizer | samples | KM median first divergence [95% CI] | identical |", "|---|---:|---|---:|"]
    for name, km in curves.items():
        if name == "noise floor":
            continue
        lines.append(f"| {name} | {km['samples']} | {median_text(km)} | "
                     f"{pooled[name].outcome.count('identical')} |")
    return lines + ["", accuracy_note]


def accuracy_markdown(rows):
    lines = ["# GSM8K accuracy of the free-running replies", "",
             "Accuracy with its 95% Wilson interval (score.py's); McNemar's exact test of each quantizer against "
             "the reference on the same questions (b: the reference right and the quantizer wrong, c: the other "
             "way; two-sided binomial p); Kaplan–Meier median first divergence over the GSM8K samples with its 95% "
             "bootstrap interval.", "",
             "| lane | correct / scored | accuracy [Wilson 95%] | b | c | McNemar p | KM median first divergence |",
             "|---|---:|---|---:|---:|---:|---|"]
    for row in rows:
        p = "" if row["lane"] == "reference" else f"{row['mcnemar_p']:.3g}"
        km = "" if row["lane"] == "reference" else median_text(
            {"median": row["km_median_first_divergence"], "median_low": row["km_median_low"],
             "median_high": row["km_median_high"]})
        lines.append(f"| {row['lane']} | {row['correct']}/{row['scored']} | {row['accuracy']:.3f} "
                     f"[{row['wilson_low']:.3f}, {row['wilson_high']:.3f}] | {row['b_reference_only']} | "
                     f"{row['c_quantizer_only']} | {p} | {km} |")
    return lines


def free_running_outputs(stage, free, prompts):
    """The survival figure, and accuracy.md/.csv with their figure when every GSM8K run is scored; returns
    claims.md's free-running section and the figures drawn."""
    pooled, free_samples, runs, correct = free
    floor = noise_floor(free_samples, prompts)
    curves = survival_by_quantizer(pooled, free_samples)
    if floor[0]:
        curves["noise floor"] = survival_with_band(*floor)
    caption = plot_drift.runs_caption([run.caption() for run in runs], len(free_samples))
    save_figure(stage, "survival", survival_figure(curves), caption)
    drawn = ["survival"]
    gsm8k = [run for run in runs if dataset_of(run) == "gsm8k"]
    unscored = [run.path for run in gsm8k if not run.scores]
    if not gsm8k:
        note = "Accuracy: no GSM8K free-running run given."
    elif unscored:
        note = (f"Accuracy: not computed, {len(unscored)} GSM8K run(s) not scored; score each first, e.g. "
                f"`.venv/bin/python analysis/score.py {unscored[0]}`.")
    else:
        rows = accuracy_rows(correct, survival_by_quantizer(pooled, free_samples, "gsm8k"), list(pooled))
        plot_drift.write_csv(os.path.join(stage, "accuracy.csv"), ACCURACY_COLUMNS, rows)
        with open(os.path.join(stage, "accuracy.md"), "w") as out:
            out.write("\n".join(accuracy_markdown(rows)) + "\n")
        steps = max(max(data.free_running_steps) for data in pooled.values())
        save_figure(stage, "accuracy_divergence", accuracy_figure(rows, steps), caption)
        drawn.append("accuracy_divergence")
        note = "Accuracy on GSM8K, with McNemar's exact test against the reference: `accuracy.md`."
    return free_running_lines(curves, pooled, floor, note), drawn


def render(stage, prompts, infos, settings, rows, free):
    """Every output into the directory `stage`."""
    by_id = {row["id"]: row for row in rows}
    caption = plot_drift.runs_caption([info.caption() for info in infos], len(prompts))
    figures = {"drift_onset": lambda: drift_onset_figure(prompts, settings),
               "paired_kvarn_kivi": lambda: paired_figure(prompts, settings, by_id,
                                                          [infos[0].quantizer_label(m) for m in METHODS]),
               "worst5_per_layer": lambda: worst5_figure(prompts, by_id),
               "equal_error": lambda: equal_error_figure(prompts, settings, by_id)}
    for name, make in figures.items():
        save_figure(stage, name, make(), caption)
    drawn = list(figures)
    free_lines = ["## Free running", "", "No free-running runs given (--free-running): no survival, noise floor "
                  "or accuracy."]
    if free is not None:
        free_lines, more = free_running_outputs(stage, free, prompts)
        drawn += more
    lines = claims_markdown(rows, infos, settings, len(prompts), free_lines)
    lines += [f"- `{name}.png` ([PDF]({name}.pdf), numbers `{name}.csv`): {FIGURE_TEXT[name]}" for name in drawn]
    with open(os.path.join(stage, "claims.md"), "w") as out:
        out.write("\n".join(lines) + "\n")
    plot_drift.write_csv(os.path.join(stage, "claims.csv"), CLAIM_COLUMNS, rows)


def parse_args(argv):
    parser = log.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--accumulation", nargs="+", required=True, metavar="RUN.h5",
                        help="runs of v2-smollm2.yaml (teacher_forced and one_step lanes), pooled")
    parser.add_argument("--free-running", nargs="+", default=[], metavar="RUN.h5",
                        help="runs of free-running-smollm2.yaml: survival, the noise floor and (scored) accuracy")
    parser.add_argument("-o", "--output-dir", required=True, metavar="DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier render in DIR")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        log.check_distinct(args.accumulation + args.free_running)
        earlier = log.earlier_outputs(args.output_dir, OUTPUT_FILES, args.overwrite, "claims table")
        prompts, infos, settings = read_accumulation(args.accumulation)
        rows = claim_rows(prompts, settings)
        free = read_free_running(args.free_running) if args.free_running else None
        log.write_staged(args.output_dir, earlier, lambda stage: render(stage, prompts, infos, settings, rows, free))
    except log.LogError as error:
        log.fail_cli(PROG, error)
    except OSError as error:  # the output directory cannot be made or written
        log.fail_cli(PROG, f"{error.filename or args.output_dir}: {error.strerror or error}")
    print(os.path.join(args.output_dir, "claims.md"))
    return 0


if __name__ == "__main__":
    sys.exit(log.run_unwinding_on_signals(main))
