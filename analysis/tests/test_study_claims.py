"""experiments/error-accumulation/v2/claims.py: on hand-made accumulation and free-running runs, the
claims' numbers are the ones worked out by hand (amplification, gap slope, paired level and slope, the
equal-error comparison, the per-layer worst-5% shares), and so are the noise floor, McNemar's exact test
and the Wilson interval; bad input and an existing output are refused with one line."""
import math
import os
import sys
import unittest

import h5py
import numpy as np

from analysis.tests import support

STUDY_DIR = os.path.join(support.SOURCE_DIR, "experiments", "error-accumulation", "v2")
sys.path.insert(0, STUDY_DIR)
import claims  # noqa: E402

PROMPTS = {"source": "jsonl", "path": "/data/gsm8k/test.jsonl"}
ANALYSIS = "analysis:\n  onset_margin: 2\n  min_post_onset_steps: 4\n"
# Per quantizer: `scale` of its one-step KL, 0.5 + 0.01 t at step t, and `amplification`: its teacher-forced
# KL is that many times its one-step KL at every step, so TF − one-step = (amplification − 1) one-step.
KL_SHAPES = {"kivi-paper": (1.0, 2.0), "kivi-paper-ees": (1.0, 3.0), "kivi-paper-eed": (1.0, 2.0),
             "kvarn": (0.5, 2.0), "kvarn-ees": (0.5, 3.0), "kvarn-eed": (0.5, 2.0)}
# Per sample: steps, and (teacher-forced onset, one-step onset) of every quantizer but kvarn, whose
# teacher-forced onset in sample 0 is 4. Post-onset steps (margin 2, at least 4 of them): sample 0 from
# max(3, 5) + 2 = 7 for the amplification (13 steps), sample 1 from max(1, 0) + 2 = 3 (7 steps); sample 2
# never read a quantized position, sample 3 has 3 steps from 3 + 2 = 5 on: both left out.
SAMPLES = [(20, (3, 5)), (10, (1, 0)), (12, (-1, -1)), (8, (3, 3))]
# Per-layer worst-5% relative shares of the teacher-forced key/quant rows (every other kind: the same).
WORST5 = {"kivi-paper": [0.3, 0.2, 0.1], "kvarn": [0.1, 0.2, 0.0]}
QUANTIZERS = [(name, "kvarn" if name.startswith("kvarn") else "kivi", {}) for name in claims.ACCUMULATION_QUANTIZERS]
REFERENCE_TOKENS = [list(range(100 + i, 100 + i + steps)) for i, (steps, _) in enumerate(SAMPLES)]


def accumulation_lanes(name, steps, onsets, sample):
    scale, amplification = KL_SHAPES[name]
    one_step = scale * (0.5 + 0.01 * np.arange(steps))
    tf_onset = 4 if (name, sample) == ("kvarn", 0) else onsets[0]
    worst5 = {f"{t}/{kind}/worst5_relative_share_per_layer": WORST5.get(name, [0.2] * 3)
              for t in ("key", "value") for kind in ("quant", "drift")}
    pooled = {f"{t}/{kind}": {"worst5_relative_share_pooled": float(np.mean(WORST5.get(name, [0.2])))}
              for t in ("key", "value") for kind in ("quant", "drift")}
    return {(name, "teacher_forced"): {"attrs": {"onset_step": float(tf_onset)},
                                       "data": {"kl": amplification * one_step, **worst5}, "sub_attrs": pooled},
            (name, "one_step"): {"attrs": {"onset_step": float(onsets[1])}, "data": {"kl": one_step}}}


def accumulation_run(path):
    samples = []
    for index, (steps, onsets) in enumerate(SAMPLES):
        lanes = {}
        for name in claims.ACCUMULATION_QUANTIZERS:
            lanes.update(accumulation_lanes(name, steps, onsets, index))
        samples.append({"index": index, "reference_tokens": REFERENCE_TOKENS[index], "lanes": lanes})
    return support.write_run(path, QUANTIZERS, samples, prompts=PROMPTS, config_extra=ANALYSIS)


# Free running on the same four prompts: its references against the accumulation run's are identical
# (sample 0), differ at step 2 (1), stop short of it after 3 equal tokens (2: cut, censored) and are
# identical (3). GSM8K correctness per sample of the reference and the quantizers.
FREE_REFERENCES = [REFERENCE_TOKENS[0], REFERENCE_TOKENS[1][:2] + [7] + REFERENCE_TOKENS[1][3:],
                   REFERENCE_TOKENS[2][:3], REFERENCE_TOKENS[3]]
