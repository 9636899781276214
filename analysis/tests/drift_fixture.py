"""The run-log fixture shared by the plot_drift tests: two quantizers, three finished samples of
unequal length and one cut short, with values chosen so that every statistic is easy by hand, and
a /summary with hand-chosen values that the report must carry as they are."""
import numpy as np

INF = float("inf")

QUANTIZERS = [("alpha", "rtn", {"k_bits": 2}), ("beta", "kivi", {"k_bits": 4, "group_size": 8})]
FIGURES = ("drift_curves", "token_scale", "attention_heatmap", "survival")

# Per sample: teacher-forced KL and top-1 agreement, static attention error [logged step x layer],
# teacher-forced key E_M / E_D [position x layer], worst-5% shares, free-running outcome.
ALPHA = [
    {"kl": [0.5, 1, 2, 4], "top1": [1, 0, 1, 0], "logged": [1, 2, 3],
     "static": [[0.5, 1.5], [1, 1], [2, 2]], "tf_attn": [[1, 1], [2, 2], [4, 4]],
     "E_M": [[1, 3], [2, 2], [0, 4]], "E_D": [[1, 1], [0, 0], [2, 2]], "share": 0.5,
     "first_divergence": 2, "outcome": "token_mismatch", "tokens": 4, "bits": 2.0},
    {"kl": [1, 2, 8], "top1": [0, 0, 1], "logged": [1, 2],
     "static": [[1, 3], [0, 2]], "tf_attn": [[2, 2], [2, 2]],
     "E_M": [[4, 4], [1, 1]], "E_D": [[3, 1], [1, 1]], "share": 0.25,
     "first_divergence": 3, "outcome": "identical", "tokens": 3, "bits": 3.0},
    {"kl": [0.25, 4, 4, 2], "top1": [1, 1, 1, 1], "logged": [1, 2, 3],
     "static": [[0.5, 0.5], [4, 2], [1, 1]], "tf_attn": [[1, 3], [1, 3], [1, 3]],
     "E_M": [[0, 0], [1, 1], [3, 1]], "E_D": [[0, 0], [0, 0], [0, 0]], "share": 0.75,
     "first_divergence": 1, "outcome": "length_only", "tokens": 1, "bits": 4.0},
]
BETA_KL = [[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1], [0.125, 1, 0.5, 0.25]]


def lane_content(values, quantizer_offset):
    """Lane groups of one sample: alpha as tabled, beta with simple constant arrays."""
    n_logged = len(values["logged"])
    positions = len(values["E_M"])
    # values are half the keys' numbers, drift twice the quantization error's
    token_scale = {f"{t}/{kind}/{part}": np.asarray(values[part]) * (1 if t == "key" else 0.5)
                   * (1 if kind == "quant" else 2)
                   for t in ("key", "value") for kind in ("quant", "drift") for part in ("E_M", "E_D")}
    shares = {f"{t}/{kind}": {"worst5_magnitude_share": values["share"] if t == "key" else 0.125}
              for t in ("key", "value") for kind in ("quant", "drift")}
    bits = {"bits_per_element": values["bits"], "fraction_quantized": 1.0}
    alpha = {
        ("alpha", "static"): {"attrs": bits, "data": {"attn_rel_l2": values["static"],
                                                       "attn_cos": np.ones((n_logged, 2))}},
        ("alpha", "teacher_forced"): {"attrs": bits, "data": {"kl": values["kl"], "top1_agree": values["top1"],
                                                               "attn_rel_l2": values["tf_attn"], **token_scale},
                                      "sub_attrs": shares},
        ("alpha", "free_running"): {"attrs": dict(bits, first_divergence=values["first_divergence"],
                                                  outcome=values["outcome"]),
                                    "data": {"tokens": np.arange(values["tokens"]),
                                             "match": np.ones(values["tokens"])}},
    }
    beta_kl = BETA_KL[quantizer_offset]
    beta_bits = {"bits_per_element": 5.0, "fraction_quantized": 0.5}
    beta = {
        ("beta", "static"): {"attrs": beta_bits, "data": {"attn_rel_l2": np.full((n_logged, 2), 0.25)}},
        ("beta", "teacher_forced"): {"attrs": beta_bits,
                                     "data": {"kl": beta_kl, "top1_agree": np.ones(len(beta_kl)),
                                              "attn_rel_l2": np.full((n_logged, 2), 0.5),
                                              **{k: np.full((positions, 2), 1.0) for k in token_scale}},
                                     "sub_attrs": shares},
        ("beta", "free_running"): {"attrs": dict(beta_bits, first_divergence=len(beta_kl), outcome="censored"),
                                   "data": {"tokens": np.arange(len(beta_kl))}},
    }
    return {**alpha, **beta}


def fixture_samples():
    samples = []
    for index, values in enumerate(ALPHA):
        samples.append({"index": index, "reference_tokens": np.arange(len(values["kl"])),
                        "logged_steps": values["logged"], "lanes": lane_content(values, index)})
    # Cut short (complete = 0): huge values that must not reach any figure.
    broken = dict(ALPHA[0], kl=[1000.0] * 4, share=0.0, bits=1000.0)
    samples.append({"index": 3, "complete": 0, "reference_tokens": np.arange(4), "logged_steps": [1, 2, 3],
                    "lanes": lane_content(broken, 0)})
    return samples


def _attrs(**values):
    """Summary attributes; a (value, low, high) tuple adds `<name>_ci_low` and `<name>_ci_high`."""
    out = {}
    for name, value in values.items():
        if isinstance(value, tuple):
            value, out[f"{name}_ci_low"], out[f"{name}_ci_high"] = value
        out[name] = value
    return out


