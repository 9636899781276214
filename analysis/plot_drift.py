#!/usr/bin/env python3
"""Drift figures and a one-page report from kvdrift run logs (docs/analysis.md).

    plot_drift.py RUN.h5 [RUN2.h5 ...] -o OUTDIR [--quantizer NAME ...] [--pool] [--overwrite]
                  [--align step|onset] [--follow [--interval S]]

Writes, per figure, NAME.png, NAME.pdf and NAME.csv (exactly the numbers drawn), plus report.md
and summary_table.csv; an earlier plot's files in OUTDIR are replaced only with --overwrite. The
figures use the finished samples (complete = 1); the report's summary figures come from the
engine's /summary of a finished run (root complete = 1).
"""
import csv
import math
import textwrap
import os
import sys
import time
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvdrift_log as log  # noqa: E402

PROG = "plot_drift.py"
LINESTYLES = ("-", "--", "-.", ":")
# Log axes show at most this many decades below the largest value (colour maps clip beneath).
LOG_DECADES_SHOWN = 4


def series_style(i):
    return {"color": plt.get_cmap("tab10")(i % 10), "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in columns])


def _csv_cell(value):
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def use_log_scale(values, yscale):
    """--yscale: log, linear, or auto = log when the positive values span more than two decades
    (never log without a positive value to show)."""
    positive = np.asarray([v for v in values if v > 0 and np.isfinite(v)])
    if yscale != "auto" or not len(positive):
        return yscale == "log" and len(positive) > 0
    return positive.max() / positive.min() > 100


def log_floor(values):
    """Lower display limit of a log axis: the smallest positive value, but at most
    LOG_DECADES_SHOWN decades below the largest (float32 rounding noise would stretch it)."""
    positive = np.asarray([v for v in values if v > 0 and np.isfinite(v)])
    return max(positive.min(), positive.max() * 10.0 ** -LOG_DECADES_SHOWN)


def quartile_rows(data, lane, metric, steps, matrix):
    """One row per step with a value: median and interquartile range across samples."""
    rows = []
    for column, step in enumerate(steps):
        values = matrix[:, column]
        values = values[~np.isnan(values)]
        if not len(values):
            continue
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        rows.append({"run": data.run.path, "quantizer": data.quantizer, "lane": lane,
                     "metric": metric, "step": int(step), "samples": len(values),
                     "center": median, "low": q25, "high": q75})
    return rows


def windowed_disagreement_rows(data, window, top1_agree):
    """Fraction of (sample, step) pairs in the trailing window [t-window+1, t] where the
    teacher-forced lane's top-1 token differs from the reference's (`top1_agree`: per sample)."""
    disagree = 1.0 - log.stack_padded(top1_agree)
    rows = []
    for step in range(disagree.shape[1]):
        present = ~np.isnan(disagree[:, step])
        if not present.any():
            continue
        block = disagree[:, max(0, step - window + 1):step + 1]
        rows.append({"run": data.run.path, "quantizer": data.quantizer, "lane": "teacher_forced",
                     "metric": "top1_disagreement", "step": step, "samples": int(present.sum()),
                     "center": float(np.nanmean(block)), "low": float("nan"), "high": float("nan")})
    return rows


# --------------------------------------------------------------------------------------------
# Figures. Each returns (figure or None, {csv name: (columns, rows)}, note when not drawn).

DRIFT_COLUMNS = ["run", "quantizer", "lane", "metric", "step", "samples", "center", "low", "high"]
SINCE_ONSET = "steps_since_onset"  # the x column of drift_curves.csv with --align onset


def aligned_arrays(data, align):
    """Per lane, what the drift figure draws of one series: teacher-forced KL and top-1 agreement per
    sample, and per attention lane (steps, layer means) per sample. `align` "onset": each sample's steps
    counted from its lane's onset_step, the samples whose lane never read a quantized position left out."""
    if align != "onset":
        return data.kl, data.top1_agree, {lane: data.attention[lane].per_sample for lane in ("static", "teacher_forced")}
    kept = [i for i, onset in enumerate(data.kl_onset) if onset >= 0]
    attention = {}
    for lane in ("static", "teacher_forced"):
        shifted = [log.since_onset(steps, values, onset)
                   for (steps, values), onset in zip(data.attention[lane].per_sample, data.attention[lane].onsets)]
        attention[lane] = [pair for pair in shifted if pair is not None]
    return ([data.kl[i][data.kl_onset[i]:] for i in kept], [data.top1_agree[i][data.kl_onset[i]:] for i in kept],
            attention)


def check_onsets(series):
    """--align onset needs every drawn lane's onset_step: a run written without it fails with one line."""
    for data in series:
        onsets = data.kl_onset + [o for lane in ("static", "teacher_forced") for o in data.attention[lane].onsets]
        if any(onset is None for onset in onsets):
            raise data.run.lacks_onset()


def drift_rows(data, args):
    """The drift figure's rows of one series, by panel."""
    kl, top1_agree, attention = aligned_arrays(data, args.align)
    rows = {"kl": [], "top1_disagreement": [], "static": [], "teacher_forced": []}
    if kl:
        matrix = log.stack_padded(kl)
        rows["kl"] = quartile_rows(data, "teacher_forced", "kl", np.arange(matrix.shape[1]), matrix)
    if top1_agree:
        rows["top1_disagreement"] = windowed_disagreement_rows(data, args.window, top1_agree)
    for lane in ("static", "teacher_forced"):
        if attention[lane]:
            rows[lane] = quartile_rows(data, lane, "attn_rel_l2", *log.step_matrix(attention[lane]))
    return rows


def drift_curves(series, args):
    rows = {"kl": [], "top1_disagreement": [], "static": [], "teacher_forced": []}
    for data in series:
        for panel, panel_rows in drift_rows(data, args).items():
            rows[panel] += panel_rows
    all_rows = [r for part in rows.values() for r in part]
    if not all_rows:
        return None, {}, "no teacher-forced or static lane metrics in the selected runs"

    aligned = args.align == "onset"
    fig = plt.figure(figsize=(13, 12.0 if aligned else 9.5))
    grid = fig.add_gridspec(3 if aligned else 2, 2, height_ratios=[1, 1, 0.5] if aligned else [1, 1])
    ax_kl, ax_top1, ax_static, ax_tf = (fig.add_subplot(grid[r, c]) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)))
    panels = [
        (ax_kl, rows["kl"], "(a) teacher-forced: KL divergence per step",
         "KL(p_ref ‖ p_lane) [nats]", True),
        (ax_top1, rows["top1_disagreement"],
         f"(b) teacher-forced: top-1 disagreement (trailing {args.window}-step mean)",
         "top-1 disagreement [fraction of tokens]", False),
        (ax_static, rows["static"], "(c) static: attention-output error (mean over layers)",
         "‖a − a_ref‖ / ‖a_ref‖ [relative]", True),
        (ax_tf, rows["teacher_forced"], "(d) teacher-forced: attention-output error (mean over layers)",
         "‖a − a_ref‖ / ‖a_ref‖ [relative]", True),
    ]
    attention_values = [r["center"] for r in rows["static"] + rows["teacher_forced"]]
    for ax, panel_rows, title, ylabel, has_band in panels:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(STEP_LABEL[args.align])
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if not panel_rows:
            ax.text(0.5, 0.5, "not logged in the selected runs", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
            continue
        drawn = []  # (series, its rows in this panel)
        for i, data in enumerate(series):
            mine = [r for r in panel_rows if r["run"] == data.run.path and r["quantizer"] == data.quantizer]
            if not mine:
                continue
            drawn.append((data, mine))
            steps = [r["step"] for r in mine]
            style = series_style(i)
            ax.plot(steps, [r["center"] for r in mine], label=data.label, linewidth=1.4, **style)
            if has_band:
                ax.fill_between(steps, [r["low"] for r in mine], [r["high"] for r in mine],
                                color=style["color"], alpha=0.15, linewidth=0)
        if has_band:
            values = attention_values if ax in (ax_static, ax_tf) else [r["center"] for r in panel_rows]
            if use_log_scale(values, args.yscale):
                bottom = log_floor(values) / 2
                ax.set_yscale("log")
                ax.set_ylim(bottom=bottom)
                hidden = [data.quantizer for data, mine in drawn if all(r["center"] < bottom for r in mine)]
                if hidden:
                    ax.text(0.99, 0.98, f"below {bottom:.0e} throughout (not shown): {', '.join(hidden)}",
                            transform=ax.transAxes, fontsize=8, color="dimgray", ha="right", va="top")
        else:
            ax.set_ylim(-0.02, 1.02)
    if rows["static"] and rows["teacher_forced"]:
        low = min(ax_static.get_ylim()[0], ax_tf.get_ylim()[0])
        high = max(ax_static.get_ylim()[1], ax_tf.get_ylim()[1])
        ax_static.set_ylim(low, high)
        ax_tf.set_ylim(low, high)
    columns = DRIFT_COLUMNS
    if aligned:
        sample_counts(fig.add_subplot(grid[2, :]), series, rows["kl"] or rows["static"])
        for row in all_rows:
            row[SINCE_ONSET] = row.pop("step")
        columns = [SINCE_ONSET if c == "step" else c for c in DRIFT_COLUMNS]
    fig.suptitle("Drift against the full-precision reference: lines = median over samples, "
                 "bands = interquartile range" + ("\naligned at each lane's first read of a quantized position "
                                                  "(x = step − onset_step of that lane and sample)" if aligned else ""),
                 fontsize=12)
    finish_figure(fig, args.caption)
    return fig, {"drift_curves.csv": (columns, all_rows)}, None


STEP_LABEL = {"step": "decoding step [tokens]", "onset": "steps since the lane's first quantized read [tokens]"}


def sample_counts(ax, series, panel_rows):
    """Panel (e) of the aligned drift figure: how many samples each point of `panel_rows` averages."""
    lane = panel_rows[0]["lane"].replace("_", "-") if panel_rows else "teacher-forced"
    metric = "KL" if panel_rows and panel_rows[0]["metric"] == "kl" else "attention error"
    never = []
    for i, data in enumerate(series):
        mine = [r for r in panel_rows if r["run"] == data.run.path and r["quantizer"] == data.quantizer]
        onsets = data.kl_onset if metric == "KL" else data.attention["static"].onsets
        if onsets.count(-1):
            never.append(f"{data.quantizer} {onsets.count(-1)} of {len(onsets)}")
        if mine:
            ax.step([r["step"] for r in mine], [r["samples"] for r in mine], where="mid", linewidth=1.4,
                    **series_style(i))
    ax.set_title(f"(e) samples averaged at each point ({lane} {metric}; samples enter as they reach the step)"
                 + (f"\nnever read a quantized position, left out: {', '.join(never)}" if never else ""), fontsize=10)
    ax.set_xlabel(STEP_LABEL["onset"])
    ax.set_ylabel("samples")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


TOKEN_SCALE_COLUMNS = ["run", "quantizer", "lane", "kind", "tensor", "position", "samples", "E_M", "E_D"]
WORST5_COLUMNS = ["run", "quantizer", "lane", "kind", "tensor", "samples", "worst5_magnitude_share"]


def token_scale(series, args):
    lane, kind = args.token_scale_lane, args.token_scale_kind
    drawn = [d for d in series if any(d.token_scale[t]["E_M"].total is not None for t in log.TENSORS)]
    if not drawn:
        return None, {}, f"no {lane} {kind} token-scale arrays (metrics.token_scale) in the selected runs"
    rows, worst_rows = [], []
    fig, axes = plt.subplots(2, len(drawn), figsize=(max(4.2 * len(drawn), 8), 7.5), squeeze=False)
    for col, data in enumerate(drawn):
        for row, tensor in enumerate(log.TENSORS):
            ax = axes[row, col]
            parts = data.token_scale[tensor]
            if parts["E_M"].total is None:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                continue
            e_m, e_d = parts["E_M"].mean(), parts["E_D"].mean()
            counts = parts["E_M"].count
            positions = np.nonzero(counts > 0)[0]
            for p in positions:
                rows.append({"run": data.run.path, "quantizer": data.quantizer, "lane": lane,
                             "kind": kind, "tensor": tensor, "position": int(p),
                             "samples": int(counts[p]), "E_M": e_m[p], "E_D": e_d[p]})
            ax.stackplot(positions, e_m[positions], e_d[positions],
                         labels=["E_M (magnitude)", "E_D (direction)"],
                         colors=["#d95f02", "#7570b3"], alpha=0.85)
            shares = data.worst5_share[tensor]
            if shares:
                share = float(np.mean(shares))
                worst_rows.append({"run": data.run.path, "quantizer": data.quantizer, "lane": lane,
                                   "kind": kind, "tensor": tensor, "samples": len(shares),
                                   "worst5_magnitude_share": share})
                ax.text(0.02, 0.97, f"worst 5% rows: E_M share {share:.2f}", transform=ax.transAxes,
                        va="top", fontsize=9, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
            ax.set_title(panel_title(data.label, f"{tensor}s") if row == 0 else f"{tensor}s", fontsize=9)
            ax.set_xlabel("cache position [tokens]")
            if col == 0:
                symbol = "k" if tensor == "key" else "v"
                ax.set_ylabel(f"{tensor} error per row [‖{symbol}‖² units]")
            ax.grid(True, alpha=0.3)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"Token-scale error of the {lane.replace('_', '-')} lane ({kind}): "
                 "E_T = E_M + E_D stacked, mean over samples and layers", fontsize=12)
    finish_figure(fig, args.caption, legend=(handles, labels))
    return fig, {"token_scale.csv": (TOKEN_SCALE_COLUMNS, rows),
                 "token_scale_worst5.csv": (WORST5_COLUMNS, worst_rows)}, None


HEATMAP_COLUMNS = ["run", "quantizer", "lane", "step", "layer", "samples", "attn_rel_l2_mean"]


def attention_heatmap(series, args):
    lanes = [lane for lane in ("static", "teacher_forced")
             if any(d.attention[lane].per_sample for d in series)]
    drawn = [d for d in series if any(d.attention[lane].per_sample for lane in lanes)]
    if not drawn:
        return None, {}, "no attention-output errors (metrics.attention_error) in the selected runs"
    maps, rows = {}, []
    for data in drawn:
        for lane in lanes:
            steps, means, counts = data.attention[lane].heatmap()
            maps[data.quantizer, data.run.path, lane] = (steps, means)
            for i, step in enumerate(steps):
                for layer in range(means.shape[1]):
                    rows.append({"run": data.run.path, "quantizer": data.quantizer, "lane": lane,
                                 "step": int(step), "layer": layer, "samples": int(counts[i]),
                                 "attn_rel_l2_mean": means[i, layer]})
    values = np.array([r["attn_rel_l2_mean"] for r in rows])
    if use_log_scale(values, args.yscale):
        norm = LogNorm(vmin=log_floor(values), vmax=np.nanmax(values))
    else:
        norm = Normalize(vmin=0.0, vmax=np.nanmax(values))
    fig, axes = plt.subplots(len(lanes), len(drawn), figsize=(max(4.0 * len(drawn), 8), 3.4 * len(lanes) + 1.6),
                             squeeze=False, sharex=True, sharey=True)
    mesh = None
    for col, data in enumerate(drawn):
        for row, lane in enumerate(lanes):
            ax = axes[row, col]
            steps, means = maps.get((data.quantizer, data.run.path, lane), (np.zeros(0), None))
            if not len(steps):
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                continue
            gaps = np.diff(steps)
            x_edges = np.concatenate([steps, [steps[-1] + (gaps[-1] if len(gaps) else 1)]]) - 0.5
            y_edges = np.arange(means.shape[1] + 1) - 0.5
            shown = np.ma.masked_invalid(np.clip(means, norm.vmin, None) if isinstance(norm, LogNorm) else means)
            mesh = ax.pcolormesh(x_edges, y_edges, shown.T, norm=norm, cmap="viridis", shading="flat")
            lane_name = lane.replace("_", "-")
            ax.set_title(panel_title(data.label, lane_name) if row == 0 else lane_name, fontsize=9)
            if row == len(lanes) - 1:
                ax.set_xlabel("decoding step [tokens]")
            if col == 0:
                ax.set_ylabel("layer")
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle("Attention-output error ‖a − a_ref‖/‖a_ref‖ per layer and step (mean over samples)",
                 fontsize=12)
    finish_figure(fig, args.caption)
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.9, pad=0.02)
        bar.set_label("relative L2 error" + (" (log scale)" if isinstance(norm, LogNorm) else ""))
    return fig, {"attention_heatmap.csv": (HEATMAP_COLUMNS, rows)}, None


