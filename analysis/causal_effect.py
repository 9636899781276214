#!/usr/bin/env python3
"""How much of a method's teacher-forced drift its causal wrappers remove (docs/analysis.md).

    causal_effect.py RUN.h5 [RUN2.h5 ...] [--pair BASE:WRAPPED ...] [-o OUT.csv] [--figure STEM]

For each pair of quantizers run side by side (by default every X with X-ts / X-td, the `wrap:
true_scale` / `wrap: true_direction` versions of X), on the finished samples of every run (pooled:
the prompts are independent units):
  - the within-sample slope of teacher-forced KL against the step (the run log summary's `kl_slope`:
    least squares with each sample's own level removed, steps from the summary's `first_step`),
  - the mean teacher-forced KL,
and the fraction of each the wrapper removes, 1 - wrapped / base, with a 95% percentile bootstrap
interval over samples, the two quantizers resampled together (paired; 1000 resamples, seed 0).
If token scale drives accumulation, true_scale removes most of the slope and true_direction little.
Any two methods run side by side compare the same way (`--pair kivi-paper:kvarn`: how much lower
KVarN's drift is); `--figure` draws each pair's KL per step and their paired difference.
"""
import argparse
import csv
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdrift_log as log  # noqa: E402
import plot_drift  # noqa: E402  (sets the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

PROG = "causal_effect.py"
RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
WRAPPER_SUFFIXES = {"-ts": "true_scale", "-td": "true_direction"}


def sample_sums(kl, first_step):
    """(n, sum x, sum y, sum xx, sum xy) of one sample's compared steps."""
    y = np.asarray(kl, dtype=np.float64)[first_step:]
    x = np.arange(first_step, first_step + len(y), dtype=np.float64)
    return np.array([len(y), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])


