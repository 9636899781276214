"""Shared test helpers: paths, running the scripts, and writing run-log fixtures with h5py.

Fixtures follow docs/hdf5-schema.md and are written here, independently of the code under test.
"""
import atexit
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np

SOURCE_DIR = os.environ.get("KVDRIFT_SOURCE_DIR") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANALYSIS_DIR = os.path.join(SOURCE_DIR, "analysis")
PYTHON = sys.executable  # the project's .venv (ctest runs these tests with it)
CLI = os.environ.get("KVDRIFT_CLI") or os.path.join(SOURCE_DIR, "build", "kvdrift")  # ctest sets the built one
SHARED_DATA = os.path.join(os.path.dirname(SOURCE_DIR), "shared", "data")


def scratch_dir(name):
    """A fresh directory for one test: kept under KVDRIFT_TEST_TMP when set (for inspection), else a
    temporary directory removed when the tests exit."""
    base = os.environ.get("KVDRIFT_TEST_TMP")
    if base:
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{name}-", dir=base)
    directory = tempfile.mkdtemp(prefix=f"kvdrift-{name}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def run_script(script, *args, timeout=120, **kwargs):
    """Runs analysis/SCRIPT with this interpreter (the project's .venv); returns the CompletedProcess (text output)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([PYTHON, os.path.join(ANALYSIS_DIR, script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(text):
    return float("nan") if text == "" else float(text)


def flip_in_object_header(data, offset):
    """`data` (a file's bytes) with one byte flipped inside the messages of the version-2 object header
    at `offset` (libver "latest"), where only the header's checksum notices."""
    # "OHDR", version, flags, optional times (16 bytes) and phase change values (4), the first chunk's
    # size (1 << (flags & 3) bytes), then its messages.
    assert data[offset:offset + 4] == b"OHDR", "not a version 2 object header"
    flags = data[offset + 5]
    at = offset + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 3)
    size = int.from_bytes(data[at:at + width], "little")
    damaged = bytearray(data)
    damaged[at + width + size // 2] ^= 0xFF
    return bytes(damaged)


# -------------------------------------------------------------------------------------------------
# Run-log fixtures.

def config_yaml(quantizers, prompts=None, max_new_tokens=8, lanes=("static", "teacher_forced", "free_running"),
                extra=""):
    """Resolved-config text in the block style kvdrift writes. quantizers: (name, method, params);
    `extra`: more top-level YAML (e.g. an `analysis:` section), appended as given."""
    prompts = prompts or {"source": "inline"}
    lines = ["model:", "  path: /models/tiny.bin", "  device: cpu", "prompts:"]
    lines += [f"  {k}: {v}" for k, v in prompts.items()]
    lines += ["decoding:", f"  max_new_tokens: {max_new_tokens}", "  temperature: 0", "quantizers:"]
    for name, method, params in quantizers:
        flow = ", ".join(f"{k}: {v}" for k, v in params.items())
        lines += [f"  - name: {name}", f"    method: {method}", f"    params: {{{flow}}}"]
    lines += [f"lanes: [{', '.join(lanes)}]", "metrics:", "  layer_stride: 1", "output:", "  path: /tmp/run.h5"]
    return "\n".join(lines) + "\n" + extra


def _axes(name):
    if name in ("kl", "top1_agree", "logp_delta", "match", "tokens", "fraction_read_quantized"):
        return "step"
    if name.startswith("attn_"):
        return "logged_step,layer"
    if name == "onset_step_per_layer":
        return "layer"
    return "position,layer"


def metric_table(axes=None):
    """A /schema/metrics table for the fixture logs: the metric names they use, axes as kvdrift logs
    them unless `axes` ({name: list}) says otherwise."""
    names = ["kl", "top1_agree", "logp_delta", "match", "attn_rel_l2", "attn_cos", "fraction_read_quantized",
             "onset_step_per_layer"]
    names += [f"{t}/{kind}/{part}" for t in ("key", "value") for kind in ("quant", "drift")
              for part in ("E_M", "E_D", "E_T", "norm_ratio")]
    return [{"name": n, "axes": (axes or {}).get(n, _axes(n.rsplit("/", 1)[-1]).split(",")), "dtype": "float32",
             "lanes": ["teacher_forced"], "meaning": "fixture"} for n in names]


def write_run(path, quantizers, samples, prompts=None, max_new_tokens=8, complete=True, schema_version=1,
              root_attrs=None, summary=None, libver="earliest", metrics=metric_table(), config_extra=""):
    """Writes a run log (libver "latest": checksummed metadata, as kvdrift writes).

    samples: list of dicts {index, complete (default 1), attrs, reference_tokens, logged_steps,
    lanes: {(quantizer, lane): {"attrs": {...}, "data": {relative dataset path: array},
    "sub_attrs": {relative group path: {...}}}}}.
    summary: {quantizer: {"": attributes of /summary/<quantizer>, lane: attributes of its lane
    subgroup}}, written as given (ints as int64, floats as float64).
    metrics: the /schema/metrics table (metric_table()); None leaves it out, as kvdrift before it did.
    config_extra: more top-level YAML for /config/yaml (config_yaml's `extra`).
    """
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs["schema_version"] = np.int64(schema_version)
        f.attrs["kvdrift_version"] = "0.1.0"
        f.attrs["complete"] = np.int64(1 if complete else 0)
        for key, value in (root_attrs or {}).items():
            f.attrs[key] = value
        f.create_dataset("config/yaml", data=config_yaml(quantizers, prompts, max_new_tokens, extra=config_extra),
                         dtype=text)
        if metrics is not None:
            f.create_dataset("schema/metrics", data=json.dumps(metrics), dtype=text)
        f.create_group("model").attrs.update({"path": "/models/tiny.bin", "format": "llama2c", "sha256": ""})
        for name, _, params in quantizers:
            f.create_group(f"quantizers/{name}").attrs.update({k: str(v) for k, v in params.items()})
        for name, groups in (summary or {}).items():
            for lane, attrs in groups.items():
                f.require_group(f"summary/{name}/{lane}".rstrip("/")).attrs.update(
                    {k: np.int64(v) if isinstance(v, int) else np.float64(v) for k, v in attrs.items()})
        f.create_group("samples")
        for sample in samples:
            group = f.create_group(f"samples/{sample['index']}")
            group.attrs["complete"] = np.int64(sample.get("complete", 1))
            group.attrs["prompt_id"] = f"inline:{sample['index']}"
            for key, value in sample.get("attrs", {}).items():
                group.attrs[key] = value
            for key in ("reference_tokens", "logged_steps"):
                group.create_dataset(key, data=np.asarray(sample.get(key, []), dtype=np.int64))
            for (quantizer, lane), content in sample.get("lanes", {}).items():
                lane_group = group.require_group(f"{quantizer}/{lane}")
                lane_group.attrs.update(content.get("attrs", {}))
                for name, values in content.get("data", {}).items():
                    dtype = np.int64 if name == "tokens" else np.float32
                    data = lane_group.create_dataset(name, data=np.asarray(values, dtype=dtype))
                    data.attrs["axes"] = _axes(name.rsplit("/", 1)[-1])
                for sub, attrs in content.get("sub_attrs", {}).items():
                    lane_group.require_group(sub).attrs.update(attrs)
    return path
