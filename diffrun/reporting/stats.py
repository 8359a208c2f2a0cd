"""Per-strategy summaries over seeds and the comparison of each strategy against the baseline.

Only finished jobs enter the statistics; failed/incomplete ones are counted and listed. The
comparison metric is the final FID (lower = better). When no finished run has any FID (eval
disabled or skipped), it is the final unweighted training loss instead — comparable across
weightings only when every run predicts the same target (ε, x0, v, EDM), so otherwise the losses
are reported but not tested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import stats as sps

from diffrun.reporting.collect import RunRecord, Sweep

BOOTSTRAP_SEED = 0          # fixed: the same sweep gives the same confidence interval every time
BOOTSTRAP_SAMPLES = 10_000
ALPHA = 0.05


def mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def std(values) -> float:
    """Sample standard deviation (ddof = 1); NaN for fewer than 2 values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


@dataclass
class StrategySummary:
    strategy: str
    runs: list[RunRecord]                    # finished runs, one per seed
    failed: list[RunRecord]                  # failed / incomplete / duplicate jobs
    target_fid: Optional[float] = None

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def fid_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.has_fid]

    @property
    def final_fids(self) -> list[float]:
        return [r.final_fid for r in self.fid_runs]

    @property
    def best_fids(self) -> list[float]:
        return [r.best_fid for r in self.fid_runs]

    @property
    def final_fid_mean(self) -> float:
        return mean(self.final_fids)

    @property
    def final_fid_std(self) -> float:
        return std(self.final_fids)

    @property
    def best_fid_mean(self) -> float:
        return mean(self.best_fids)

    @property
    def steps_to_target(self) -> list[Optional[int]]:
        """Per seed with FID: step of the first evaluation with FID ≤ target, None if never."""
        return [r.steps_to_fid(self.target_fid) for r in self.fid_runs]

    @property
    def reached(self) -> int:
        return sum(s is not None for s in self.steps_to_target)

    @property
    def steps_to_target_mean(self) -> float:
        """Mean over the seeds that reached the target (NaN if none did)."""
        return mean([s for s in self.steps_to_target if s is not None])

    @property
    def images_per_sec(self) -> float:
        """Mean over seeds of each run's median images/s over its training records."""
        return mean([r.images_per_sec for r in self.runs])

    def final_losses(self, key: str = "loss") -> list[float]:
        return [r.final_train(key) for r in self.runs if math.isfinite(r.final_train(key))]

    def final_by_seed(self, mode: str) -> dict[int, float]:
        """seed → final FID (mode "fid") or final unweighted training loss, for runs that know their seed."""
        runs = self.fid_runs if mode == "fid" else self.runs
        values = {r.seed: (r.final_fid if mode == "fid" else r.final_train("loss")) for r in runs if r.seed is not None}
        return {seed: v for seed, v in values.items() if math.isfinite(v)}

    @property
    def first_error(self) -> str:
        return next((f"{r.name}: {r.error}" for r in self.failed if r.error), "")


@dataclass
class Comparison:
    strategy: str
    baseline: str
    metric: str                              # "final FID" | "final training loss"
    values: list[float]
    baseline_values: list[float]
    t: float = math.nan
    p: float = math.nan
    ci: tuple[float, float] = (math.nan, math.nan)
    note: str = ""                           # why no test ("n/a (need ≥ 2 seeds)", ...)
    paired_n: int = 0                        # seeds both the strategy and the baseline finished
    paired_t: float = math.nan
    paired_p: float = math.nan

    @property
    def diff(self) -> float:
        """mean(strategy) − mean(baseline): negative = lower = better."""
        return mean(self.values) - mean(self.baseline_values)

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p) and self.p < ALPHA

    @property
    def verdict(self) -> str:
        if self.note:
            return self.note
        lower = "lower" if self.diff < 0 else "higher"
        if self.significant:
            return f"{'better' if self.diff < 0 else 'worse'} ({lower} {self.metric}), p < {ALPHA}"
        return f"no significant difference (p ≥ {ALPHA}; mean is {lower})"


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


