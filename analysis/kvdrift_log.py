"""Reading kvdrift run logs (docs/hdf5-schema.md) for the analysis scripts.

One place that opens and validates a run file, reads its resolved config, lists its finished samples
and reduces the per-sample arrays the figures and the report need, with h5py, numpy and PyYAML (the
project's .venv). A damaged file fails with one LogError naming it, never a traceback. Also the
scripts' command-line rules: one-line errors, durations, SIGTERM and SIGINT unwinding.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import h5py
import yaml
import numpy as np

SUPPORTED_SCHEMA_VERSION = 1
LANES = ("static", "teacher_forced", "one_step", "free_running")
TENSORS = ("key", "value")


class LogError(Exception):
    """A problem with an input file; the message is the whole one-line explanation."""


class FileBusy(LogError):
    """The run file stayed locked by its writer for longer than the caller wanted to wait."""


def fail_cli(prog, error):
    """Prints `prog: error: message` to stderr and exits 1 (the scripts' one error format)."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error in one line, `prog: error: message`, exit 2 (docs/reliability.md):
    without the usage text argparse prints first, over several lines."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


MAX_SECONDS = 86400.0


def seconds(text):
    """The argparse type of a duration option: a number of seconds above 0, at most a day. NaN, inf or a
    huge value would reach time.sleep, a deadline or setrlimit and fail there, or never end."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds above 0 and at most "
                                         f"{MAX_SECONDS:g} (a day)")
    return value


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that its `finally` blocks run on the way out (a plot's
    staging folder removed, HumanEval sandboxes stopped); the process then dies of the signal."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def run_unwinding_on_signals(main, argv=None):
    """main(argv), with SIGTERM and SIGINT unwinding it (its `finally` blocks run) before the process
    dies of the signal, as a caller expects of them; no traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main(argv)
    except (Terminated, KeyboardInterrupt) as stop:
        number = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        raise


# ---------------------------------------------------------------------------------------------
# Config YAML: kvdrift writes /config/yaml with yaml-cpp; PyYAML (the project's virtual environment)
# reads it back. Its YAML 1.1 rules differ from yaml-cpp's 1.2 only on forms kvdrift never writes
# unquoted (yes/no as booleans) or on values the analysis shows as text (exponents without a dot).


def parse_config_yaml(text):
    """The resolved run config as dicts/lists/scalars. Raises ValueError naming the line."""
    try:
        result = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"{where}{getattr(error, 'problem', None) or error}") from None
    return {} if result is None else result


# ---------------------------------------------------------------------------------------------
# Opening and validating a run file.

# HDF5's message when another process holds the file's lock (a writer between flushes). "Already
# open for write" is not among them: that is a file left by a killed writer, which waiting won't fix.
_LOCK_HINTS = ("unable to lock file", "resource temporarily unavailable")


def _is_lock_error(error):
    message = str(error).lower()
    return any(hint in message for hint in _LOCK_HINTS)


# What a damaged file (a flipped byte, what a full disk left) raises while it is read: an HDF5 error,
# a missing object, a datatype, value or shape the reader cannot take, text that is not UTF-8, an
# object of another kind than the reader expects (a dataset where a group belongs).
_DAMAGE = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError)


def _where(error):
    """`TypeError at kvdrift_log.py:164`: the kind of error and the line that raised it, so that a bug
    of the analysis turned into this one line can still be found."""
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return f"{type(error).__name__} at {os.path.basename(frame.tb_frame.f_code.co_filename)}:{frame.tb_lineno}"


@contextlib.contextmanager
def reading(path):
    """Turns what a damaged file raises inside the block into one LogError naming `path` and where it
    was raised."""
    try:
        yield
    except LogError:
        raise
    except _DAMAGE as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise LogError(f"{path}: {detail} ({_where(error)}; a damaged file, or not one kvdrift wrote)") from None


@contextlib.contextmanager
def open_run_file(path, mode="r", wait_seconds=10.0):
    """Opens a kvdrift run log for a `with` block (see _open_run_file); what a damaged file raises
    in the block becomes one LogError naming it."""
    handle = _open_run_file(path, mode, wait_seconds)
    with handle, reading(path):
        yield handle


