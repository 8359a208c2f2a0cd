"""The tests behind every comparison of the report: Welch's t-test, the paired test, the bootstrap interval, the
power of Welch's test (noncentral t, Welch–Satterthwaite degrees of freedom) and the relabelling check of its
false-positive rate (docs/statistics.md)."""
from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq

BOOTSTRAP_SEED = 0          # fixed: the same sweep gives the same confidence interval every time
BOOTSTRAP_SAMPLES = 10_000
ALPHA = 0.05
POWER = 0.80                # the power the minimum detectable difference and the seeds needed are computed for
MAX_SEEDS = 30              # default: a difference that would need more seeds per arm than this is "not shown"
RELABEL_SPLITS = 10_000     # --calibrate: every split of the pooled seeds when there are at most this many, else random
RELABEL_SEED = 0


def welch(a, b) -> tuple[float, float]:
    """Welch's t-test (unequal variances) of a against b: (t, two-sided p)."""
    res = sps.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    return float(res.statistic), float(res.pvalue)


def bootstrap_ci(a, b, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) − mean(b), each group resampled with replacement."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    diffs = (a[rng.integers(0, len(a), (samples, len(a)))].mean(1)
             - b[rng.integers(0, len(b), (samples, len(b)))].mean(1))
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired(by_seed: dict, baseline_by_seed: dict) -> tuple[float, float, int]:
    """Paired t-test over the seeds both groups have (`scipy.stats.ttest_rel`): (t, two-sided p, n pairs)."""
    seeds = sorted(set(by_seed) & set(baseline_by_seed))
    if len(seeds) < 2:
        return math.nan, math.nan, len(seeds)
    a, b = np.array([by_seed[s] for s in seeds], float), np.array([baseline_by_seed[s] for s in seeds], float)
    if np.ptp(a - b) <= 1e-12 * max(1.0, float(np.abs(a - b).max())):
        return math.nan, math.nan, len(seeds)           # every pair differs by the same amount: no test
    res = sps.ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue), len(seeds)


# ------------------------------------------------------------------------------------------------
# power of Welch's test: the noncentral t with Welch–Satterthwaite degrees of freedom
# ------------------------------------------------------------------------------------------------
def welch_se_df(s1: float, n1: int, s2: float, n2: int) -> tuple[float, float]:
    """Standard error of mean(a) − mean(b) and the Welch–Satterthwaite degrees of freedom (Welch 1947;
    Satterthwaite 1946)."""
    v1, v2 = s1 ** 2 / n1, s2 ** 2 / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1)) if v1 + v2 > 0 else math.nan
    return se, df


def t_test_power(noncentrality: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided t-test at level alpha whose statistic is noncentral t(df, noncentrality):
    P(|T| > t_{1−α/2, df})."""
    crit = sps.t.ppf(1 - alpha / 2, df)
    upper = float(sps.nct.sf(crit, df, noncentrality))
    lower = float(sps.nct.cdf(-crit, df, noncentrality))      # scipy returns NaN deep in this tail: it is ~0 there
    return upper + (lower if math.isfinite(lower) else 0.0)


def welch_power(diff: float, s1: float, n1: int, s2: float, n2: int, alpha: float = ALPHA) -> float:
    """Power of Welch's test to detect a true difference `diff` between arms with standard deviations s1, s2 and
    n1, n2 seeds (the spreads taken as known: the usual planning approximation)."""
    se, df = welch_se_df(s1, n1, s2, n2)
    return t_test_power(abs(diff) / se, df, alpha)


def min_detectable_difference(s1: float, n1: int, s2: float, n2: int, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """The smallest |Δ| Welch's test detects with `power` at `alpha` (two-sided): Δ = δ·se, δ the noncentrality
    at which the noncentral t reaches `power`."""
    se, df = welch_se_df(s1, n1, s2, n2)
    if not (se > 0 and math.isfinite(df)):
        return math.nan
    upper = 1.0
    while t_test_power(upper, df, alpha) < power:
        upper *= 2
    return float(brentq(lambda nc: t_test_power(nc, df, alpha) - power, 0.0, upper)) * se


def seeds_needed(diff: float, s1: float, s2: float, alpha: float = ALPHA, power: float = POWER,
                 limit: int = MAX_SEEDS) -> Optional[int]:
    """Seeds per arm (the same in both) with which Welch's test detects a true difference `diff` with `power`,
    given the arms' standard deviations; None when more than `limit` would be needed (or diff = 0)."""
    if not (math.isfinite(diff) and diff != 0 and s1 ** 2 + s2 ** 2 > 0):
        return None
    for n in range(2, limit + 1):
        if welch_power(diff, s1, n, s2, n, alpha) >= power:
            return n
    return None


def relabel_false_positive_rate(a, b, alpha: float = ALPHA, splits: int = RELABEL_SPLITS,
                                seed: int = RELABEL_SEED) -> tuple[float, int, bool]:
    """Fraction of relabellings of the pooled per-seed values a ∪ b into arms of len(a) and len(b) values whose
    Welch p is below alpha: the false-positive rate of the report's verdict when the arms do not differ (an A/A
    sweep). Every split when there are at most `splits` of them, else `splits` random ones (RNG `seed`).
    Returns (rate, splits used, exact)."""
    pooled = np.asarray(list(a) + list(b), float)
    n, k = len(pooled), len(a)
    if k < 2 or n - k < 2:
        return math.nan, 0, True
    exact = math.comb(n, k) <= splits
    if exact:
        first = np.array(list(itertools.combinations(range(n), k)))
    else:
        rng = np.random.default_rng(seed)
        first = np.argsort(rng.random((splits, n)), axis=1)[:, :k]
    mask = np.zeros((len(first), n), bool)
    np.put_along_axis(mask, first, True, axis=1)
    arm_a = pooled[None, :].repeat(len(first), 0)[mask].reshape(len(first), k)
    arm_b = pooled[None, :].repeat(len(first), 0)[~mask].reshape(len(first), n - k)
    p = sps.ttest_ind(arm_a, arm_b, axis=1, equal_var=False).pvalue
    return float(np.mean(p < alpha)), len(first), exact
