#!/usr/bin/env python3
"""How much of a method's teacher-forced drift its causal wrappers remove (docs/analysis.md).

    causal_effect.py RUN.h5 [RUN2.h5 ...] [--pair BASE:WRAPPED ...] [-o OUT.csv]

For each pair of quantizers run side by side (by default every X with X-ts / X-td, the `wrap:
true_scale` / `wrap: true_direction` versions of X), on the finished samples of every run (pooled:
the prompts are independent units):
  - the within-sample slope of teacher-forced KL against the step (the run log summary's `kl_slope`:
    least squares with each sample's own level removed, steps from the summary's `first_step`),
  - the mean teacher-forced KL,
and the fraction of each the wrapper removes, 1 - wrapped / base, with a 95% percentile bootstrap
interval over samples, the two quantizers resampled together (paired; 1000 resamples, seed 0).
If token scale drives accumulation, true_scale removes most of the slope and true_direction little.
"""
import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdrift_log as log  # noqa: E402

PROG = "causal_effect.py"
RESAMPLES, SEED, LEVEL = 1000, 0, 0.95
WRAPPER_SUFFIXES = {"-ts": "true_scale", "-td": "true_direction"}


def sample_sums(kl, first_step):
    """(n, sum x, sum y, sum xx, sum xy) of one sample's compared steps."""
    y = np.asarray(kl, dtype=np.float64)[first_step:]
    x = np.arange(first_step, first_step + len(y), dtype=np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
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


def read_sums(paths, quantizers, wait_seconds):
    """Per quantizer: one row of sums per finished sample of every run (the same samples for all)."""
    rows = {q: [] for q in quantizers}
    for path in paths:
        with log.open_run_file(path, wait_seconds=wait_seconds) as handle:
            info = log.RunInfo(handle, path)
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
                    rows[q].append(sample_sums(lane["teacher_forced/kl"][()], first_step))
    return {q: np.array(r).reshape(-1, 5) for q, r in rows.items()}


def effect(base, wrapped, statistic):
    """(base value, wrapped value, fraction removed, CI low, CI high), paired bootstrap over samples."""
    samples = len(base)
    ones = np.ones(samples)
    b, w = statistic(base, ones), statistic(wrapped, ones)
    rng = np.random.default_rng(SEED)
    fractions = []
    for _ in range(RESAMPLES):
        weights = np.bincount(rng.integers(0, samples, samples), minlength=samples).astype(np.float64)
        rb, rw = statistic(base, weights), statistic(wrapped, weights)
        if np.isfinite(rb) and np.isfinite(rw) and rb != 0:
            fractions.append(1 - rw / rb)
    low, high = (np.percentile(fractions, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
                 if len(fractions) > RESAMPLES / 2 else (np.nan, np.nan))
    return b, w, (1 - w / b) if b != 0 else np.nan, low, high


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
    args = parser.parse_args(argv)
    try:
        pairs = [tuple(p.split(":", 1)) for p in args.pair] or default_pairs(args.runs, 10.0)
        for pair in pairs:
            if len(pair) != 2 or not all(pair):
                raise log.LogError(f"--pair {':'.join(pair)}: expected BASE:WRAPPED")
        if args.output and os.path.exists(args.output):
            raise log.LogError(f"{args.output} exists; remove it or choose another path")
        sums = read_sums(args.runs, sorted({q for pair in pairs for q in pair}), 10.0)
    except (log.LogError, OSError) as error:
        log.fail_cli(PROG, error)
    rows = []
    for base, wrapped in pairs:
        for name, statistic in (("kl_slope", slope), ("kl_mean", mean)):
            b, w, fraction, low, high = effect(sums[base], sums[wrapped], statistic)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
