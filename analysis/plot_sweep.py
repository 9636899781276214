#!/usr/bin/env python3
"""A metric against a grid key, one line per method, from a sweep's summary.h5 (docs/analysis.md).

    plot_sweep.py summary.h5 -o OUTDIR [--x KEY] [--metric COLUMN] [--group KEY] [--over KEY]

Rows of points that are not done are skipped (and counted). Rows that differ only in the --over key
(default: the grid key ending in `seed`) are averaged; error bars show their std or min-max.
Writes sweep_<metric>_vs_<x>.{png,pdf,csv}.
"""
import math
import os
import re
import sys
from collections import Counter

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdrift_log as log  # noqa: E402
import plot_drift  # noqa: E402

PROG = "plot_sweep.py"
SUPPORTED_SWEEP_SCHEMA_VERSION = 1
COLUMNS = ["series", "x", "n", "mean", "low", "high"]


class Summary:
    def __init__(self, path):
        if not os.path.exists(path):
            raise log.LogError(f"{path}: no such file")
        if not h5py.is_hdf5(path):
            raise log.LogError(f"{path}: not an HDF5 file")
        with h5py.File(path, "r") as handle, log.reading(path):
            if "sweep_schema_version" not in handle.attrs:
                raise log.LogError(f"{path}: not a kvdrift sweep summary (no sweep_schema_version attribute)")
            version = int(handle.attrs["sweep_schema_version"])
            if version != SUPPORTED_SWEEP_SCHEMA_VERSION:
                raise log.LogError(f"{path}: sweep_schema_version {version} is not supported (this analysis "
                                   f"reads version {SUPPORTED_SWEEP_SCHEMA_VERSION})")
            if "rows" not in handle or "columns" not in handle["rows"].attrs:
                raise log.LogError(f"{path}: not a kvdrift sweep summary (no /rows group with a columns attribute)")
            self.path = path
            self.name = log.attr_str(handle.attrs, "sweep_name")
            self.grid_keys = [k for k in log.attr_str(handle.attrs, "grid_keys").split("\n") if k]
            self.columns = [c for c in log.attr_str(handle["rows"].attrs, "columns").split("\n") if c]
            self.data = {}
            for column in self.columns:
                if column not in handle["rows"]:
                    raise log.LogError(f"{path}: column '{column}' is listed but /rows/{column} is missing")
                values = handle["rows"][column][:]
                if values.dtype.kind in "OS":
                    values = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
                self.data[column] = values
        lengths = {len(v) for v in self.data.values()}
        if len(lengths) > 1:
            raise log.LogError(f"{path}: /rows datasets differ in length ({sorted(lengths)})")

    def is_numeric(self, column):
        return self.data[column].dtype.kind == "f"

    def require(self, column, what):
        if column not in self.data:
            raise log.LogError(f"{self.path}: no column '{column}' for {what} (columns: {', '.join(self.columns)})")


def default_key(keys, suffix):
    return next((k for k in keys if k.endswith(suffix)), None)


def choose_group(summary, done):
    """`method`, unless two quantizers of one point share a method (then `quantizer`)."""
    pairs = Counter((summary.data["point"][i], summary.data["method"][i]) for i in done)
    return "quantizer" if any(n > 1 for n in pairs.values()) else "method"


def _value_text(value):
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def aggregate(summary, args, done):
    """{series label: {x: [metric values]}} with x as a float or category text."""
    others = [k for k in summary.grid_keys if k not in (args.x, args.over)]

    def splits_a_group(key):  # a key that varies only together with the group (a zip) adds nothing
        values = {}
        for i in done:
            values.setdefault(summary.data[args.group][i], set()).add(_value_text(summary.data[key][i]))
        return any(len(v) > 1 for v in values.values())

    varying = [k for k in others if splits_a_group(k)]
    series = {}
    dropped_nan = 0
    for i in done:
        value = float(summary.data[args.metric][i])
        if math.isnan(value):
            dropped_nan += 1
            continue
        label = ", ".join([str(summary.data[args.group][i])]
                          + [f"{k}={_value_text(summary.data[k][i])}" for k in varying])
        x = summary.data[args.x][i]
        x = float(x) if summary.is_numeric(args.x) else str(x)
        series.setdefault(label, {}).setdefault(x, []).append(value)
    return series, dropped_nan


def rows_for(series, errorbar, x_numeric):
    rows = []
    for label, points in series.items():
        xs = sorted(points) if x_numeric else list(points)
        for x in xs:
            values = np.array(points[x])
            mean = float(values.mean())
            if errorbar == "minmax":
                low, high = float(values.min()), float(values.max())
            else:
                spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                low, high = mean - spread, mean + spread
            rows.append({"series": label, "x": x, "n": len(values), "mean": mean, "low": low, "high": high})
    return rows