SURVIVAL_COLUMNS = ["run", "quantizer", "step", "samples", "at_risk", "survival"]


def survival(series, args):
    drawn = [d for d in series if d.first_divergence]
    if not drawn:
        return None, {}, "no free-running lane in the selected runs"
    rows = []
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for i, data in enumerate(series):
        if not data.first_divergence:
            continue
        steps = max(data.free_running_steps)
        curve, at_risk = log.survival_curve(data.first_divergence, data.outcome, steps)
        for step, (value, risk) in enumerate(zip(curve, at_risk)):
            rows.append({"run": data.run.path, "quantizer": data.quantizer, "step": step,
                         "samples": len(data.first_divergence), "at_risk": risk, "survival": value})
        ax.step(np.arange(steps), curve, where="post", label=data.label, linewidth=1.6, **series_style(i))
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("decoding step [tokens]")
    ax.set_ylabel("P(still identical to the reference through step t)")
    ax.grid(True, alpha=0.3)
    fig.suptitle("Free-running lanes: Kaplan–Meier survival of the reference trajectory (identical and "
                 "censored samples\ncensored at their first divergence; the median is where a curve "
                 "first reaches 0.5)", fontsize=11)
    finish_figure(fig, args.caption)
    return fig, {"survival.csv": (SURVIVAL_COLUMNS, rows)}, None


