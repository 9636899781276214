#!/usr/bin/env python3
"""Task accuracy of a finished kvdrift run, written into the run file under /scores.

    score.py RUN.h5 [--task math|aime|gsm8k|humaneval] [--timeout S] [--jobs N]

Scores the reference continuation of every finished sample and each quantizer's free-running
continuation (docs/analysis.md; the /scores layout is in docs/hdf5-schema.md).
"""
import os
import sys
from datetime import datetime, timezone

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import answers  # noqa: E402
import humaneval  # noqa: E402
import kvdrift_log as log  # noqa: E402

PROG = "score.py"
TASKS = ("math", "aime", "gsm8k", "humaneval")
# A directory name in prompts.path that identifies the task.
TASK_DIRECTORIES = {"math500": "math", "aime24": "aime", "gsm8k": "gsm8k", "humaneval": "humaneval"}
# The two-sided 95% normal quantile of the Wilson score interval.
Z_95 = 1.959963984540054
INTERVAL = "95% Wilson score"


def infer_task(run, given=None):
    """The task named by a directory of prompts.path; `given` (--task) is needed where none or several
    are, and refused where it contradicts the one named (it would score the replies against the
    wrong rules)."""
    path = str(run.prompts.get("path") or "")
    parts = [p.lower() for p in path.replace("\\", "/").split("/")]
    found = {TASK_DIRECTORIES[p] for p in parts if p in TASK_DIRECTORIES}
    if len(found) != 1:
        if given:
            return given
        raise log.LogError(f"{run.path}: cannot tell the task from prompts.path '{path or '(none)'}' "
                           f"(expected a directory named {', '.join(TASK_DIRECTORIES)}); pass --task")
    task = found.pop()
    if given and given != task:
        raise log.LogError(f"{run.path}: --task {given}, but prompts.path '{path}' holds {task} prompts; "
                           "leave --task out")
    return task


class Lane:
    """The texts of one scored lane: sample index -> continuation."""

    def __init__(self, name, quantizer=None):
        self.name, self.quantizer = name, quantizer
        self.samples, self.texts = [], []


def read_lanes(handle, run):
    """Reference lane and one free-running lane per quantizer that has it, plus per-sample info."""
    reference = Lane("reference")
    free_running = {q: Lane("free_running", q) for q in run.quantizers}
    info = {}
    for index in run.samples:
        with log.reading(log.sample_where(run.path, index)):
            sample = handle[f"samples/{index}"]
            if "reference_continuation" not in sample.attrs:
                raise log.LogError(f"{run.path}: run has no continuation texts (samples/{index} has no "
                                   f"reference_continuation); re-run it with a kvdrift newer than "
                                   f"{run.kvdrift_version}")
            info[index] = (log.attr_str(sample.attrs, "prompt_id"), log.attr_str(sample.attrs, "answer"))
            reference.samples.append(index)
            # The reply (up to the first end token) where the log has it: with decoding.stop_at_eos false the
            # continuation goes on past the answer, and numbers written after it would be scored.
            reference.texts.append(log.attr_str(sample.attrs, "reference_reply")
                                   if "reference_reply" in sample.attrs
                                   else log.attr_str(sample.attrs, "reference_continuation"))
            for quantizer, lane in free_running.items():
                path = f"{quantizer}/free_running"
                if path not in sample:
                    continue
                if "continuation" not in sample[path].attrs:
                    raise log.LogError(f"{run.path}: run has no continuation texts (samples/{index}/{path} has "
                                       f"no continuation); re-run it with a kvdrift newer than {run.kvdrift_version}")
                lane.samples.append(index)
                attrs = sample[path].attrs
                lane.texts.append(log.attr_str(attrs, "reply" if "reply" in attrs else "continuation"))
    return [reference] + [lane for lane in free_running.values() if lane.samples], info


def score_answers(task, lanes, info, run):
    """(correct 0/1, extracted answer) per text of each lane, for math, aime and gsm8k."""
    gold = {}
    for index, (_, answer) in info.items():
        if not answer:
            raise log.LogError(f"{run.path}: samples/{index} has no reference answer (set prompts.answer_field)")
        try:
            gold[index] = (answers.gsm8k_reference_answer(answer) if task == "gsm8k"
                           else answers.math_reference_answer(answer))
        except ValueError as error:
            raise log.LogError(f"{run.path}: samples/{index}: {error}") from None
    results = []
    for lane in lanes:
        lane_results = []
        for index, text in zip(lane.samples, lane.texts):
            if task == "gsm8k":
                number = answers.last_number(text)
                lane_results.append((int(number is not None and answers.parse_number(number) == gold[index]),
                                     number or ""))
            else:
                boxed = answers.last_boxed(text)
                lane_results.append((int(answers.math_equal(boxed, gold[index])), boxed or ""))
        results.append(lane_results)
    return results