def _open_run_file(path, mode, wait_seconds):
    """Opens a kvdrift run log, retrying while its writer holds the lock; validates the schema.

    Read-only opens are plain first, then SWMR for a file a SWMR writer has open (or a killed one
    left), which refuses plain opens. Not SWMR first: a SWMR reader retries a metadata read that
    fails its checksum for many minutes, so a damaged closed file would hang instead of failing.
    """
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise LogError(f"{path}: not an HDF5 file")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            if mode == "r":
                try:
                    handle = h5py.File(path, "r")
                except OSError as error:
                    if "already open for write" not in str(error):
                        raise
                    handle = h5py.File(path, "r", swmr=True)
            else:
                handle = h5py.File(path, mode)
            break
        except OSError as error:
            if not _is_lock_error(error):
                raise LogError(f"{path}: cannot open: {error}") from None
            if time.monotonic() >= deadline:
                raise FileBusy(f"{path}: the file is held by another process (a running kvdrift "
                               f"writing it?) and stayed locked for {wait_seconds:g} s") from None
            time.sleep(0.2)
    try:
        with reading(path):
            check_schema(handle, path)
    except LogError:
        handle.close()
        raise
    return handle


def check_schema(handle, path):
    if "schema_version" not in handle.attrs:
        raise LogError(f"{path}: not a kvdrift run log (no schema_version attribute)")
    version = handle.attrs["schema_version"]
    if np.ndim(version) != 0 or not np.issubdtype(np.asarray(version).dtype, np.integer):
        raise LogError(f"{path}: not a kvdrift run log (schema_version is not an integer)")
    if int(version) != SUPPORTED_SCHEMA_VERSION:
        raise LogError(f"{path}: schema_version {int(version)} is not supported (this analysis reads "
                       f"version {SUPPORTED_SCHEMA_VERSION})")


def attr_str(attrs, name, default=""):
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def attr_int(attrs, name, default=0):
    return int(attrs[name]) if name in attrs else default


def read_config(handle, path):
    if "config/yaml" not in handle:
        raise LogError(f"{path}: not a kvdrift run log (no /config/yaml)")
    text = handle["config/yaml"][()]
    text = text.decode() if isinstance(text, bytes) else str(text)
    try:
        config = parse_config_yaml(text)
    except ValueError as error:
        raise LogError(f"{path}: cannot read /config/yaml {error}") from None
    if not isinstance(config, dict):
        raise LogError(f"{path}: /config/yaml is not a mapping")
    return config


METRIC_TABLE = "schema/metrics"
# How post-onset slopes are measured when neither /summary nor the config says (docs/analysis.md).
ONSET_DEFAULTS = {"onset_margin": 16, "min_post_onset_steps": 64}


def read_metric_table(handle, path):
    """The log's metric table (/schema/metrics, written by kvdrift from src/metrics/metric_table.cpp):
    {name: {"axes": tuple, "dtype", "lanes": tuple, "meaning"}}; None in a log written before it."""
    if METRIC_TABLE not in handle:
        return None
    text = handle[METRIC_TABLE][()]
    try:
        entries = json.loads(text.decode() if isinstance(text, bytes) else str(text))
        return {e["name"]: {"axes": tuple(e["axes"]), "dtype": e["dtype"], "lanes": tuple(e["lanes"]),
                            "meaning": e["meaning"]} for e in entries}
    except (ValueError, TypeError, KeyError) as error:
        raise LogError(f"{path}: cannot read /{METRIC_TABLE}: {error}") from None


def finished_samples(handle, path):
    """Indices of finished samples (`complete` = 1), as integers in order, and the unfinished count. A
    sample that cannot be read fails naming it (h5py's items() would hand its group over as None)."""
    if "samples" not in handle:
        return [], 0
    samples = handle["samples"]
    finished, unfinished = [], 0
    for name in samples:
        with reading(sample_where(path, name)):
            if attr_int(samples[name].attrs, "complete") == 1:
                finished.append(int(name))
            else:
                unfinished += 1
    return sorted(finished), unfinished


def sample_where(path, index):
    """`run.h5: /samples/3`: how errors name a sample, for reading()."""
    return f"{path}: /samples/{index}"


