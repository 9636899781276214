"""Statistics of paired comparisons over samples (docs/analysis.md, "Statistics of paired comparisons").

Pure numpy. The prompts are the independent units: every function resamples, flips or reports whole
samples, never steps of one sample.
  - sign_flip_pvalue: two-sided paired sign-flip permutation test of "mean difference = 0";
  - holm: Holm's step-down adjustment of a family of p-values;
  - resample_weights, step_means, simultaneous_band: bootstrap over samples of a per-step mean, with a
    max-t band that holds over all steps at once and the pointwise percentile band;
  - describe_interval, relative_change: the reporting rules (fewer than 8 samples: per-sample values
    and their range, not a percentile interval; a relative change whose base interval contains 0: a
    difference, not a percentage).
"""
import collections

import numpy as np

MIN_SAMPLES_FOR_INTERVAL = 8


def sign_flip_pvalue(differences, exact_up_to=16, random_patterns=20000, seed=0):
    """Two-sided p-value of "the mean of the paired differences is 0".

    Under the null each sample's difference is as likely to have either sign. p is the share of sign
    patterns whose |mean| is at least the observed |mean| (within a rounding tolerance of 1e-9 times
    the mean |difference|). With n <= exact_up_to samples all 2^n patterns are counted (the observed
    one among them); otherwise `random_patterns` patterns drawn with numpy default_rng(seed), plus the
    observed one: (count + 1) / (random_patterns + 1). NaN without a sample."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_pvalue: the differences must be finite")
    n = len(d)
    if n == 0:
        return np.nan
    tolerance = 1e-9 * np.abs(d).mean()
    observed = abs(d.mean()) - tolerance
    if n <= exact_up_to:
        patterns = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(patterns @ d) / n >= observed))
    patterns = np.random.default_rng(seed).choice([-1.0, 1.0], size=(random_patterns, n))
    count = np.sum(np.abs(patterns @ d) / n >= observed)
    return float((count + 1) / (random_patterns + 1))


def holm(pvalues):
    """Holm step-down adjusted p-values, in the given order: the i-th smallest of m finite p-values
    becomes max over j <= i of min(1, (m - j + 1) p_(j)). NaN stays NaN and is not counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def resample_weights(samples, resamples=1000, seed=0):
    """[resamples x samples]: how often each sample is drawn in each bootstrap resample (numpy
    default_rng(seed), `samples` draws with replacement per resample)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, samples, samples), minlength=samples)
                     for _ in range(resamples)]).astype(np.float64)


def step_means(matrix, weights):
    """Per step (column of `matrix`, NaN = no value), the weighted mean over samples; one row per row
    of `weights`. NaN where no drawn sample has a value."""
    valid = np.isfinite(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(valid, matrix, 0.0)) / (weights @ valid)


Band = collections.namedtuple("Band", "mean low high pointwise_low pointwise_high samples critical")


def simultaneous_band(matrix, resamples=1000, seed=0, level=0.95):
    """Bootstrap bands over samples (rows) for the per-step mean (columns; NaN where a sample has no value).

    The bootstrap resamples whole samples (resample_weights). `pointwise_low/high`: the percentile
    band, each step on its own. `low/high`: the max-t band, mean ± q·sd per step, sd the bootstrap
    standard deviation of that step's mean and q the `level` quantile over resamples of
    max over steps of |resampled mean − mean| / sd, so that it covers every step at once. A step
    with sd = 0 (a constant column, or one sample) has a band of zero width and does not enter the
    maximum. `samples`: samples with a value per step; `critical`: q."""
    matrix = np.asarray(matrix, dtype=np.float64)
    mean = step_means(matrix, np.ones((1, len(matrix))))[0]
    boot = step_means(matrix, resample_weights(len(matrix), resamples, seed))
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        pointwise_low, pointwise_high = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
        sd = np.nanstd(boot, axis=0, ddof=1)
        spread = sd > 1e-12 * np.maximum(np.abs(mean), 1e-300)
        t = np.where(spread, np.abs(boot - mean) / np.where(spread, sd, 1.0), 0.0)
        critical = float(np.quantile(np.nanmax(np.where(np.isfinite(t), t, 0.0), axis=1), level)) \
            if matrix.shape[1] else 0.0
    half = np.where(spread, critical * sd, 0.0)
    return Band(mean, mean - half, mean + half, pointwise_low, pointwise_high,
                np.isfinite(matrix).sum(axis=0), critical)


def _format(value, spec):
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def describe_interval(estimate, low, high, per_sample, spec=".3g"):
    """The estimate with its interval, as reported: `0.138 [0.112, 0.161]`; with fewer than 8 samples
    (len(per_sample)) a percentile interval would rest on a handful of distinct resamples, so the
    per-sample values and their range stand in its place: `0.75 (n=2 < 8: per-sample values
    [0.75, 0.8], range [0.75, 0.8])`."""
    n = len(per_sample)
    if n >= MIN_SAMPLES_FOR_INTERVAL:
        return f"{_format(estimate, spec)} [{_format(low, spec)}, {_format(high, spec)}]"
    values = np.asarray(per_sample, dtype=np.float64)
    finite = values[np.isfinite(values)]
    ends = (finite.min(), finite.max()) if len(finite) else (np.nan, np.nan)
    return (f"{_format(estimate, spec)} (n={n} < {MIN_SAMPLES_FOR_INTERVAL}: per-sample values "
            f"[{', '.join(_format(v, spec) for v in values)}], range [{_format(ends[0], spec)}, "
            f"{_format(ends[1], spec)}])")


def relative_change(base_interval, fraction, difference):
    """How a change against a base is stated: ("fraction", fraction) — a percentage of the base — unless
    the base's interval (low, high) contains 0 or is undefined, where a percentage of a base that may be
    0 (or of either sign) means nothing: then ("difference", difference). `fraction` and `difference`
    are whatever the caller reports (e.g. (value, low, high))."""
    low, high = base_interval
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return "difference", difference
    return "fraction", fraction
