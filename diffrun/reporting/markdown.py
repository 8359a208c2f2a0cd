"""The report: `report.md` (tables, comparison, figures with relative links), written with its machine-readable
twin beside it (summary.json, results.csv, jobs.csv: summary.py)."""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Optional

from diffrun import conf_dir
from diffrun.reporting.collect import RunRecord, dotted, first_line, to_float
from diffrun.reporting.figures import Plot
from diffrun.reporting.significance import ALPHA, BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, POWER, RELABEL_SEED, RELABEL_SPLITS
from diffrun.reporting.stats import Analysis, Comparison, mean, std
from diffrun.reporting.summary import JOBS_CSV, RESULTS_CSV, jobs_rows, results_rows, summary_dict, write_csv

DASH = "—"


def preset_comment(experiment: Optional[str], root: Optional[Path] = None) -> Optional[str]:
    """The leading comment block of conf/experiment/<experiment>.yaml (without `# @package`), verbatim."""
    if not experiment:
        return None
    path = (root or conf_dir()) / "experiment" / f"{experiment}.yaml"
    if not path.exists():
        return None
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line)
    return "\n".join(lines) or None


def fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, spec)


def pm(values, spec: str) -> str:
    """"mean ± std" (std over seeds, ddof = 1; just the mean for one seed)."""
    m, s = mean(values), std(values)
    if not math.isfinite(m):
        return DASH
    return f"{m:{spec}} ± {s:{spec}}" if math.isfinite(s) else f"{m:{spec}}"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def failed_cell(summary) -> str:
    if not summary.failed:
        return "0"
    return f"{len(summary.failed)}: {summary.first_error}"


