"""The report's machine-readable twin: `summary.json`, W&B summary scalars, and the tables as CSV (plain numbers,
no ± or formatting; empty where there is no value)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from diffrun.reporting.significance import ALPHA, POWER
from diffrun.reporting.stats import Analysis, Comparison, mean, std


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def summary_dict(a: Analysis) -> dict:
    return {
        "sweep": a.sweep.name, "source": a.sweep.source, "experiment": a.sweep.experiment,
        "dataset": a.sweep.dataset, "baseline": a.baseline, "target_fid": a.target_fid, "mode": a.mode,
        "strategies": {s.strategy: {
            "seeds": s.seeds, "final_fid": [_num(v) for v in s.final_fids],
            "final_fid_mean": _num(s.final_fid_mean), "final_fid_std": _num(s.final_fid_std),
            "best_fid_mean": _num(s.best_fid_mean), "steps_to_target": s.steps_to_target if a.target_fid is not None else None,
            "steps_to_target_mean": _num(s.steps_to_target_mean), "reached": s.reached,
            "images_per_sec": _num(s.images_per_sec), "final_loss": [_num(v) for v in s.final_losses("loss")],
            "fid_protocol": [r.fid_protocol for r in s.fid_runs],
            "failed": [{"job": r.name, "state": r.state, "error": r.error} for r in s.failed],
        } for s in a.summaries},
        "power": POWER, "alpha": ALPHA, "max_seeds": a.max_seeds,
        "comparisons": [comparison_dict(c) for c in a.comparisons],
        "step_comparisons": [comparison_dict(c) for c in a.step_comparisons],
    }


def comparison_dict(c: Comparison) -> dict:
    out = {"strategy": c.strategy, "metric": c.metric, "n": len(c.values), "baseline_n": len(c.baseline_values),
           "diff": _num(c.diff), "t": _num(c.t), "p": _num(c.p), "ci": [_num(c.ci[0]), _num(c.ci[1])],
           "note": c.note, "paired": {"n": c.paired_n, "t": _num(c.paired_t), "p": _num(c.paired_p)},
           "min_detectable_diff": _num(c.mdd), "seeds_needed": c.seeds_needed,
           "verdict_kind": c.verdict_kind, "verdict": c.verdict}
    if c.relabel_splits:
        out["false_positive_rate"] = {"rate": _num(c.relabel_rate), "splits": c.relabel_splits, "exact": c.relabel_exact}
    return out


def wandb_summary(a: Analysis) -> dict:
    """The comparisons as flat W&B summary scalars, `report/<strategy>/<metric>/<field>` (metric `final_fid`,
    `final_loss` or `steps_to_target`); `verdict` is the text, `shown` 1 or 0, `underpowered` 1 or 0."""
    out: dict = {}
    for key, comparisons in (("final_fid" if a.mode == "fid" else "final_loss", a.comparisons),
                             ("steps_to_target", a.step_comparisons)):
        for c in comparisons:
            prefix = f"report/{c.strategy}/{key}"
            values = {"diff": _num(c.diff), "p": _num(c.p), "paired_p": _num(c.paired_p),
                      "min_detectable_diff": _num(c.mdd), "seeds_needed": c.seeds_needed,
                      "seeds": len(c.values), "baseline_seeds": len(c.baseline_values),
                      "shown": int(c.verdict_kind == "shown"), "underpowered": int(c.verdict_kind == "underpowered"),
                      "verdict": c.verdict, "false_positive_rate": _num(c.relabel_rate) if c.relabel_splits else None}
            out.update({f"{prefix}/{k}": v for k, v in values.items() if v is not None})
    return out


# ------------------------------------------------------------------------------------------------
# the tables as CSV: plain numbers (no ± or formatting), empty where there is no value
# ------------------------------------------------------------------------------------------------
RESULTS_CSV = "results.csv"
JOBS_CSV = "jobs.csv"


def results_rows(a: Analysis) -> list[dict]:
    """One row per strategy: the results table and, against the baseline, the comparison."""
    comparisons = {c.strategy: c for c in a.comparisons}
    steps = {c.strategy: c for c in a.step_comparisons}
    rows = []
    for s in a.summaries:
        c = comparisons.get(s.strategy)
        rows.append({
            "strategy": s.strategy, "baseline": s.strategy == a.baseline, "seeds": s.n,
            "seeds_with_fid": len(s.fid_runs),
            "final_fid_mean": _num(s.final_fid_mean), "final_fid_std": _num(s.final_fid_std),
            "best_fid_mean": _num(s.best_fid_mean), "target_fid": a.target_fid,
            "steps_to_target_mean": _num(s.steps_to_target_mean) if a.target_fid is not None else None,
            "seeds_reached_target": s.reached if a.target_fid is not None else None,
            "final_loss_mean": _num(mean(s.final_losses("loss"))), "final_loss_std": _num(std(s.final_losses("loss"))),
            "final_weighted_loss_mean": _num(mean(s.final_losses("weighted_loss"))),
            "images_per_sec": _num(s.images_per_sec), "failed_jobs": len(s.failed),
            "compared_metric": c.metric if c else None, "diff_vs_baseline": _num(c.diff) if c else None,
            "ci95_low": _num(c.ci[0]) if c else None, "ci95_high": _num(c.ci[1]) if c else None,
            "welch_t": _num(c.t) if c else None, "welch_p": _num(c.p) if c else None,
            "paired_p": _num(c.paired_p) if c else None, "paired_n": c.paired_n if c else None,
            "min_detectable_diff": _num(c.mdd) if c else None, "seeds_needed": c.seeds_needed if c else None,
            "verdict_kind": c.verdict_kind if c else None, "verdict": c.verdict if c else None,
            "false_positive_rate": _num(c.relabel_rate) if c and c.relabel_splits else None,
            **step_columns(steps.get(s.strategy)),
        })
    return rows


def step_columns(c: Optional[Comparison]) -> dict:
    """The steps-to-target comparison's columns of results.csv (empty without a target FID or for the baseline)."""
    return {"steps_diff_vs_baseline": _num(c.diff) if c else None, "steps_welch_p": _num(c.p) if c else None,
            "steps_paired_p": _num(c.paired_p) if c else None,
            "steps_min_detectable_diff": _num(c.mdd) if c else None,
            "steps_seeds_needed": c.seeds_needed if c else None,
            "steps_verdict_kind": c.verdict_kind if c else None, "steps_verdict": c.verdict if c else None,
            "steps_false_positive_rate": _num(c.relabel_rate) if c and c.relabel_splits else None}


def jobs_rows(a: Analysis) -> list[dict]:
    """One row per job of the sweep, finished or not (the "All jobs" table plus state and error)."""
    return [{
        "job": r.name, "strategy": r.strategy, "seed": r.seed, "state": r.state, "step": r.step,
        "total_steps": r.total_steps, "final_fid": _num(r.final_fid), "best_fid": _num(r.best_fid),
        "steps_to_target": r.steps_to_fid(a.target_fid), "final_loss": _num(r.final_train("loss")),
        "final_weighted_loss": _num(r.final_train("weighted_loss")), "images_per_sec": _num(r.images_per_sec),
        "logsnr_stats": r.stats is not None, "error": r.error or None,
    } for r in a.sweep.runs]


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["strategy"])
        writer.writeheader()
        writer.writerows(rows)