CORRECT = {"reference": [1, 1, 0, 0], "kivi-paper": [0, 1, 0, 0], "kvarn": [1, 1, 1, 1]}
FIRST_DIVERGENCE = {"kivi-paper": [(2, "token_mismatch"), (1, "token_mismatch"), (3, "identical"),
                                   (4, "token_mismatch")],
                    "kvarn": [(5, "token_mismatch"), (6, "token_mismatch"), (3, "identical"), (8, "identical")]}


def free_running_run(path):
    samples = []
    for index, reference in enumerate(FREE_REFERENCES):
        lanes = {(name, "free_running"): {"attrs": {"first_divergence": np.int64(d), "outcome": outcome},
                                          "data": {"tokens": reference}}
                 for name, (d, outcome) in ((n, FIRST_DIVERGENCE[n][index]) for n in FIRST_DIVERGENCE)}
        samples.append({"index": index, "reference_tokens": reference, "lanes": lanes})
    support.write_run(path, [("kivi-paper", "kivi", {}), ("kvarn", "kvarn", {})], samples, prompts=PROMPTS)
    with h5py.File(path, "a") as f:  # /scores as score.py writes it (docs/hdf5-schema.md)
        f.create_group("scores").attrs.update({"task": "gsm8k", "interval": "95% Wilson score"})
        for lane, flags in CORRECT.items():
            group = f.create_group("scores/reference" if lane == "reference" else f"scores/{lane}/free_running")
            group.attrs.update({"correct": np.int64(sum(flags)), "scored": np.int64(len(flags))})
            group.create_dataset("sample", data=np.arange(len(flags), dtype=np.int64))
            group.create_dataset("correct", data=np.asarray(flags, dtype=np.int64))
    return path