def score_humaneval(lanes, info, run, timeout, jobs):
    path = str(run.prompts.get("path") or "")
    try:
        records = humaneval.load_records(path)
    except (OSError, ValueError) as error:
        raise log.LogError(f"{run.path}: cannot read the HumanEval tasks of prompts.path: {error}") from None
    programs, where = [], []
    for lane_index, lane in enumerate(lanes):
        for index, text in zip(lane.samples, lane.texts):
            task_id = info[index][0]
            if task_id not in records:
                raise log.LogError(f"{run.path}: samples/{index} has prompt_id '{task_id}', which is not a "
                                   f"task_id of {path}")
            programs.append(humaneval.program(records[task_id], text))
            where.append(lane_index)
    try:
        outcomes = humaneval.run_programs(programs, timeout=timeout, jobs=jobs)
    except humaneval.SandboxUnavailable as error:
        raise log.LogError(f"{run.path}: cannot score HumanEval: {error} (its programs run only in a "
                           "sandbox, never unconfined; docs/analysis.md)") from None
    results = [[] for _ in lanes]
    for lane_index, outcome in zip(where, outcomes):
        detail = outcome.status + (f": {outcome.detail}" if outcome.detail else "")
        results[lane_index].append((int(outcome.passed), detail))
    return results


def accuracy_summary(correct):
    """(correct, scored, accuracy, ci_low, ci_high) of 0/1 flags, with the 95% Wilson score interval;
    NaN when none. Not a bootstrap: on the few prompts of a study and accuracies near 0 or 1, a
    percentile bootstrap gives [0, 0] for 0 of 16, as if no error were possible; Wilson's interval
    for 0 of 16 reaches 0.19."""
    correct = np.asarray(correct, dtype=np.int64)
    if not len(correct):
        return 0, 0, float("nan"), float("nan"), float("nan")
    n, p = len(correct), float(correct.mean())
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 / (1 + z2 / n) * float(np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)))
    # At p = 0 (p = 1) the lower (upper) end is 0 (1) exactly; the formula leaves rounding residue there.
    low = 0.0 if p == 0 else centre - half
    high = 1.0 if p == 1 else centre + half
    return int(correct.sum()), n, p, low, high


def write_scores(path, task, lanes, results):
    """Replaces /scores: built under a temporary name and moved into place once whole (an interrupted
    scoring leaves the earlier /scores)."""
    with log.open_run_file(path, mode="r+") as handle:
        if "scores_incomplete" in handle:
            del handle["scores_incomplete"]
        group = handle.create_group("scores_incomplete")
        group.attrs["task"] = task
        group.attrs["interval"] = INTERVAL
        group.attrs["scored_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for lane, lane_results in zip(lanes, results):
            name = "reference" if lane.quantizer is None else f"{lane.quantizer}/free_running"
            target = group.create_group(name)
            correct = np.array([c for c, _ in lane_results], dtype=np.int64)
            summary = accuracy_summary(correct)
            for key, value in zip(("correct", "scored"), summary[:2]):
                target.attrs[key] = np.int64(value)
            for key, value in zip(("accuracy", "accuracy_ci_low", "accuracy_ci_high"), summary[2:]):
                target.attrs[key] = np.float64(value)
            target.create_dataset("sample", data=np.array(lane.samples, dtype=np.int64))
            target.create_dataset("correct", data=correct)
            target.create_dataset("extracted", data=[d for _, d in lane_results],
                                  dtype=h5py.string_dtype("utf-8"))
        if "scores" in handle:
            del handle["scores"]
        handle.move("scores_incomplete", "scores")


def main(argv=None):
    parser = log.ArgumentParser(
        prog=PROG, description="Scores a finished kvdrift run's reference and free-running continuations "
                               "(MATH500, AIME24, GSM8K, HumanEval) and writes /scores into the run file.")
    parser.add_argument("run", metavar="RUN.h5")
    parser.add_argument("--task", choices=TASKS,
                        help="default: from the directory of prompts.path (math500, aime24, gsm8k, humaneval)")
    parser.add_argument("--timeout", type=log.seconds, default=10.0, metavar="S",
                        help="HumanEval: wall-clock limit per program in seconds (default 10, at most a day)")
    parser.add_argument("--jobs", type=int, default=2, metavar="N",
                        help="HumanEval: programs run at once (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        with log.open_run_file(args.run) as handle:
            run = log.RunInfo(handle, args.run)
            if not run.complete:
                raise log.LogError(f"{args.run}: run is not complete (root attribute complete is not 1); "
                                   "finish or resume it before scoring")
            if not run.samples:
                raise log.LogError(f"{args.run}: no finished samples to score")
            task = infer_task(run, args.task)
            lanes, info = read_lanes(handle, run)
        if task == "humaneval":
            results = score_humaneval(lanes, info, run, args.timeout, args.jobs)
        else:
            results = score_answers(task, lanes, info, run)
        write_scores(args.run, task, lanes, results)
    except log.LogError as error:
        log.fail_cli(PROG, error)
    print(f"task {task}: {args.run}")
    print(f"{'lane':<40} {'correct':>8} {'scored':>7} {'accuracy':>9}  95% CI (Wilson)")
    for lane, lane_results in zip(lanes, results):
        name = "reference" if lane.quantizer is None else f"{lane.quantizer} free-running"
        correct, scored, accuracy, low, high = accuracy_summary([c for c, _ in lane_results])
        print(f"{name:<40} {correct:>8} {scored:>7} {accuracy:>9.3f}  [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    # SIGTERM unwinds through humaneval.run_programs, which stops the sandboxes and removes their folders
    log.run_unwinding_on_signals(main)