def draw(rows, summary, args, caption):
    fig, ax = plt.subplots(figsize=(9, 6.2))
    numeric = summary.is_numeric(args.x)
    categories = list(dict.fromkeys(r["x"] for r in rows)) if not numeric else None
    for i, label in enumerate(dict.fromkeys(r["series"] for r in rows)):
        mine = [r for r in rows if r["series"] == label]
        xs = [r["x"] if numeric else categories.index(r["x"]) for r in mine]
        means = np.array([r["mean"] for r in mine])
        errors = np.array([[m - r["low"] for m, r in zip(means, mine)], [r["high"] - m for m, r in zip(means, mine)]])
        style = plot_drift.series_style(i)
        ax.errorbar(xs, means, yerr=errors, label=label, marker="o", markersize=5, capsize=4,
                    linewidth=1.5, **style)
    if not numeric:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=20, ha="right")
    elif all(float(r["x"]).is_integer() for r in rows):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if plot_drift.use_log_scale([r["mean"] for r in rows], args.yscale):
        ax.set_yscale("log")
    ax.set_xlabel(args.x)
    ax.set_ylabel(args.metric)
    ax.grid(True, alpha=0.3)
    spread = {"std": "± std", "minmax": "min–max"}[args.errorbar]
    over = f"mean over {args.over}, bars {spread}" if args.over else "one point per value"
    fig.suptitle(f"{args.metric} vs {args.x} ({over})", fontsize=12)
    plot_drift.finish_figure(fig, caption)
    return fig


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def main(argv=None):
    parser = log.ArgumentParser(prog=PROG, description="A metric vs a grid key per method from a "
                                                        "kvdrift sweep's summary.h5.")
    parser.add_argument("summary", metavar="summary.h5")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    parser.add_argument("--x", metavar="KEY", help="x axis: a grid key (default: the first ending in 'bits')")
    parser.add_argument("--metric", default="teacher_forced.kl_mean", metavar="COLUMN",
                        help="y axis: a summary column (default teacher_forced.kl_mean)")
    parser.add_argument("--group", metavar="KEY", help="one line per value of this column (default method, "
                        "or quantizer when a point has two quantizers of one method)")
    parser.add_argument("--over", metavar="KEY", help="averaged over this grid key, with error bars "
                        "(default: the grid key ending in 'seed', if any)")
    parser.add_argument("--errorbar", choices=("std", "minmax"), default="std",
                        help="error bars: sample standard deviation or min-max (default std)")
    parser.add_argument("--yscale", choices=("auto", "log", "linear"), default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier plot of the same metric and x")
    args = parser.parse_args(argv)
    try:
        summary = Summary(args.summary)
        for column in ("point", "status", "quantizer", "method"):
            summary.require(column, "the sweep summary format")
        status = summary.data["status"]
        done = [i for i in range(len(status)) if status[i] == "done"]
        skipped = Counter(s for s in status if s != "done")
        if skipped:
            detail = ", ".join(f"{s} {n}" for s, n in sorted(skipped.items()))
            print(f"{PROG}: skipped {sum(skipped.values())} row(s) of points not done ({detail})", file=sys.stderr)
        if not done:
            raise log.LogError(f"{args.summary}: no done rows to plot")
        args.x = args.x or default_key(summary.grid_keys, "bits")
        if args.x is None:
            raise log.LogError(f"{args.summary}: no grid key ends in 'bits'; choose the x axis with --x "
                               f"(grid keys: {', '.join(summary.grid_keys) or 'none'})")
        summary.require(args.x, "--x")
        summary.require(args.metric, "--metric")
        if not summary.is_numeric(args.metric):
            raise log.LogError(f"{args.summary}: column '{args.metric}' is not numeric")
        args.over = args.over or default_key([k for k in summary.grid_keys if k != args.x], "seed")
        if args.over:
            summary.require(args.over, "--over")
        args.group = args.group or choose_group(summary, done)
        summary.require(args.group, "--group")
        series, dropped = aggregate(summary, args, done)
        if dropped:
            print(f"{PROG}: skipped {dropped} done row(s) without a value of {args.metric}", file=sys.stderr)
        if not series:
            raise log.LogError(f"{args.summary}: no done row has a value of {args.metric}")
        stem = os.path.join(args.output_dir, f"sweep_{safe_name(args.metric)}_vs_{safe_name(args.x)}")
        earlier = [f"{stem}.{ext}" for ext in ("csv", "png", "pdf") if os.path.lexists(f"{stem}.{ext}")]
        if earlier and not args.overwrite:
            raise log.LogError(f"{earlier[0]} exists (an earlier plot?); pass --overwrite to replace it")
    except log.LogError as error:
        log.fail_cli(PROG, error)
    rows = rows_for(series, args.errorbar, summary.is_numeric(args.x))
    os.makedirs(args.output_dir, exist_ok=True)
    plot_drift.write_csv(stem + ".csv", COLUMNS, rows)
    caption = (f"sweep {summary.name or os.path.basename(os.path.dirname(os.path.abspath(args.summary)))} · "
               f"{len({summary.data['point'][i] for i in done})} done points"
               + (f" · {sum(skipped.values())} rows not done, left out" if skipped else ""))
    fig = draw(rows, summary, args, caption)
    for ext in ("png", "pdf"):
        fig.savefig(f"{stem}.{ext}", dpi=130)
    print(stem + ".png")


if __name__ == "__main__":
    log.run_unwinding_on_signals(main)