def finish_figure(fig, caption, legend=None):
    """Shared legend under the panels (the axes' labelled artists unless `legend` is given) and
    the caption line at the bottom. The figure grows by their height, so that the panels keep theirs
    however many series the legend lists."""
    if legend is None:
        handles, labels = [], []
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
    else:
        handles, labels = legend
    # as many columns (at most 4) as the longest label fits across the figure: ~0.075 in a character
    longest = max((len(label) for label in labels), default=0)
    columns = max(1, min(4, int(fig.get_figwidth() / (0.075 * longest + 0.7))))
    legend_rows = math.ceil(len(labels) / columns)
    caption = "\n".join(textwrap.wrap(caption, int(13 * fig.get_figwidth())))  # ~13 characters per inch
    caption_in = 0.15 + 0.15 * (caption.count("\n") + 1)
    legend_in = 0.12 + 0.2 * legend_rows if labels else 0.0
    height = fig.get_figheight() + caption_in + legend_in
    fig.set_figheight(height)
    fig.tight_layout(rect=(0, (caption_in + legend_in) / height, 1, 1 - 0.45 / height))
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, caption_in / height))
    fig.text(0.5, 0.08 / height, caption, ha="center", va="bottom", fontsize=8.5, color="#333333")


def panel_title(label, lane=None):
    """Column title: the series label wrapped to the panel width, then the lane."""
    return "\n".join(textwrap.wrap(label, 38) + ([lane] if lane else []))