class RunInfo:
    """What the scripts need to know about a run besides its arrays."""

    def __init__(self, handle, path):
        self.path = path
        self.config = read_config(handle, path)
        self.complete = attr_int(handle.attrs, "complete") == 1
        self.kvdrift_version = attr_str(handle.attrs, "kvdrift_version", "unknown")
        self.git_revision = attr_str(handle.attrs, "git_revision", "unknown")
        self.samples, self.unfinished = finished_samples(handle, path)
        # How the run decoded, which runs pooled as one sample set must share (docs/hdf5-schema.md, root
        # attributes); a log without them was written with the defaults.
        self.prefill = attr_str(handle.attrs, "prefill", "full")
        self.prefill_chunk = attr_int(handle.attrs, "prefill_chunk")
        self.dtype = attr_str(handle.attrs, "dtype", "float32")
        self.model_path = attr_str(handle["model"].attrs, "path") if "model" in handle else ""
        self.model_format = attr_str(handle["model"].attrs, "format") if "model" in handle else ""
        self.model_sha256 = attr_str(handle["model"].attrs, "sha256") if "model" in handle else ""
        self.quantizers = [q["name"] for q in self.config.get("quantizers") or []]
        self.methods = {q["name"]: q.get("method", "") for q in self.config.get("quantizers") or []}
        self.params = {q["name"]: q.get("params") or {} for q in self.config.get("quantizers") or []}
        self.scores = read_scores(handle)
        self.metrics = read_metric_table(handle, path)
        # /summary is only final once the root `complete` is 1 (written just before that mark).
        self.summary = read_summary(handle) if self.complete else {}

    def metric_axes(self, name, expected):
        """The axes of metric `name` as the log's table defines them, which must be `expected` (the
        layout this analysis reads): a log whose metrics changed fails here, not in a figure."""
        if self.metrics is None:
            raise LogError(f"{self.path}: has no /{METRIC_TABLE} (written by a kvdrift before the metric table): "
                           "resume its run with this kvdrift (`kvdrift run` on the same config) to add it")
        if name not in self.metrics:
            raise LogError(f"{self.path}: its metric table has no '{name}'")
        axes = self.metrics[name]["axes"]
        if axes != tuple(expected):
            raise LogError(f"{self.path}: metric '{name}' has axes [{', '.join(axes)}]; this analysis reads "
                           f"[{', '.join(expected)}]")
        return axes

    def onset_settings(self):
        """{"onset_margin", "min_post_onset_steps"}: each from the /summary/<q> attributes when the run
        has them, else from the config's `analysis:` section, else the defaults 16 and 64."""
        section = self.config.get("analysis") or {}
        settings = {}
        for name, default in ONSET_DEFAULTS.items():
            recorded = [s[""][name] for s in self.summary.values() if name in s.get("", {})]
            settings[name] = int(recorded[0] if recorded else section.get(name, default))
        return settings

    def first_step(self):
        """The first step whose logits can differ from the reference's, as /summary records it (kvdrift
        takes it from the run's prefill: 1 after a full-precision one, 0 after a chunked one). A run not
        yet complete has no /summary; its steps are then counted by that same rule."""
        recorded = {s[""]["first_step"] for s in self.summary.values() if "first_step" in s.get("", {})}
        if len(recorded) > 1:
            raise LogError(f"{self.path}: /summary records first_step {sorted(recorded)} for different quantizers")
        if recorded:
            return int(recorded.pop())
        return 0 if self.prefill == "chunked" else 1

    def lacks_onset(self):
        """The one-line error for a log written without the onset arrays (`onset_step` of every lane)."""
        return LogError(f"{self.path}: written by kvdrift {self.kvdrift_version} (git {self.git_revision}), which "
                        "did not log onset arrays (onset_step); rerun it with this kvdrift to get them: "
                        "`kvdrift run CONFIG --overwrite`")

    @property
    def prefill_mode(self):
        """`full`, or `chunked (prefill_chunk N)`: the chunk size is part of a chunked prefill's protocol."""
        return f"chunked (prefill_chunk {self.prefill_chunk})" if self.prefill == "chunked" else self.prefill

    @property
    def prompts(self):
        return self.config.get("prompts") or {}

    @property
    def max_new_tokens(self):
        return (self.config.get("decoding") or {}).get("max_new_tokens")

    def quantizer_label(self, name):
        """`name (method k=v ...)`: the quantizer's settings as written in the config."""
        params = " ".join(f"{k}={_flow(v)}" for k, v in self.params.get(name, {}).items())
        settings = " ".join(part for part in (self.methods.get(name, ""), params) if part)
        return f"{name} ({settings})" if settings and settings != name else name

    def data_description(self):
        prompts = self.prompts
        source = prompts.get("source", "?")
        if source in ("jsonl", "text_file") and prompts.get("path"):
            parts = str(prompts["path"]).replace("\\", "/").split("/")
            return "/".join(parts[-2:])
        return f"{source} prompts"

    def caption(self):
        model = os.path.basename(self.model_path) or "?"
        fmt = f" ({self.model_format})" if self.model_format else ""
        status = "" if self.complete else ", run not complete"
        return (f"model {model}{fmt} · data {self.data_description()} · "
                f"{len(self.samples)} samples{status} · max {self.max_new_tokens} new tokens")