def slope(sums, weights):
    """Within-sample least-squares slope of the weighted samples (rows of `sums`)."""
    n, sx, sy, sxx, sxy = (sums[:, i] for i in range(5))
    use = (weights > 0) & (n >= 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxy = np.where(use, sxy - sx * sy / np.where(n > 0, n, 1), 0.0)
        cxx = np.where(use, sxx - sx * sx / np.where(n > 0, n, 1), 0.0)
    denominator = (weights * cxx).sum()
    return (weights * cxy).sum() / denominator if denominator > 1e-12 else np.nan


def mean(sums, weights):
    count = (weights * sums[:, 0]).sum()
    return (weights * sums[:, 2]).sum() / count if count > 0 else np.nan


def read_kl(paths, quantizers, wait_seconds):
    """Per quantizer: (teacher-forced KL per step, first compared step) of every finished sample of
    every run, in the same sample order for all; and each run's caption. The runs must pool (one
    model, each name the same settings) and hold at least two finished samples in all; a KL that is
    not finite is a broken run, refused rather than dropped (dropping it would unpair the samples)."""
    rows = {q: [] for q in quantizers}
    captions, infos = [], []
    for path in paths:
        with log.open_run_file(path, wait_seconds=wait_seconds) as handle:
            info = log.RunInfo(handle, path)
            infos.append(info)
            captions.append(info.caption())
            missing = [q for q in quantizers if q not in info.quantizers]
            if missing:
                raise log.LogError(f"{path}: no quantizer '{missing[0]}' (available: {', '.join(info.quantizers)})")
            info.metric_axes("kl", ("step",))
            first_step = 0 if log.attr_str(handle.attrs, "prefill", "full") == "chunked" else 1
            for index in info.samples:
                for q in quantizers:
                    lane = handle[f"samples/{index}/{q}"]
                    if "teacher_forced" not in lane:
                        raise log.LogError(f"{path}: samples/{index}/{q} has no teacher_forced lane")
                    kl = log.require(lane["teacher_forced"], "kl")[()].astype(np.float64)
                    bad = np.flatnonzero(~np.isfinite(kl))
                    if len(bad):
                        raise log.LogError(f"{path}: samples/{index}/{q}/teacher_forced/kl is {kl[bad[0]]} at step "
                                           f"{bad[0]}: a broken run, not a measurement")
                    rows[q].append((kl, first_step))
    log.check_poolable(infos, quantizers, "pooled runs")
    samples = len(rows[quantizers[0]])
    if samples < 2:
        raise log.LogError(f"{', '.join(paths)}: {samples} finished sample{'' if samples == 1 else 's'} in all; "
                           "a paired bootstrap interval needs at least 2")
    return rows, captions


def sums_of(samples):
    return np.array([sample_sums(kl, first_step) for kl, first_step in samples]).reshape(-1, 5)


def resample_weights(samples):
    """[RESAMPLES x samples]: how often each sample is drawn in each bootstrap resample (seed SEED)."""
    rng = np.random.default_rng(SEED)
    return np.stack([np.bincount(rng.integers(0, samples, samples), minlength=samples)
                     for _ in range(RESAMPLES)]).astype(np.float64)


def effect(base, wrapped, statistic):
    """(base value, wrapped value, fraction removed, CI low, CI high), paired bootstrap over samples."""
    samples = len(base)
    ones = np.ones(samples)
    b, w = statistic(base, ones), statistic(wrapped, ones)
    fractions = []
    for weights in resample_weights(samples):
        rb, rw = statistic(base, weights), statistic(wrapped, weights)
        if np.isfinite(rb) and np.isfinite(rw) and rb != 0:
            fractions.append(1 - rw / rb)
    low, high = (np.percentile(fractions, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
                 if len(fractions) > RESAMPLES / 2 else (np.nan, np.nan))
    return b, w, (1 - w / b) if b != 0 else np.nan, low, high


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


def step_means(matrix, weights):
    """Per step, the weighted mean over samples (rows of weights: one resample each)."""
    valid = np.isfinite(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(valid, matrix, 0.0)) / (weights @ valid)


def step_curves(base_kl, other_kl, window):
    """CSV rows of the paired figure: per step, the mean over samples of base, other and other − base
    (each sample's trailing `window`-step mean KL), with 95% percentile bootstrap bands over samples
    resampled together."""
    base = trailing_mean(log.stack_padded([kl for kl, _ in base_kl]), window)
    other = trailing_mean(log.stack_padded([kl for kl, _ in other_kl]), window)
    samples = len(base)
    weights = resample_weights(samples)
    rows = []
    for series, matrix in (("base", base), ("other", other), ("difference", other - base)):
        center = step_means(matrix, np.ones((1, samples)))[0]
        low, high = np.nanpercentile(step_means(matrix, weights), [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2],
                                     axis=0)
        present = np.isfinite(matrix).sum(axis=0)
        rows += [{"series": series, "step": step, "samples": int(present[step]), "center": center[step],
                  "low": low[step], "high": high[step]} for step in range(matrix.shape[1]) if present[step]]
    return rows


def paired_figure(path_stem, pairs, kl, effects, window, caption):
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
        samples = len(kl[base])
        slope, mean_kl = effects[base, other]
        ax_kl.set_title(f"({chr(97 + 2 * row)}) teacher-forced KL, mean over {samples} samples", fontsize=10)
        ax_kl.set_ylabel(f"KL(p_ref ‖ p_lane) [nats], trailing {window}-step mean")
        ax_diff.axhline(0.0, color="gray", linewidth=0.8)
        verdict = f"{other}'s KL slope {_lower(slope)}, mean KL {_lower(mean_kl)} than {base}'s"
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
    plot_drift.write_csv(f"{path_stem}.csv", ["base", "other", "series", "step", "samples", "center", "low", "high"],
                         csv_rows)


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
    with log.open_run_file(paths[0], wait_seconds=wait_seconds) as handle:
        quantizers = log.RunInfo(handle, paths[0]).quantizers
    pairs = [(q[:-len(s)], q) for q in quantizers for s in WRAPPER_SUFFIXES if q.endswith(s)
             and q[:-len(s)] in quantizers]
    if not pairs:
        raise log.LogError(f"{paths[0]}: no quantizer X with a wrapped X-ts or X-td beside it; pass --pair")
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5")
    parser.add_argument("--pair", action="append", default=[], metavar="BASE:WRAPPED",
                        help="quantizer names (repeatable; default: every X with X-ts / X-td)")
    parser.add_argument("-o", "--output", help="also write the table as CSV (must not exist)")
    parser.add_argument("--figure", metavar="STEM",
                        help="also draw each pair's KL per step and paired difference: STEM.png, STEM.pdf, "
                             "STEM.csv (none may exist)")
    parser.add_argument("--window", type=int, default=16,
                        help="the figure's trailing mean over steps, per sample (default 16)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be at least 1, got {args.window}")
    try:
        log.check_distinct(args.runs)
        pairs = [tuple(p.split(":", 1)) for p in args.pair] or default_pairs(args.runs, 10.0)
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(pair):
                raise log.LogError(f"--pair {':'.join(pair)}: expected BASE:WRAPPED")
            if pair[0] == pair[1]:
                raise log.LogError(f"--pair {':'.join(pair)}: a quantizer against itself")
            if pair in pairs[:i]:
                raise log.LogError(f"--pair {':'.join(pair)}: given twice")
        outputs = ([args.output] if args.output else []) + (
            [f"{args.figure}.{ext}" for ext in ("png", "pdf", "csv")] if args.figure else [])
        for i, path in enumerate(outputs):
            if os.path.exists(path):
                raise log.LogError(f"{path} exists; remove it or choose another path")
            if os.path.abspath(path) in map(os.path.abspath, outputs[:i]):
                raise log.LogError(f"{path}: both the table (-o) and the figure's CSV; choose another path")
            if not os.path.isdir(os.path.dirname(path) or "."):
                raise log.LogError(f"{path}: no directory {os.path.dirname(path)}")
        kl, captions = read_kl(args.runs, sorted({q for pair in pairs for q in pair}), 10.0)
    except (log.LogError, OSError) as error:
        log.fail_cli(PROG, error)
    sums = {q: sums_of(samples) for q, samples in kl.items()}
    rows, effects = [], {}
    for base, wrapped in pairs:
        for name, statistic in (("kl_slope", slope), ("kl_mean", mean)):
            b, w, fraction, low, high = effect(sums[base], sums[wrapped], statistic)
            effects.setdefault((base, wrapped), []).append((fraction, low, high))
            rows.append({"base": base, "wrapped": wrapped, "statistic": name, "samples": len(sums[base]),
                         "base_value": b, "wrapped_value": w, "fraction_removed": fraction,
                         "fraction_removed_ci_low": low, "fraction_removed_ci_high": high})
    print(f"{'base':<16} {'wrapped':<18} {'statistic':<9} {'base':>11} {'wrapped':>11} "
          f"{'removed [95% CI]':>26}")
    for r in rows:
        print(f"{r['base']:<16} {r['wrapped']:<18} {r['statistic']:<9} {r['base_value']:>11.4g} "
              f"{r['wrapped_value']:>11.4g} {r['fraction_removed']:>8.2f} "
              f"[{r['fraction_removed_ci_low']:.2f}, {r['fraction_removed_ci_high']:.2f}]")
    if args.output:
        with open(args.output, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.figure:
        samples = len(next(iter(kl.values())))
        paired_figure(args.figure, pairs, kl, effects, args.window, plot_drift.runs_caption(captions, samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