FIGURES = (
    ("drift_curves", drift_curves, "Drift curves (KL, top-1 disagreement, attention error; static vs teacher-forced)"),
    ("token_scale", token_scale, "Token-scale error vs position (E_M and E_D stacked)"),
    ("attention_heatmap", attention_heatmap, "Attention-output error, layer x step"),
    ("survival", survival, "Free-running survival (Kaplan–Meier)"),
)
# Every file a render may write into the output directory: what --overwrite replaces, and nothing else.
OUTPUT_FILES = (["report.md", "summary_table.csv", "token_scale_worst5.csv"]
                + [f"{name}.{ext}" for name, _, _ in FIGURES for ext in ("png", "pdf", "csv")])


# --------------------------------------------------------------------------------------------
# Report.

# Summary figures as the engine writes them in /summary/<q> (one definition, docs/hdf5-schema.md):
# (column = attribute name, subgroup of /summary/<q> ("" = the group itself), has a 95% interval).
SUMMARY_FIELDS = [
    ("first_step", "", False), ("bits_per_element_mean", "", False),
    ("kl_mean", "teacher_forced", True), ("final_kl_mean", "teacher_forced", True),
    ("kl_slope", "teacher_forced", True), ("top1_disagreement_mean", "teacher_forced", True),
    ("first_divergence_km_median", "free_running", True), ("first_divergence_at_risk", "free_running", False),
    ("first_divergence_censored", "free_running", False), ("outcome_identical", "free_running", False),
    ("key_quant_worst5_magnitude_share_mean", "teacher_forced", True),
    ("attn_gap_mean", "", True), ("attn_gap_slope", "", True),
]
INTERVAL = ("", "_ci_low", "_ci_high")
TABLE_COLUMNS = (["run", "quantizer", "method", "samples"]
                 + [name + end for name, _, ci in SUMMARY_FIELDS for end in (INTERVAL if ci else ("",))]
                 + [f"accuracy_{lane}{end}" for lane in ("free_running", "reference") for end in INTERVAL])
