"""Shared set-up of the transformers oracle tests: where the model, the data and the CLI are."""
import gzip
import json
import os
import subprocess
import tempfile

SOURCE_DIR = os.environ.get("KVDRIFT_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
CLI = os.environ.get("KVDRIFT_CLI", os.path.join(SOURCE_DIR, "build", "kvdrift"))
DATA_DIR = os.path.join(SOURCE_DIR, "..", "shared", "data")
TMP_ROOT = os.environ.get("KVDRIFT_TEST_TMP", tempfile.gettempdir())

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the oracle reads local files only
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def smollm2_dir():
    """The converted SmolLM2-135M-Instruct directory, or a test failure saying how to get it."""
    found = subprocess.run(["bash", os.path.join(SOURCE_DIR, "scripts", "find-model.sh"), "smollm2-135m"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise AssertionError(  # a failure, not a skip: every CI run has the model
            "SmolLM2-135M-Instruct not found: run scripts/fetch-model.sh smollm2-135m (" + found.stderr.strip() + ")")
    return found.stdout.strip()


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(args, stdin_text=None):
    result = subprocess.run([CLI, *args], input=stdin_text, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"kvdrift {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def temp_dir(name):
    os.makedirs(TMP_ROOT, exist_ok=True)
    return tempfile.mkdtemp(prefix=name + "-", dir=TMP_ROOT)


def gsm8k_questions(count):
    return [r["question"] for r in read_jsonl(os.path.join(DATA_DIR, "gsm8k", "test.jsonl"))[:count]]


def humaneval_prompts(count):
    return [r["prompt"] for r in read_jsonl(os.path.join(DATA_DIR, "humaneval", "HumanEval.jsonl.gz"))[:count]]