def read_summary(handle):
    """/summary as {quantizer: {"": its attributes, lane: the lane subgroup's attributes}}, values
    as Python int/float/str."""
    def attrs(group):
        return {k: (attr_str(group.attrs, k) if isinstance(v, (bytes, str)) else v.item())
                for k, v in group.attrs.items() if np.ndim(v) == 0}

    if "summary" not in handle:
        return {}
    return {name: {"": attrs(group), **{lane: attrs(sub) for lane, sub in group.items()
                                         if isinstance(sub, h5py.Group)}}
            for name, group in handle["summary"].items() if isinstance(group, h5py.Group)}


def read_scores(handle):
    """/scores (written by score.py) as {'task', 'interval', 'reference', 'free_running': {quantizer:
    ...}}, each lane's entry a dict of correct, scored, accuracy, accuracy_ci_low, accuracy_ci_high
    (NaN when the scores predate the interval); None when the run is not scored. 'interval' names
    the interval's kind (scores written before it was recorded used a percentile bootstrap)."""
    if "scores" not in handle:
        return None
    group = handle["scores"]

    def lane(g):
        return {"correct": int(g.attrs["correct"]), "scored": int(g.attrs["scored"]),
                **{k: float(g.attrs.get(k, np.nan))
                   for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high")}}

    free_running = {name: lane(g["free_running"]) for name, g in group.items()
                    if isinstance(g, h5py.Group) and "free_running" in g}
    return {"task": attr_str(group.attrs, "task"),
            "interval": attr_str(group.attrs, "interval", "95% percentile bootstrap"),
            "reference": lane(group["reference"]) if "reference" in group else None,
            "free_running": free_running}


def _flow(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def load_run_info(path, wait_seconds=10.0):
    with open_run_file(path, wait_seconds=wait_seconds) as handle:
        return RunInfo(handle, path)


# ---------------------------------------------------------------------------------------------
# Arrays.

def stack_padded(arrays):
    """Rows of unequal length stacked into one float64 matrix, NaN after each row's end."""
    width = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), width), np.nan)
    for row, values in enumerate(arrays):
        out[row, :len(values)] = values
    return out