NAN = float("nan")


def table_rows(series):
    """Per series: the finished samples, the run's /summary/<q> figures (NaN until the run is
    complete) and the task accuracy from /scores."""
    rows = []
    for data in series:
        summary = data.run.summary.get(data.quantizer, {})
        row = {"run": data.run.path, "quantizer": data.quantizer, "method": data.method,
               "samples": len(data.samples)}
        for name, group, ci in SUMMARY_FIELDS:
            for end in INTERVAL if ci else ("",):
                row[name + end] = summary.get(group, {}).get(name + end, NAN)
        scores = data.run.scores or {}
        for lane, entry in (("free_running", scores.get("free_running", {}).get(data.quantizer)),
                            ("reference", scores.get("reference"))):
            for end in INTERVAL:
                row[f"accuracy_{lane}{end}"] = entry[f"accuracy{end}"] if entry else NAN
        rows.append(row)
    return rows


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "not reached" if value == math.inf else format(value, spec)


def _interval(value, low, high, spec):
    """`value [low, high]` (the 95% interval), or the value alone where there is none."""
    value, low, high = (_fmt(v, spec) for v in (value, low, high))
    if value == "–" or low == high == "–" or value == low == high == "not reached":
        return value
    return f"{value} [{low}, {high}]"


def _cell(row, name, spec):
    return _interval(*(row[name + end] for end in INTERVAL), spec)