def compare(strategy: str, values, baseline: str, baseline_values, metric: str,
            by_seed: Optional[dict] = None, baseline_by_seed: Optional[dict] = None) -> Comparison:
    cmp = Comparison(strategy, baseline, metric, list(values), list(baseline_values))
    if by_seed is not None and baseline_by_seed is not None:
        cmp.paired_t, cmp.paired_p, cmp.paired_n = paired(by_seed, baseline_by_seed)
    if len(cmp.values) < 2 or len(cmp.baseline_values) < 2:
        cmp.note = "n/a (need ≥ 2 seeds)"
        return cmp
    cmp.ci = bootstrap_ci(cmp.values, cmp.baseline_values)
    cmp.t, cmp.p = welch(cmp.values, cmp.baseline_values)
    if not math.isfinite(cmp.p):
        cmp.note = "n/a (no spread: every seed gave the same value)"
    return cmp


@dataclass
class Analysis:
    sweep: Sweep
    baseline: str
    target_fid: Optional[float]
    summaries: list[StrategySummary]
    mode: str                                # "fid" | "loss"
    comparisons: list[Comparison] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)  # printed under the comparison

    def summary(self, strategy: str) -> Optional[StrategySummary]:
        return next((s for s in self.summaries if s.strategy == strategy), None)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for s in self.summaries for r in s.failed]


def analyse(sweep: Sweep, baseline: Optional[str] = None, target_fid: Optional[float] = None) -> Analysis:
    baseline = baseline or sweep.baseline or "uniform"
    target = target_fid if target_fid is not None else sweep.target_fid
    summaries = [
        StrategySummary(s, [r for r in sweep.runs if r.strategy == s and r.finished],
                        [r for r in sweep.runs if r.strategy == s and not r.finished], target)
        for s in sweep.strategies
    ]
    finished = [r for r in sweep.runs if r.finished]
    mode = "fid" if any(r.has_fid for r in finished) else "loss"
    analysis = Analysis(sweep, baseline, target, summaries, mode)
    base = analysis.summary(baseline)
    if base is None or base.n == 0:
        have = ", ".join(s.strategy for s in summaries if s.n) or "none"
        analysis.remarks.append(f"No comparison: the baseline '{baseline}' has no finished run in this sweep "
                                f"(strategies with finished runs: {have}). Choose one with --baseline NAME.")
        return analysis

    if mode == "fid":
        for s in summaries:
            if s is base:
                continue
            if not s.fid_runs:
                analysis.comparisons.append(Comparison(s.strategy, baseline, "final FID", [], base.final_fids,
                                                       note="n/a (no FID for this strategy)"))
                continue
            analysis.comparisons.append(compare(s.strategy, s.final_fids, baseline, base.final_fids, "final FID",
                                                s.final_by_seed("fid"), base.final_by_seed("fid")))
        return analysis

    predictions = sorted({str(r.prediction) for r in finished})
    if len(predictions) > 1:
        analysis.remarks.append(
            f"No FID in this sweep, and the runs predict different targets ({', '.join(predictions)}): their "
            f"training losses live in different spaces and are not comparable. Final losses are reported, not tested.")
        return analysis
    analysis.remarks.append(
        "No FID in this sweep (evaluation disabled or skipped): the comparison below uses the final **unweighted "
        f"training loss** (`loss`, the {predictions[0]}-prediction MSE) instead. It is not a sample-quality metric. "
        "The weighted losses of different weightings are not comparable and are not tested; the unweighted loss is "
        "comparable because every run predicts the same target, but strategies that change the *sampling* density "
        "of log-SNR average it over a different mix of noise levels.")
    for s in summaries:
        if s is not base:
            analysis.comparisons.append(compare(s.strategy, s.final_losses("loss"), baseline,
                                                base.final_losses("loss"), "final training loss",
                                                s.final_by_seed("loss"), base.final_by_seed("loss")))
    return analysis