class MeanAccumulator:
    """Running sum and count over samples of arrays that may differ in their leading length."""

    def __init__(self):
        self.total = None
        self.count = None

    def add(self, values):
        values = np.asarray(values, dtype=np.float64)
        if self.total is None:
            self.total = np.zeros((0,) + values.shape[1:])
            self.count = np.zeros((0,) + values.shape[1:], dtype=np.int64)
        if values.shape[0] > self.total.shape[0]:
            grow = values.shape[0] - self.total.shape[0]
            self.total = np.concatenate([self.total, np.zeros((grow,) + self.total.shape[1:])])
            self.count = np.concatenate([self.count, np.zeros((grow,) + self.count.shape[1:],
                                                              dtype=np.int64)])
        valid = ~np.isnan(values)
        self.total[:values.shape[0]][valid] += values[valid]
        self.count[:values.shape[0]] += valid

    def absorb(self, other):
        """Adds every array `other` has accumulated."""
        if other.total is None:
            return
        if self.total is None:
            self.total, self.count = other.total.copy(), other.count.copy()
            return
        length = max(len(self.total), len(other.total))
        total = np.zeros((length,) + self.total.shape[1:])
        count = np.zeros((length,) + self.count.shape[1:], dtype=np.int64)
        for part in (self, other):
            total[:len(part.total)] += part.total
            count[:len(part.count)] += part.count
        self.total, self.count = total, count

    def mean(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


class LaneAttention:
    """Attention-output relative L2 of one lane: per-sample layer means and a step x layer mean."""

    def __init__(self):
        self.per_sample = []  # (logged steps, mean over layers) per sample
        self.onsets = []      # the lane's onset_step per sample (None: not logged)
        self.heat = MeanAccumulator()  # over samples, of [step x layer] with NaN at unlogged steps

    def add(self, steps, rel_l2, onset=None):
        steps = np.asarray(steps, dtype=np.int64)
        rel_l2 = np.asarray(rel_l2, dtype=np.float64)
        self.per_sample.append((steps, rel_l2.mean(axis=1)))
        self.onsets.append(onset)
        dense = np.full((int(steps.max()) + 1 if len(steps) else 0, rel_l2.shape[1]), np.nan)
        dense[steps] = rel_l2
        self.heat.add(dense)

    def absorb(self, other):
        self.per_sample += other.per_sample
        self.onsets += other.onsets
        self.heat.absorb(other.heat)

    def step_matrix(self):
        """(steps, [samples x steps] layer-mean matrix with NaN where a sample has no value)."""
        return step_matrix(self.per_sample)

    def heatmap(self):
        """(logged steps, [steps x layers] mean over samples, [steps] number of samples)."""
        if self.heat.total is None:
            return np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros(0, np.int64)
        counts = self.heat.count[:, 0]
        steps = np.nonzero(counts)[0]
        return steps, self.heat.mean()[steps], counts[steps]


def step_matrix(per_sample):
    """(the steps any sample has, [samples x steps] matrix with NaN where a sample has no value) of
    (steps, values) pairs, one per sample."""
    steps = np.unique(np.concatenate([s for s, _ in per_sample] or [np.zeros(0, np.int64)]))
    matrix = np.full((len(per_sample), len(steps)), np.nan)
    for row, (sample_steps, values) in enumerate(per_sample):
        matrix[row, np.searchsorted(steps, sample_steps)] = values
    return steps, matrix


def since_onset(steps, values, onset):
    """(steps − onset, values) from the onset on, for a sample whose lane read a quantized position
    (onset >= 0); None for one that never did."""
    if onset is None or onset < 0:
        return None
    steps = np.asarray(steps)
    keep = steps >= onset
    return steps[keep] - onset, np.asarray(values)[keep]


class SeriesData:
    """Everything the figures and the report use of one quantizer of one run."""

    def __init__(self, run, quantizer, label):
        self.run, self.quantizer, self.label = run, quantizer, label
        self.method = run.methods.get(quantizer, "")
        self.samples = []
        self.kl = []             # teacher-forced KL per sample
        self.top1_agree = []     # teacher-forced top-1 agreement per sample
        self.kl_onset = []       # the teacher-forced lane's onset_step per sample (None: not logged)
        self.attention = {lane: LaneAttention() for lane in ("static", "teacher_forced")}
        self.token_scale = {t: {"E_M": MeanAccumulator(), "E_D": MeanAccumulator()} for t in TENSORS}
        self.worst5_share = {t: [] for t in TENSORS}
        self.first_divergence = []
        self.outcome = []
        self.free_running_steps = []  # max(len(lane tokens), len(reference tokens)) per sample

    def absorb(self, other):
        """Adds the samples of `other` (the same quantizer in another run)."""
        self.samples += [(other.run.path, index) for index in other.samples]
        for name in ("kl", "top1_agree", "kl_onset", "first_divergence", "outcome", "free_running_steps"):
            getattr(self, name).extend(getattr(other, name))
        for lane, attention in self.attention.items():
            attention.absorb(other.attention[lane])
        for tensor in TENSORS:
            for part, accumulator in self.token_scale[tensor].items():
                accumulator.absorb(other.token_scale[tensor][part])
            self.worst5_share[tensor] += other.worst5_share[tensor]


class PooledRuns:
    """Stands for the runs whose samples a pooled series holds (`path`: their paths joined by
    " + ", as the CSVs' `run` column shows it)."""

    def __init__(self, runs):
        self.path = " + ".join(run.path for run in runs)
        self.methods = runs[0].methods


def check_distinct(paths):
    """Each run at most once: a file named twice (or once through a link) would count its samples twice."""
    seen = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise LogError(f"{path}: the same file as {seen[real]}; give each run once")
        seen[real] = path


def visit_finished_samples(paths, quantizers, visit, wait_seconds=10.0):
    """Opens each run log, checks that it has every one of `quantizers` and a per-step `kl`, and calls
    visit(info, path, index, sample, first_step, logged_steps) for each finished sample inside
    reading(), so that a damaged sample fails in one line naming it. `first_step` is the first step
    compared (RunInfo.first_step: /summary's); `logged_steps` the sample's logged step numbers (empty
    when every step was logged). Returns the runs' RunInfo, checked to pool."""
    infos = []
    for path in paths:
        with open_run_file(path, wait_seconds=wait_seconds) as handle:
            info = RunInfo(handle, path)
            infos.append(info)
            missing = [q for q in quantizers if q not in info.quantizers]
            if missing:
                raise LogError(f"{path}: no quantizer '{missing[0]}' (available: {', '.join(info.quantizers)})")
            info.metric_axes("kl", ("step",))
            first_step = info.first_step()
            for index in info.samples:
                with reading(sample_where(path, index)):
                    sample = handle[f"samples/{index}"]
                    logged = sample["logged_steps"][()] if "logged_steps" in sample else np.zeros(0, np.int64)
                    visit(info, path, index, sample, first_step, logged)
    check_poolable(infos, quantizers, "pooled runs")
    return infos


def check_poolable(runs, names, what):
    """Runs pooled as one sample set (`what`, as the error names it) must decode one model in one compute
    dtype with one prefill (a chunked prefill quantizes the prompt, a full one does not), and each of
    `names` must mean the same settings in every run that has it."""
    first = runs[0]
    for run in runs[1:]:
        if run.model_sha256 != first.model_sha256:
            raise LogError(f"{what}: {first.path} decodes {os.path.basename(first.model_path) or '?'} (sha256 "
                           f"{first.model_sha256[:12] or '?'}) but {run.path} decodes "
                           f"{os.path.basename(run.model_path) or '?'} (sha256 {run.model_sha256[:12] or '?'}); "
                           "pool only runs of one model")
        if run.dtype != first.dtype:
            raise LogError(f"{what}: {first.path} computes in {first.dtype} but {run.path} in {run.dtype}; "
                           "pool only runs of one dtype")
        if run.prefill_mode != first.prefill_mode:
            raise LogError(f"{what}: {first.path} has prefill {first.prefill_mode} but {run.path} has prefill "
                           f"{run.prefill_mode}; pool only runs of one prefill")
    for name in names:
        having = [run for run in runs if name in run.quantizers]
        label = having[0].quantizer_label(name) if having else ""
        for run in having[1:]:
            if run.quantizer_label(name) != label:
                raise LogError(f"{what}: quantizer '{name}' is {label} in {having[0].path} but "
                               f"{run.quantizer_label(name)} in {run.path}; pool only runs of the same quantizers")


def pool_series(series):
    """One series per quantizer name holding the samples of every run that has it (`--pool`: the
    runs' prompts are independent units), labelled with its sample and run counts. The runs must
    decode one model, and a name must mean the same settings in every run."""
    by_name = {}
    for data in series:
        by_name.setdefault(data.quantizer, []).append(data)
    check_poolable(list(dict.fromkeys(data.run for data in series)), list(by_name), "--pool")
    pooled = []
    for name, group in by_name.items():
        merged = SeriesData(PooledRuns([data.run for data in group]), name, group[0].run.quantizer_label(name))
        for data in group:
            merged.absorb(data)
        merged.label += f" · {len(merged.samples)} samples of {len(group)} run{'s' if len(group) > 1 else ''}"
        pooled.append(merged)
    return pooled


def check_quantizers(runs, wanted):
    """Every name in `wanted` must be a quantizer of at least one run."""
    known = [q for run in runs for q in run.quantizers]
    missing = [q for q in wanted if q not in known]
    if missing:
        where = runs[0].path if len(runs) == 1 else "none of the runs has it"
        available = ", ".join(dict.fromkeys(known)) or "none"
        raise LogError(f"{where}: no quantizer {', '.join(repr(q) for q in missing)} "
                       f"(available: {available})")


def read_runs(paths, quantizers, token_scale_lane, token_scale_kind, wait_seconds=10.0):
    """RunInfo and SeriesData (one per selected quantizer of each run), each file opened once.

    `quantizers` empty selects all. Series are labelled by the quantizer's settings, prefixed by
    the file name when there are several runs.
    """
    check_distinct(paths)
    check_quantizers([load_run_info(p, wait_seconds) for p in paths], quantizers)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    runs, series = [], []
    for path, stem in zip(paths, stems):
        prefix = "" if len(paths) == 1 else (stem if stems.count(stem) == 1 else path) + ": "
        with open_run_file(path, wait_seconds=wait_seconds) as handle:
            run = RunInfo(handle, path)
            for name, axes in metrics_read(token_scale_kind).items():
                run.metric_axes(name, axes)
            run_series = [SeriesData(run, q, prefix + run.quantizer_label(q))
                          for q in run.quantizers if not quantizers or q in quantizers]
            for index in run.samples:
                with reading(sample_where(path, index)):
                    sample = handle[f"samples/{index}"]
                    reference_length = len(sample["reference_tokens"]) if "reference_tokens" in sample else 0
                    logged_steps = sample["logged_steps"][:] if "logged_steps" in sample else np.zeros(0)
                    # the heatmap's rows run to the largest logged step: one past the sample's steps is damage
                    outside = logged_steps[(logged_steps < 0) | (logged_steps >= reference_length)]
                    if len(outside):
                        raise LogError(f"{sample_where(path, index)}/logged_steps holds step {outside[0]}, outside "
                                       f"the sample's steps 0..{reference_length - 1} (a damaged file)")
                    for data in run_series:
                        if data.quantizer in sample:
                            _read_sample(data, sample[data.quantizer], index, reference_length,
                                         logged_steps, token_scale_lane, token_scale_kind)
        runs.append(run)
        series.extend(run_series)
    return runs, series


def metrics_read(token_scale_kind):
    """The metric arrays read_runs reads, with the axes it reads them by."""
    return {"kl": ("step",), "top1_agree": ("step",), "attn_rel_l2": ("logged_step", "layer"),
            **{f"{tensor}/{token_scale_kind}/{part}": ("position", "layer")
               for tensor in TENSORS for part in ("E_M", "E_D")}}


def require(group, name, is_attribute=False):
    """`group`'s dataset or attribute `name`, which every finished sample has: missing, the file is damaged."""
    if name not in (group.attrs if is_attribute else group):
        raise LogError(f"{group.file.filename}: {group.name} has no {'attribute ' if is_attribute else ''}{name} "
                       "(a finished sample always has it: a damaged file)")
    return group.attrs[name] if is_attribute else group[name]


def step_values(lane_group, name):
    """A finished sample's per-step array `name` of a lane as float64: one value per step, at least one
    (step 0 is always decoded). An empty one is damage, refused rather than left out of the figures and
    statistics while the sample still counts."""
    values = require(lane_group, name)[()].astype(np.float64)
    if values.ndim != 1 or not len(values):
        raise LogError(f"{lane_group.file.filename}: {lane_group.name}/{name} has shape {values.shape}, not one "
                       "value per step (a finished sample has at least one step: a damaged file)")
    return values


def onset_step(lane_group):
    """The lane's `onset_step`: the first step whose forward read a quantized position, -1 when none
    did; None in a log written before kvdrift logged it."""
    if "onset_step" not in lane_group.attrs:
        return None
    value = float(lane_group.attrs["onset_step"])
    return int(value) if value >= 0 else -1


def _read_sample(data, group, index, reference_length, logged_steps, ts_lane, ts_kind):
    data.samples.append(index)
    for lane in LANES:
        if lane not in group:
            continue
        lane_group = group[lane]
        if lane in data.attention and "attn_rel_l2" in lane_group:
            rel_l2 = lane_group["attn_rel_l2"][:]
            data.attention[lane].add(logged_steps[:len(rel_l2)], rel_l2, onset_step(lane_group))
        if lane == "teacher_forced":
            data.kl.append(step_values(lane_group, "kl"))
            data.top1_agree.append(step_values(lane_group, "top1_agree"))
            data.kl_onset.append(onset_step(lane_group))
        if lane == "free_running":
            tokens = len(require(lane_group, "tokens"))
            first_divergence = int(require(lane_group, "first_divergence", is_attribute=True))
            # the longest common prefix of the lane's tokens and the reference's, never longer than either
            if not 0 <= first_divergence <= min(tokens, reference_length):
                raise LogError(f"{lane_group.file.filename}: {lane_group.name} has first_divergence "
                               f"{first_divergence}; the common prefix of its {tokens} tokens and the reference's "
                               f"{reference_length} lies in 0..{min(tokens, reference_length)} (a damaged file)")
            data.first_divergence.append(first_divergence)
            data.outcome.append(attr_str(lane_group.attrs, "outcome"))
            data.free_running_steps.append(max(tokens, reference_length))
        if lane == ts_lane:
            for tensor in TENSORS:
                path = f"{tensor}/{ts_kind}"
                if f"{path}/E_M" not in lane_group or f"{path}/E_D" not in lane_group:
                    continue
                for part in ("E_M", "E_D"):
                    data.token_scale[tensor][part].add(
                        lane_group[f"{path}/{part}"][:].astype(np.float64).mean(axis=1))
                share = lane_group[path].attrs.get("worst5_magnitude_share")
                if share is not None:
                    data.worst5_share[tensor].append(float(share))


EVENT_OUTCOMES = ("token_mismatch", "length_only")


def survival_curve(first_divergence, outcome, steps):
    """Kaplan–Meier survival S(t), t = 0..steps-1, of "free-running tokens equal the reference's
    through step t", and the number of samples at risk at each t (arrays of length `steps`).

    Each sample's time is its `first_divergence`. Outcome `token_mismatch` or `length_only` is an
    event at d (steps 0..d-1 matched, step d differed); `identical` and `censored` samples are
    censored there: a sample censored at c is at risk at steps t < c and not at t = c.
    S(t) = prod over event steps d <= t of (1 - events(d) / at_risk(d)); the median is the first
    event step with S <= 0.5 (the engine's `first_divergence_km_median`, +inf if none).
    """
    # A time past the last step counts alike at every step shown (at risk throughout), so the counts
    # stop there: arrays of `steps` + 1 whatever the times.
    times = np.minimum(np.asarray(first_divergence, dtype=np.int64), steps)
    event = np.array([o in EVENT_OUTCOMES for o in outcome], dtype=bool)
    events = np.bincount(times[event], minlength=steps)[:steps]
    # at risk at t: time > t, or an event at t (a sample censored at t is not)
    at_risk = len(times) - np.cumsum(np.bincount(times, minlength=steps))[:steps] + events
    return np.cumprod(1.0 - events / np.maximum(at_risk, 1)), at_risk


def earlier_outputs(out_dir, names, overwrite, what):
    """The files of `names` an earlier `what` (a plot) left in `out_dir`: refused unless `overwrite`, which
    replaces them all."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LogError(f"{out_dir}: not a directory")
    earlier = [name for name in names if os.path.lexists(os.path.join(out_dir, name))]
    for name in earlier:
        if os.path.isdir(os.path.join(out_dir, name)):
            raise LogError(f"{os.path.join(out_dir, name)} is a directory, where the {what} writes a file")
    if earlier and not overwrite:
        raise LogError(f"{os.path.join(out_dir, earlier[0])} exists (an earlier {what}?); pass --overwrite to "
                       f"replace the {what}'s files in {out_dir}")
    return earlier


def write_staged(out_dir, earlier, write):
    """write(stage) into a staging directory inside `out_dir`, then the `earlier` render's files removed
    and the new ones moved in: a failure (or SIGTERM, through run_unwinding_on_signals) leaves `out_dir`
    as it was, and a file not written this time does not stay beside the new ones."""
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".stage-", dir=out_dir)
    try:
        result = write(stage)
        for name in earlier:
            os.remove(os.path.join(out_dir, name))
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if made_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