def _summary_note(run):
    """The report line on where a run's summary figures come from."""
    if not run.complete:
        return ("  - run not finished: its summary columns stay empty (–) until kvdrift writes "
                "`/summary` when the run finishes")
    if not run.summary:
        return "  - no `/summary` in the file: its summary columns are empty (–)"
    settings = dict.fromkeys((s[""].get("first_step"), s[""].get("bootstrap_level"),
                              s[""].get("bootstrap_resamples"), s[""].get("bootstrap_seed"))
                             for s in run.summary.values())
    return "\n".join(f"  - summary (`/summary`): means over decode steps from step {first} on; intervals: "
                     f"{_fmt(level, '.0%')} percentile bootstrap over samples ({resamples} resamples, "
                     f"seed {seed})" for first, level, resamples, seed in settings)


def write_report(out_dir, runs, series, produced, skipped, pooled, aligned=False):
    rows = table_rows(series)
    write_csv(os.path.join(out_dir, "summary_table.csv"), TABLE_COLUMNS, rows)
    scored = any(run.scores for run in runs)
    lines = ["# kvdrift drift report", ""]
    for run in runs:
        lines.append(f"- `{run.path}` (kvdrift {run.kvdrift_version}): {run.caption()}")
        if run.unfinished:
            lines.append(f"  - {run.unfinished} sample(s) not finished yet are left out")
        lines.append(_summary_note(run))
        if run.scores:
            reference = run.scores["reference"]
            if reference:
                lines.append(f"  - task `{run.scores['task']}` ({run.scores['interval']} intervals), "
                             f"reference accuracy {_interval(*(reference['accuracy' + e] for e in INTERVAL), '.3f')} "
                             f"({reference['correct']}/{reference['scored']})")
    lines += ["", "| quantizer | bits / element | mean KL [nats] | final-step KL [nats] | KL slope [nats/step] "
              "| top-1 disagreement | first divergence, KM median [step] | at risk / censored / identical "
              "| key worst-5% E_M share | attention gap (TF − static) | attention-gap slope [1/step] |"
              + (" accuracy (free-running) |" if scored else ""),
              "|---|" + "---:|" * (10 + scored)]
    for data, row in zip(series, rows):
        counts = [row[c] for c in ("first_divergence_at_risk", "first_divergence_censored", "outcome_identical")]
        cells = [data.label, _fmt(row["bits_per_element_mean"], ".3f"), _cell(row, "kl_mean", ".3g"),
                 _cell(row, "final_kl_mean", ".3g"), _cell(row, "kl_slope", ".3g"),
                 _cell(row, "top1_disagreement_mean", ".3f"), _cell(row, "first_divergence_km_median", "g"),
                 " / ".join(_fmt(c, "g") for c in counts) if any(_fmt(c, "g") != "–" for c in counts) else "–",
                 _cell(row, "key_quant_worst5_magnitude_share_mean", ".3f"), _cell(row, "attn_gap_mean", ".3g"),
                 _cell(row, "attn_gap_slope", ".3g")]
        if scored:
            scores = (data.run.scores or {}).get("free_running", {}).get(data.quantizer)
            cells.append(f"{_cell(row, 'accuracy_free_running', '.3f')} ({scores['correct']}/{scores['scored']})"
                         if scores else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The summary figures are the engine's `/summary/<quantizer>` of each finished run, not recomputed "
              "here. Means run over the decode steps from the summary's `first_step` on (1 when the prompt "
              "was prefilled in full precision: step 0's logits come from that shared prefill); brackets "
              "are 95% percentile-bootstrap intervals over samples. Bits per element: mean over samples "
              "and lanes. KL: the teacher-forced lane's KL(p_ref ‖ p_lane) pooled over samples and steps; "
              "final-step KL at each sample's last step, mean over samples; KL slope: least-squares slope "
              "against the step within samples (each prompt's own level removed); top-1 disagreement: fraction of teacher-forced steps whose argmax differs "
              "from the reference's. First divergence: Kaplan–Meier median of the free-running lane's "
              "first differing step (the survival figure; samples identical to the end or cut at the step "
              "limit are censored; *not reached*: survival never fell to 0.5), with the samples at risk at "
              "that step, the censored ones and those identical throughout. Key worst-5% E_M share: "
              "teacher-forced key quantization error (`key/quant`) as the ratio of sums ΣE_M / ΣE_T over "
              "the worst 5% of rows by E_T, mean over samples. Attention gap: teacher-forced minus static "
              "attention-output error ‖a − a_ref‖/‖a_ref‖ (mean over layers) per logged step, its mean "
              "and its least-squares slope. Accuracy: `/scores` (score.py), with the interval named in "
              "the run's line above. Numbers: `summary_table.csv`.", "", "## Figures", ""]
    if pooled:
        lines += ["The figures pool each quantizer's samples over every run (`--pool`); the table above is "
                  "per run.", ""]
    if aligned:
        lines += ["The drift curves are aligned at each lane's first read of a quantized position (`--align "
                  "onset`): x = step − onset_step of that lane and sample; samples whose lane never read one are "
                  "left out, and panel (e) counts the samples behind each point.", ""]
    for name, _, title in FIGURES:
        if name in produced:
            lines += [f"### {title}", "", f"![{title}]({name}.png)", "",
                      f"[PDF]({name}.pdf) · numbers: " + ", ".join(f"[{c}]({c})" for c in produced[name]), ""]
    for name, note in skipped.items():
        lines.append(f"- `{name}` not drawn: {note}")
    lines += ["", f"Generated by analysis/plot_drift.py at "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}."]
    with open(os.path.join(out_dir, "report.md"), "w") as out:
        out.write("\n".join(lines) + "\n")