def run_dates(runs: list[RunRecord]) -> str:
    times = [to_float(r2.get("time")) for r in runs for r2 in r.train[:1] + r.train[-1:]]
    times = [t for t in times if math.isfinite(t)]
    if not times:
        return ""
    f = lambda t: _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    return f"{f(min(times))} → {f(max(times))}"


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def header(a: Analysis, now: str) -> list[str]:
    sw = a.sweep
    runs = sw.runs
    finished = sum(r.finished for r in runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    steps = {dotted(r.config, "train.steps") for r in runs} - {None}
    batch = {dotted(r.config, "train.batch_size") for r in runs} - {None}
    prediction = {r.prediction for r in runs} - {None}
    lines = [f"# Sweep report: {sw.name}", "",
             f"- **Sweep**: `{sw.name}` (`{sw.source}`)",
             f"- **Experiment**: {sw.experiment or DASH}",
             f"- **Dataset**: {sw.dataset or DASH}",
             f"- **Jobs**: {len(runs)} ({finished} finished, {len(runs) - finished} failed or incomplete) — "
             f"{len(sw.strategies)} strategies × seeds {', '.join(map(str, seeds)) or DASH}"]
    if steps or batch:
        lines.append(f"- **Budget**: {', '.join(map(str, sorted(steps))) or '?'} steps × batch "
                     f"{', '.join(map(str, sorted(batch))) or '?'}"
                     + (f", {', '.join(sorted(prediction))}-prediction" if prediction else ""))
    lines.append(f"- **Baseline**: {a.baseline}; **target FID**: "
                 f"{fmt(a.target_fid, 'g') if a.target_fid is not None else 'none (set report.target_fid or --target-fid)'}")
    dates = run_dates(runs)
    lines.append(f"- **Date**: report generated {now}" + (f"; training logged {dates}" if dates else ""))
    lines += ["", "## Reference (from the preset)", ""]
    comment = preset_comment(sw.experiment)
    if comment:
        lines += [f"Header comment of `conf/experiment/{sw.experiment}.yaml`, verbatim:", "", "```text", comment, "```"]
    elif sw.experiment:
        lines.append(f"No comment block found in `conf/experiment/{sw.experiment}.yaml` (or the file does not exist).")
    else:
        lines.append("The sweep did not use an experiment preset; no reference numbers.")
    return lines


def results_table(a: Analysis) -> list[str]:
    lines = ["", "## Results per strategy", ""]
    if a.mode == "fid":
        target = a.target_fid
        head = ["strategy", "seeds", "final FID (mean ± std)", "best FID (mean)",
                f"steps to FID ≤ {target:g} (mean; reached)" if target is not None else "steps to target FID",
                "images/s (median)", "failed jobs"]
        rows = []
        for s in a.summaries:
            if target is None:
                reach = "n/a (no target)"
            elif not s.fid_runs:
                reach = DASH
            else:
                reach = f"{fmt(s.steps_to_target_mean, '.0f')} ({s.reached}/{len(s.fid_runs)} seeds reached)"
            rows.append([f"**{s.strategy}**" if s.strategy == a.baseline else s.strategy,
                         s.n if len(s.fid_runs) == s.n else f"{s.n} ({len(s.fid_runs)} with FID)",
                         pm(s.final_fids, ".2f"), fmt(s.best_fid_mean), reach,
                         fmt(s.images_per_sec, ".1f"), failed_cell(s)])
        lines += table(head, rows)
        lines += ["", "Final FID: the last evaluation of each finished run; mean ± sample std (ddof = 1) over seeds. "
                  "Best FID: the minimum over a run's evaluations, averaged over seeds. Steps to target: the step of "
                  "the first evaluation with FID ≤ target, averaged over the seeds that reached it. Images/s: median "
                  "over a run's training records, averaged over seeds. Baseline in bold. Lower FID is better."]
        lines += protocol_lines(a)
    else:
        head = ["strategy", "seeds", "final unweighted loss (mean ± std)", "final weighted loss (mean ± std)",
                "images/s (median)", "failed jobs"]
        rows = [[f"**{s.strategy}**" if s.strategy == a.baseline else s.strategy, s.n,
                 pm(s.final_losses("loss"), ".4g"), pm(s.final_losses("weighted_loss"), ".4g"),
                 fmt(s.images_per_sec, ".1f"), failed_cell(s)] for s in a.summaries]
        lines += table(head, rows)
        lines += ["", "**No FID in this sweep** (evaluation disabled or skipped), so the FID columns are replaced by "
                  "the final training loss (the last logging window of each finished run; mean ± std over seeds). "
                  "Weighted losses of different weightings are not comparable with each other."]
        reasons = skip_reasons(a)
        if reasons:
            lines += ["", "Why there is no FID: " + "; ".join(reasons) + "."]
    return lines


def protocol_lines(a: Analysis) -> list[str]:
    """The FID protocol of the final evaluations (samples, reference, sampler, NFE, precision, repeats), and a
    warning when the runs were evaluated differently."""
    runs = [r for s in a.summaries for r in s.fid_runs]
    labels: dict[str, int] = {}
    for run in runs:
        labels[run.fid_protocol] = labels.get(run.fid_protocol, 0) + 1
    if not labels:
        return []
    if len(labels) == 1:
        return ["", f"FID protocol: {next(iter(labels))}. The curve, best FID and steps to target use the evaluations "
                    "made with it (during training, or later with diffrun-eval)."]
    return ["", "**FID protocols differ between runs**; their final FIDs are not comparable:", ""] + [
        f"- {label}: {count} run(s)" for label, count in labels.items()]


def skip_reasons(a: Analysis) -> list[str]:
    reasons = set()
    for r in a.sweep.runs:
        if dotted(r.config, "eval.enabled") is False:
            reasons.add("`eval.enabled=false`")
        for key, value in r.status.items():
            if ("skip" in key or key.startswith("eval") or key.startswith("fid")) and isinstance(value, str):
                reasons.add(f"status.json `{key}`: {first_line(value)}")
    return sorted(reasons)


def comparison_table(comparisons: list[Comparison]) -> list[str]:
    rows = []
    for c in comparisons:
        ci = DASH if not math.isfinite(c.ci[0]) else f"[{c.ci[0]:+.3g}, {c.ci[1]:+.3g}]"
        rows.append([c.strategy, f"{len(c.values)} vs {len(c.baseline_values)}",
                     fmt(mean(c.values), ".4g"), fmt(mean(c.baseline_values), ".4g"),
                     fmt(c.diff, "+.3g"), ci, fmt(c.t, ".3f"), fmt(c.p, ".3g"),
                     "yes" if c.significant else "no",
                     f"{fmt(c.paired_p, '.3g')} ({c.paired_n} pairs)" if c.paired_n else DASH,
                     fmt(c.mdd, ".3g"), seeds_cell(c), c.verdict])
    return table(["strategy", "n (strategy vs baseline)", "mean", "baseline mean", "Δ", "bootstrap 95% CI of Δ",
                  "Welch t", "p", f"p < {ALPHA}", "paired p (same seeds)", f"min. detectable \\|Δ\\| ({POWER:.0%} power)",
                  "seeds per arm for the observed Δ", "verdict"], rows)


def seeds_cell(c: Comparison) -> str:
    if c.verdict_kind == "n/a":
        return DASH
    return str(c.seeds_needed) if c.seeds_needed is not None else f"> {c.max_seeds}"


def comparison(a: Analysis) -> list[str]:
    lines = ["", f"## Comparison against the baseline ({a.baseline})", ""]
    metric = "final FID" if a.mode == "fid" else "final unweighted training loss"
    for remark in a.remarks:
        lines += [remark, ""]
    if a.comparisons:
        lines += [f"Metric: **{metric}** over seeds. **Better = lower {'FID' if a.mode == 'fid' else 'loss'}**; "
                  f"Δ = mean(strategy) − mean({a.baseline}), so a negative Δ favours the strategy. "
                  f"Welch's t-test (unequal variances, two-sided; `scipy.stats.ttest_ind(equal_var=False)`) and a "
                  f"percentile bootstrap 95% CI of Δ ({BOOTSTRAP_SAMPLES} resamples, RNG seed {BOOTSTRAP_SEED}). "
                  f"Significant means p < {ALPHA} in Welch's test (the verdict); the paired t-test "
                  f"(`scipy.stats.ttest_rel`) over the seeds both have is shown beside it.", ""]
        lines += comparison_table(a.comparisons)
    if a.comparisons:
        lines += ["", f"**How sure**: the minimum detectable |Δ| is the smallest true difference Welch's test would "
                  f"find with {POWER:.0%} power at α = {ALPHA} with these seeds and the measured spreads (noncentral "
                  f"t, Welch–Satterthwaite degrees of freedom). The seeds per arm are how many seeds in each arm the "
                  f"test would need to find the *observed* Δ with {POWER:.0%} power, if it were the true difference "
                  f"(a rough planning number: the observed Δ and spreads are themselves noisy). Verdict: **shown** "
                  f"when p < {ALPHA}; **underpowered (needs ≈ N seeds per arm)** when p ≥ {ALPHA} and N ≤ "
                  f"{a.max_seeds} (`--max-seeds`); **not shown** when p ≥ {ALPHA} and even {a.max_seeds} seeds per "
                  f"arm would not find the observed Δ with {POWER:.0%} power. See docs/statistics.md.",
                  "", "With 2–5 seeds these tests have little power and the bootstrap CI is too narrow (it resamples "
                  "few values); read a non-significant result as \"not shown\", not as \"no difference\". Runs with "
                  "the same seed start from the same initial weights, and strategies that draw noise levels the same "
                  "way (every t ~ U weighting: uniform, min_snr, p2, ...) also see the same batches and noise, so "
                  "seed-to-seed variation partly cancels in the paired test; Welch's test ignores the pairing "
                  "(conservative)."]
    if not a.comparisons and not a.remarks:
        lines.append("Nothing to compare: the sweep has a single strategy.")
    return lines


def step_comparison(a: Analysis) -> list[str]:
    if not a.step_comparisons:
        return []
    return (["", f"## Steps to the target FID (≤ {a.target_fid:g}) against the baseline ({a.baseline})", "",
             "Metric: the step of each seed's first evaluation with FID ≤ target; **fewer steps = faster**. "
             "Only the seeds that reached the target enter (the results table counts them), so a strategy "
             "whose slow seeds never arrive looks faster than it is. Steps lie on the evaluation grid, so ties "
             "are common and the t-test is a rough guide here. Same tests, power and verdicts as for the final FID.", ""]
            + comparison_table(a.step_comparisons))


def calibration(a: Analysis) -> list[str]:
    """`--calibrate`: the false-positive rate of the verdict's test, from relabellings of the per-seed values."""
    lines = ["", "## Calibration: false-positive rate from relabellings", "",
             f"For each comparison, the per-seed values of both arms are pooled and split again into arms of the "
             f"same sizes, every way when there are at most {RELABEL_SPLITS} splits (else {RELABEL_SPLITS} random "
             f"splits, RNG seed {RELABEL_SEED}); the rate is the fraction of splits where Welch's test gives p < "
             f"{ALPHA}, i.e. where the report would say **shown**. It is a false-positive rate only when both arms "
             f"ran the same configuration (an A/A sweep such as `experiment=calibration`); a well-calibrated test "
             f"gives about {ALPHA}.", ""]
    rows = [[c.strategy, c.metric, f"{len(c.values)} + {len(c.baseline_values)}",
             f"{c.relabel_splits} ({'all' if c.relabel_exact else 'random'})" if c.relabel_splits else DASH,
             fmt(c.relabel_rate, ".3f")] for c in a.comparisons + a.step_comparisons]
    return lines + table(["strategy", "metric", "seeds pooled", "splits", f"fraction with p < {ALPHA}"], rows)


def failures(a: Analysis) -> list[str]:
    failed = [r for r in a.sweep.runs if not r.finished]
    lines = ["", "## Failed or incomplete jobs", ""]
    if not failed:
        return lines + ["None: every job finished."]
    rows = [[r.name, r.strategy, fmt(r.seed, "d") if r.seed is not None else DASH, r.state,
             f"{r.step if r.step is not None else '?'}/{r.total_steps if r.total_steps is not None else '?'}",
             r.error or DASH] for r in failed]
    return lines + table(["job", "strategy", "seed", "state", "step", "error (first line)"], rows) + [
        "", "These jobs are left out of every statistic above."]


def figures(plots: list[Plot], missing: list[str]) -> list[str]:
    lines = ["", "## Figures"]
    for p in plots:
        lines += ["", f"### {p.title}", "", f"![{p.title}]({p.file})", "", p.caption]
    if missing:
        lines += ["", "Not drawn:", ""] + [f"- {m}" for m in missing]
    return lines


def runs_table(a: Analysis) -> list[str]:
    rows = []
    for r in a.sweep.runs:
        rows.append([r.name, r.strategy, r.seed if r.seed is not None else DASH, r.state,
                     fmt(r.final_fid), fmt(r.best_fid),
                     fmt(r.steps_to_fid(a.target_fid), "d") if r.steps_to_fid(a.target_fid) is not None else DASH,
                     fmt(r.final_train("loss"), ".4g"), fmt(r.final_train("weighted_loss"), ".4g"),
                     fmt(r.images_per_sec, ".1f"), "yes" if r.stats is not None else "no", r.fid_protocol or DASH])
    return ["", "## All jobs", ""] + table(
        ["job", "strategy", "seed", "state", "final FID", "best FID", "steps to target", "final loss",
         "final weighted loss", "images/s", "logsnr_stats.npz", "FID protocol"], rows)


def checkpoint_evals_table(a: Analysis) -> list[str]:
    """Every evaluation diffrun-eval appended to a job's metrics.jsonl (source: diffrun-eval), with its protocol."""
    rows = []
    for r in a.sweep.runs:
        for e in (e for e in r.evals if e.get("source") == "diffrun-eval"):
            values = e.get("fid_values") or [e["fid"]]
            repeats = f"{fmt(to_float(e.get('fid_mean')))} ({len(values)})" if len(values) > 1 else DASH
            kid = f"{to_float(e['kid_mean']):.4g} ± {to_float(e['kid_std']):.2g}" if "kid_mean" in e else DASH
            rows.append([r.name, e["step"], fmt(to_float(e["fid"])), repeats, kid, e.get("fid_protocol", DASH)])
    if not rows:
        return []
    return ["", "## Checkpoint evaluations (diffrun-eval)", ""] + table(
        ["job", "step", "FID", "mean FID (repeats)", "KID", "protocol"], rows) + [
        "", "Appended to each job's metrics.jsonl by `diffrun-eval` after training; with several repeats FID is "
            "their minimum (EDM's protocol) and the mean is beside it."]


def render(a: Analysis, plots: list[Plot], missing: list[str], now: Optional[str] = None) -> str:
    now = now or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = (header(a, now) + results_table(a) + comparison(a) + step_comparison(a) + (calibration(a) if a.calibrated else [])
             + failures(a) + figures(plots, missing)
             + runs_table(a) + checkpoint_evals_table(a))
    lines += ["", f"The tables as CSV: [{RESULTS_CSV}]({RESULTS_CSV}) (per strategy, with the comparison) and "
                  f"[{JOBS_CSV}]({JOBS_CSV}) (every job); `summary.json` holds the same numbers."]
    if a.sweep.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in a.sweep.notes]
    return "\n".join(lines) + "\n"


def write_report(a: Analysis, plots: list[Plot], missing: list[str], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(render(a, plots, missing))
    (out_dir / "summary.json").write_text(json.dumps(summary_dict(a), indent=2))
    write_csv(results_rows(a), out_dir / RESULTS_CSV)
    write_csv(jobs_rows(a), out_dir / JOBS_CSV)
    return path