class Claims(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("study_claims")
        cls.accumulation = accumulation_run(os.path.join(cls.dir, "accumulation.h5"))
        cls.free = free_running_run(os.path.join(cls.dir, "free.h5"))
        cls.out = os.path.join(cls.dir, "claims")
        cls.result = support.run_script(os.path.join("..", "experiments", "error-accumulation", "v2", "claims.py"),
                                        "--accumulation", cls.accumulation, "--free-running", cls.free, "-o", cls.out)
        cls.rows = {row["id"]: row for row in support.read_csv(os.path.join(cls.out, "claims.csv"))} \
            if cls.result.returncode == 0 else {}

    def check(self, claim_id, n, effect, per_sample=None):
        row = self.rows[claim_id]
        self.assertEqual(int(row["n"]), n, claim_id)
        self.assertAlmostEqual(float(row["effect"]), effect, places=6, msg=claim_id)
        if per_sample is not None:
            self.assertAlmostEqual(float(row["per_sample_min"]), per_sample[0], places=6, msg=claim_id)
            self.assertAlmostEqual(float(row["per_sample_max"]), per_sample[1], places=6, msg=claim_id)
        return row

    def test_amplification_and_gap_slope(self):
        self.assertEqual((self.result.returncode, self.result.stderr), (0, ""))
        # TF KL = 2 x one-step KL at every step: amplification exactly 2 in both qualifying samples
        row = self.check("b-amplification-kivi-paper", 2, math.log(2), (math.log(2), math.log(2)))
        self.assertIn("amplification ×2 (geometric mean)", row["values"])
        # the gap TF − one-step is the one-step KL itself, 0.5 + 0.01 t: slope 0.01 per step (0.005 for kvarn)
        self.check("b-gap-slope-kivi-paper", 2, 0.01, (0.01, 0.01))
        self.check("b-gap-slope-kvarn", 2, 0.005)
        # two samples: no bootstrap interval, the per-sample values instead; of 4 sign patterns 2 reach the mean
        self.assertEqual((row["interval"], row["ci_low"], float(row["p_value"])), ("per-sample", "", 0.5))

    def test_kvarn_against_kivi_paper_from_the_later_teacher_forced_onset(self):
        # sample 0 from max(3, 4) + 2 = 6 (steps 6..19, mean step 12.5), sample 1 from 1 + 2 = 3 (mean step 6);
        # KIVI's TF KL 2 (0.5 + 0.01 t), KVarN's half of it: differences -(0.5 + 0.01 mean step)
        self.check("c-level", 2, -(0.625 + 0.56) / 2, (-0.625, -0.56))
        self.check("c-slope", 2, -0.01, (-0.01, -0.01))

    def test_equal_error_comparison(self):
        # amplification 3 (ees) against 2 (eed) over the same steps; the levels differ by 0.5 + 0.01 t, from
        # 3 + 2 = 5 (mean step 12) in sample 0 and 1 + 2 = 3 (mean step 6) in sample 1: 0.62 and 0.56 (kvarn: half)
        self.check("causal-amplification-kivi-paper", 2, math.log(1.5))
        self.check("causal-level-kivi-paper", 2, (0.62 + 0.56) / 2, (0.56, 0.62))
        self.check("causal-level-kvarn", 2, (0.62 + 0.56) / 2 / 2)

    def test_worst5_per_layer_and_without_the_largest_layer(self):
        # differences per layer -0.2, 0, -0.1 in every one of the 4 samples: mean over layers -0.1, lower in 2 of 3
        # layers, layer 0 the largest contributor, -0.05 without it; p = 2 / 2^4
        row = self.check("a-worst5-key-quant", 4, -0.1, (-0.1, -0.1))
        self.assertAlmostEqual(float(row["p_value"]), 0.125)
        self.assertIn("KVarN lower in 2 of 3 layers", row["detail"])
        self.assertIn("largest contributor layer 0 (mean difference -0.2): without it -0.05 (n=4 < 8", row["detail"])
        self.assertIn("engine's pooled share 0.2 vs 0.1", row["values"])

    def test_holm_over_every_claim_and_verdicts(self):
        self.assertEqual(len(self.rows), 14)
        p = [float(row["p_value"]) for row in self.rows.values()]
        holm = [float(row["p_holm"]) for row in self.rows.values()]
        np.testing.assert_allclose(holm, claims.stats.holm(p))
        self.assertEqual({row["verdict"] for row in self.rows.values()}, {"not shown"})
        self.assertEqual(claims.verdict(-0.1, 0.01, "< 0"), "supported")
        self.assertEqual(claims.verdict(0.1, 0.01, "< 0"), "refuted")
        self.assertEqual(claims.verdict(-0.1, 0.06, "< 0"), "not shown")

    def test_noise_floor_accuracy_and_figures(self):
        first_divergence, outcome = claims.reference_divergence(zip(REFERENCE_TOKENS, FREE_REFERENCES))
        self.assertEqual(first_divergence, [20, 2, 3, 8])
        self.assertEqual(outcome, ["identical", "token_mismatch", "censored", "identical"])
        rows = {row["lane"]: row for row in support.read_csv(os.path.join(self.out, "accuracy.csv"))}
        # kivi-paper: reference right and it wrong once (b = 1), never the other way: p = 1;
        # kvarn: c = 2, b = 0: p = 2 x 1/4
        self.assertEqual((rows["kivi-paper"]["b_reference_only"], rows["kivi-paper"]["c_quantizer_only"]), ("1", "0"))
        self.assertEqual(float(rows["kvarn"]["mcnemar_p"]), 0.5)
        # kivi-paper's GSM8K divergences: events at 2, 1, 4, censored at 3: S(1) = 3/4, S(2) = 1/2: median 2
        self.assertEqual(float(rows["kivi-paper"]["km_median_first_divergence"]), 2)
        with open(os.path.join(self.out, "claims.md")) as f:
            text = f.read()
        self.assertIn("of the 4 prompts in both, 2 have identical references over their whole length, 1 agree until "
                      "the shorter one was cut by its step limit, and 1 differ in a token, at steps [2]", text)
        for name in claims.FIGURE_NAMES:
            with open(os.path.join(self.out, f"{name}.png"), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n", name)

    def test_mcnemar_and_wilson_by_hand(self):
        self.assertAlmostEqual(claims.mcnemar_exact(1, 6), 2 * (1 + 7) / 2 ** 7)  # 0.125
        self.assertAlmostEqual(claims.mcnemar_exact(0, 5), 2 / 32)
        self.assertEqual(claims.mcnemar_exact(3, 3), 1.0)
        self.assertEqual(claims.mcnemar_exact(0, 0), 1.0)
        # Wilson score interval of 7/16 (Newcombe 1998, method 3): 0.2310 to 0.6682
        _, _, accuracy, low, high = claims.score.accuracy_summary([1] * 7 + [0] * 9)
        self.assertEqual(accuracy, 7 / 16)
        self.assertAlmostEqual(low, 0.2310, places=4)
        self.assertAlmostEqual(high, 0.6682, places=4)

    def test_refusals_are_one_line(self):
        script = os.path.join("..", "experiments", "error-accumulation", "v2", "claims.py")
        again = support.run_script(script, "--accumulation", self.accumulation, "-o", self.out)
        self.assertEqual(again.returncode, 1)
        self.assertRegex(again.stderr, r"^claims.py: error: .*claims.md exists \(an earlier claims table\?\); pass --overwrite .*\n$")
        wrong = support.run_script(script, "--accumulation", self.free, "-o", os.path.join(self.dir, "other"))
        self.assertEqual(wrong.returncode, 1)
        self.assertRegex(wrong.stderr, r"^claims.py: error: .*free.h5: no quantizer 'kivi-paper-ees' \(available: "
                                       r"kivi-paper, kvarn\)\n$")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "other")))


if __name__ == "__main__":
    unittest.main()