def runs_caption(captions, pooled_samples=None):
    """The caption line of figures drawn over runs with these captions (one per run); when their
    samples are pooled (`pooled_samples` of them in all) over more than one run, it says so."""
    joined = " | ".join(dict.fromkeys(captions))
    if pooled_samples is None or len(captions) < 2:
        return joined
    return f"pooled over {len(captions)} runs ({pooled_samples} samples): {joined}"


def render(args, wait_seconds):
    """Reads the runs and writes every figure, its CSVs and the report. Returns the runs, and whether
    it drew (with --follow, nothing is drawn while a run has no finished sample)."""
    runs, series = log.read_runs(args.runs, args.quantizer, args.token_scale_lane,
                                 args.token_scale_kind, wait_seconds)
    args.caption = runs_caption([run.caption() for run in runs],
                                sum(len(run.samples) for run in runs) if args.pool else None)
    empty = [run.path for run in runs if not run.samples]
    if empty:
        if args.follow and not all(run.complete for run in runs):
            return runs, False  # nothing to draw yet
        raise log.LogError(f"{empty[0]}: no finished samples to plot")
    if args.align == "onset":
        check_onsets(series)
    figure_series = log.pool_series(series) if args.pool else series
    out = args.output_dir
    earlier = log.earlier_outputs(out, OUTPUT_FILES, args.overwrite, "plot")

    def write(stage):
        produced, skipped = {}, {}
        for name, make, _ in FIGURES:
            fig, tables, note = make(figure_series, args)
            if fig is None:
                skipped[name] = note
                continue
            for csv_name, (columns, rows) in tables.items():
                write_csv(os.path.join(stage, csv_name), columns, rows)
            for ext in ("png", "pdf"):
                fig.savefig(os.path.join(stage, f"{name}.{ext}"), dpi=130)
            plt.close(fig)
            produced[name] = list(tables)
        write_report(stage, runs, series, produced, skipped, args.pool, args.align == "onset")

    log.write_staged(out, earlier, write)
    return runs, True


