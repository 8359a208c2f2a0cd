"""Per-strategy summaries over seeds and the comparison of each strategy against the baseline.

Only finished jobs enter the statistics; failed/incomplete ones are counted and listed. The
comparison metric is the final FID (lower = better), and with a target FID also the steps to reach
it. When no finished run has any FID (eval disabled or skipped), it is the final unweighted training
loss instead — comparable across weightings only when every run predicts the same target (ε, x0, v,
EDM), so otherwise the losses are reported but not tested.

Every comparison says how sure it is: Welch's t-test makes the verdict, and the power of that same
test (noncentral t, Welch–Satterthwaite degrees of freedom) gives the minimum detectable difference
with the seeds at hand and the seeds per arm the observed difference would need (docs/statistics.md; the tests
themselves: significance.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from diffrun.reporting.collect import RunRecord, Sweep
from diffrun.reporting.significance import (ALPHA, MAX_SEEDS, bootstrap_ci, min_detectable_difference, paired,
                                            relabel_false_positive_rate, seeds_needed, welch)


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

    def steps_by_seed(self) -> dict[int, int]:
        """seed → steps to the target FID, for the seeds that reached it."""
        return {r.seed: step for r, step in zip(self.fid_runs, self.steps_to_target)
                if step is not None and r.seed is not None}

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
    mdd: float = math.nan                    # minimum |Δ| Welch's test detects with POWER at ALPHA, these seeds
    seeds_needed: Optional[int] = None       # seeds per arm to detect the observed Δ with POWER; None: > max_seeds
    max_seeds: int = MAX_SEEDS
    relabel_rate: float = math.nan           # --calibrate: fraction of relabellings with p < ALPHA
    relabel_splits: int = 0
    relabel_exact: bool = True               # every split (True) or RELABEL_SPLITS random ones

    @property
    def diff(self) -> float:
        """mean(strategy) − mean(baseline): negative = lower = better."""
        return mean(self.values) - mean(self.baseline_values)

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p) and self.p < ALPHA

    @property
    def verdict_kind(self) -> str:
        """"shown" (p < ALPHA), "underpowered" (p ≥ ALPHA, and ≤ max_seeds seeds per arm would detect the observed
        Δ with POWER), "not shown" (p ≥ ALPHA, and they would not), or "n/a" (no test: `note` says why)."""
        if self.note:
            return "n/a"
        if self.significant:
            return "shown"
        return "underpowered" if self.seeds_needed is not None else "not shown"

    @property
    def verdict(self) -> str:
        kind = self.verdict_kind
        if kind == "n/a":
            return self.note
        lower = "lower" if self.diff < 0 else "higher"
        if kind == "shown":
            return f"shown: {'better' if self.diff < 0 else 'worse'} ({lower} {self.metric}, p = {self.p:.2g})"
        if kind == "underpowered":
            return f"underpowered (needs ≈ {self.seeds_needed} seeds per arm)"
        if self.diff == 0:
            return "not shown (equal means)"
        return f"not shown (the observed Δ would need > {self.max_seeds} seeds per arm)"


def compare(strategy: str, values, baseline: str, baseline_values, metric: str,
            by_seed: Optional[dict] = None, baseline_by_seed: Optional[dict] = None,
            max_seeds: int = MAX_SEEDS) -> Comparison:
    cmp = Comparison(strategy, baseline, metric, list(values), list(baseline_values), max_seeds=max_seeds)
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
    s1, s2 = std(cmp.values), std(cmp.baseline_values)
    cmp.mdd = min_detectable_difference(s1, len(cmp.values), s2, len(cmp.baseline_values))
    cmp.seeds_needed = seeds_needed(cmp.diff, s1, s2, limit=max_seeds)
    return cmp


@dataclass
class Analysis:
    sweep: Sweep
    baseline: str
    target_fid: Optional[float]
    summaries: list[StrategySummary]
    mode: str                                # "fid" | "loss"
    comparisons: list[Comparison] = field(default_factory=list)        # on the final FID (or loss)
    step_comparisons: list[Comparison] = field(default_factory=list)   # on the steps to the target FID
    max_seeds: int = MAX_SEEDS
    calibrated: bool = False                                            # calibrate() filled relabel_rate
    remarks: list[str] = field(default_factory=list)  # printed under the comparison

    def summary(self, strategy: str) -> Optional[StrategySummary]:
        return next((s for s in self.summaries if s.strategy == strategy), None)

    @property
    def failed(self) -> list[RunRecord]:
        return [r for s in self.summaries for r in s.failed]


def compare_steps(s: StrategySummary, base: StrategySummary, max_seeds: int) -> Comparison:
    """Steps to the target FID over the seeds that reached it; seeds that never did are left out (and counted in
    the results table), so a strategy whose slow seeds never arrive looks faster than it is."""
    metric = f"steps to FID ≤ {s.target_fid:g}"
    mine, theirs = [v for v in s.steps_to_target if v is not None], [v for v in base.steps_to_target if v is not None]
    if len(mine) < 2 or len(theirs) < 2:
        return Comparison(s.strategy, base.strategy, metric, mine, theirs,
                          note="n/a (need ≥ 2 seeds that reach the target in each)")
    return compare(s.strategy, mine, base.strategy, theirs, metric, s.steps_by_seed(), base.steps_by_seed(),
                   max_seeds=max_seeds)


def analyse(sweep: Sweep, baseline: Optional[str] = None, target_fid: Optional[float] = None,
            max_seeds: int = MAX_SEEDS) -> Analysis:
    baseline = baseline or sweep.baseline or "uniform"
    target = target_fid if target_fid is not None else sweep.target_fid
    summaries = [
        StrategySummary(s, [r for r in sweep.runs if r.strategy == s and r.finished],
                        [r for r in sweep.runs if r.strategy == s and not r.finished], target)
        for s in sweep.strategies
    ]
    finished = [r for r in sweep.runs if r.finished]
    mode = "fid" if any(r.has_fid for r in finished) else "loss"
    analysis = Analysis(sweep, baseline, target, summaries, mode, max_seeds=max_seeds)
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
                                                s.final_by_seed("fid"), base.final_by_seed("fid"), max_seeds))
            if target is not None:
                analysis.step_comparisons.append(compare_steps(s, base, max_seeds))
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
                                                s.final_by_seed("loss"), base.final_by_seed("loss"), max_seeds))
    return analysis


def calibrate(analysis: Analysis) -> Analysis:
    """Fill every comparison's false-positive rate from relabellings of its per-seed values (`--calibrate`)."""
    for c in analysis.comparisons + analysis.step_comparisons:
        c.relabel_rate, c.relabel_splits, c.relabel_exact = relabel_false_positive_rate(c.values, c.baseline_values)
    analysis.calibrated = True
    return analysis