def _worst5(key, value):
    return _attrs(key_quant_worst5_magnitude_share_mean=key[:3],
                  key_quant_worst5_magnitude_share_mean_of_ratios_mean=key[3],
                  value_quant_worst5_magnitude_share_mean=value[:3],
                  value_quant_worst5_magnitude_share_mean_of_ratios_mean=value[3])


# /summary/<q> as the engine writes it when the run finishes. Not recomputed from the samples above
# (only bits, the Kaplan–Meier median and its counts agree with them); the mean of ratios differs from
# the ratio of sums so that the table shows which one it takes.
SUMMARY = {
    "alpha": {
        "": _attrs(samples=3, bits_per_element_mean=3.0, key_quant_E_T_mean=1.5, value_quant_E_T_mean=0.375,
                   first_step=1, bootstrap_resamples=1000, bootstrap_seed=7, bootstrap_level=0.95,
                   attn_gap_mean=(0.75, 0.5, 1.25), attn_gap_slope=(0.125, -0.0625, 0.25)),
        "teacher_forced": _attrs(samples=3, kl_mean=(0.138, 0.112, 0.161), kl_median=0.1, kl_p90=0.3, kl_p99=0.5,
                                 final_kl_mean=(4.5, 2.0, 8.0), top1_disagreement_mean=(0.375, 0.125, 0.625),
                                 logp_delta_mean=-0.05, kl_slope=(0.0125, 0.003, 0.025),
                                 attn_rel_l2_mean=(2.25, 2.0, 2.5), attn_rel_l2_slope=(0.5, 0.25, 0.75),
                                 **_worst5((0.5, 0.25, 0.75, 0.55), (0.125, 0.125, 0.125, 0.15))),
        "static": _attrs(samples=3, attn_rel_l2_mean=(1.5, 1.0, 2.0), attn_rel_l2_slope=(0.375, 0.0, 0.75),
                         **_worst5((0.5, 0.25, 0.75, 0.55), (0.125, 0.125, 0.125, 0.15))),
        # events at 1 (3 at risk) and 2 (2 at risk): S = 2/3, 1/3 -> median 2; sample 1 identical (censored)
        "free_running": _attrs(samples=3, first_divergence_km_median=(2.0, 1.0, INF), first_divergence_at_risk=2,
                               first_divergence_events=2, first_divergence_censored=1, outcome_identical=1,
                               outcome_token_mismatch=1, outcome_length_only=1, outcome_censored=0,
                               identical_fraction=1 / 3),
    },
    "beta": {
        "": _attrs(samples=3, bits_per_element_mean=5.0, key_quant_E_T_mean=1.0, value_quant_E_T_mean=1.0,
                   first_step=1, bootstrap_resamples=1000, bootstrap_seed=7, bootstrap_level=0.95,
                   attn_gap_mean=(0.25, 0.25, 0.25), attn_gap_slope=(0.0, 0.0, 0.0)),
        "teacher_forced": _attrs(samples=3, kl_mean=(0.0625, 0.05, 0.075), kl_median=0.5, kl_p90=1.0, kl_p99=1.0,
                                 final_kl_mean=(0.25, 0.125, 0.5), top1_disagreement_mean=(0.0, 0.0, 0.0),
                                 logp_delta_mean=0.0, kl_slope=(-0.001, -0.002, 0.0005),
                                 attn_rel_l2_mean=(0.5, 0.5, 0.5), attn_rel_l2_slope=(0.0, 0.0, 0.0),
                                 **_worst5((0.5, 0.375, 0.625, 0.25), (0.125, 0.125, 0.125, 0.125))),
        "static": _attrs(samples=3, attn_rel_l2_mean=(0.25, 0.25, 0.25), attn_rel_l2_slope=(0.0, 0.0, 0.0),
                         **_worst5((0.5, 0.375, 0.625, 0.25), (0.125, 0.125, 0.125, 0.125))),
        # every sample censored: survival stays 1, the median is not reached
        "free_running": _attrs(samples=3, first_divergence_km_median=(INF, INF, INF), first_divergence_at_risk=0,
                               first_divergence_events=0, first_divergence_censored=3, outcome_identical=0,
                               outcome_token_mismatch=0, outcome_length_only=0, outcome_censored=3,
                               identical_fraction=0.0),
    },
}


def rows_of(rows, **where):
    return [r for r in rows if all(r[k] == str(v) for k, v in where.items())]


# onset_step per sample (0..3, the last cut short) of each (quantizer, lane) in the onset tests: alpha's
# teacher-forced lane reads a quantized position from step 1, never, from step 2; its static lane from
# step 2, 1, 1; every other lane from step 0.
ONSETS = {("alpha", "teacher_forced"): [1, -1, 2, 1], ("alpha", "static"): [2, 1, 1, 1]}


def with_onsets(samples, onsets=ONSETS):
    """The samples with what kvdrift logs of the onset in every lane group: the attribute `onset_step`
    (float64, -1 = never), `onset_step_per_layer` (two layers, both at the lane's onset) and
    `fraction_read_quantized` (0 before the onset, 1 from it on)."""
    for sample in samples:
        steps = len(sample["reference_tokens"])
        for key, content in sample["lanes"].items():
            onset = onsets.get(key, [0] * 4)[sample["index"]]
            read = (np.arange(steps) >= onset) & (onset >= 0)
            content["attrs"] = dict(content.get("attrs", {}), onset_step=float(onset))
            content["data"] = dict(content["data"], onset_step_per_layer=np.full(2, onset),
                                   fraction_read_quantized=read.astype(np.float32))
    return samples