def follow(args):
    """Re-renders every --interval seconds until every run's root `complete` is 1."""
    while True:
        try:
            runs, drawn = render(args, wait_seconds=0.0)
            args.overwrite = args.overwrite or drawn  # later renders replace this one's files
        except log.FileBusy:
            runs = None  # the writer holds the file: try again next round
        if runs is not None:
            done = sum(len(run.samples) for run in runs)
            stamp = datetime.now().strftime("%H:%M:%S")
            print(f"{PROG}: {stamp} " + (f"rendered {done} finished sample(s) into {args.output_dir}" if drawn
                                         else "waiting for every run's first finished sample"),
                  file=sys.stderr, flush=True)
            if all(run.complete for run in runs):
                return
        time.sleep(args.interval)


def parse_args(argv):
    parser = log.ArgumentParser(
        prog=PROG, description="Drift figures (PNG, PDF, CSV) and report.md from kvdrift run logs.")
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="kvdrift run log(s)")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    parser.add_argument("--quantizer", action="append", default=[], metavar="NAME",
                        help="only this quantizer (repeatable; default: all)")
    parser.add_argument("--yscale", choices=("auto", "log", "linear"), default="auto",
                        help="KL, attention-error and heatmap scale; auto = log when values span "
                             "more than two decades (default)")
    parser.add_argument("--window", type=int, default=8,
                        help="trailing window of the top-1 disagreement curve, in steps (default 8)")
    parser.add_argument("--token-scale-lane", choices=log.LANES, default="teacher_forced",
                        help="lane of the token-scale figure (default teacher_forced)")
    parser.add_argument("--token-scale-kind", choices=("quant", "drift"), default="quant",
                        help="quant: what attention reads vs what the lane wrote; drift: the lane's "
                             "cache vs the reference's (default quant)")
    parser.add_argument("--align", choices=("step", "onset"), default="step",
                        help="x axis of the drift curves: the decoding step (default), or steps since each "
                             "lane's first read of a quantized position (onset_step), with a panel of the "
                             "samples each point averages")
    parser.add_argument("--pool", action="store_true",
                        help="figures: one series per quantizer over the samples of every run (a name "
                             "must have the same settings in each); the report table stays per run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier plot in OUTDIR (refused otherwise)")
    parser.add_argument("--follow", action="store_true",
                        help="re-render from a run still being written until it is complete")
    parser.add_argument("--interval", type=log.seconds, default=10.0, metavar="S",
                        help="seconds between renders with --follow (default 10, at most a day)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be at least 1, got {args.window}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.follow:
            follow(args)
        else:
            render(args, wait_seconds=10.0)
            print(os.path.join(args.output_dir, "report.md"))
    except log.LogError as error:
        log.fail_cli(PROG, error)
    except OSError as error:  # the output directory cannot be made or written
        log.fail_cli(PROG, f"{error.filename or args.output_dir}: {error.strerror or error}")


if __name__ == "__main__":
    log.run_unwinding_on_signals(main)
