"""The report's figures, as PNG files. Object-oriented matplotlib (`Figure`, no pyplot): no global state.

Each `plot_*` writes one PNG and returns a `Plot` (file name + caption), or None when the sweep has
nothing to draw (no FID, no logsnr_stats.npz) — the report then says which figure is missing and why.
One module, ~400 lines: every figure of report.md, sharing the band, legend and style helpers at its top.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from diffrun.monitoring.plots import draw_variance_heatmap, robust_log_norm, strategy_styles
from diffrun.reporting.collect import RunRecord, dotted
from diffrun.reporting.stats import Analysis

LAMBDA_LABEL = "log-SNR  λ = log(α²/σ²)"
STEP_LABEL = "training step (optimizer updates)"
DPI = 120
LAST_FLUSHES = 5             # loss-vs-λ: pool the last few flushes (one flush has few samples per bin)


@dataclass
class Plot:
    file: str                # name inside the report folder
    title: str
    caption: str


def add_legend(ax, count: int) -> None:
    if count <= 6:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, framealpha=0.85)


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Aggregate per-seed curves on the union of their steps: (steps, mean, lo, hi, kind).

    kind is "mean ± std" with ≥ 3 seeds and "min–max" with fewer (a std of two values says little).
    """
    by_step: dict[int, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values):
            if math.isfinite(v):
                by_step.setdefault(int(s), []).append(float(v))
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    centre = np.array([v.mean() for v in vals])
    if len(curves) >= 3:
        spread = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
        return steps, centre, centre - spread, centre + spread, "mean ± std"
    return steps, centre, np.array([v.min() for v in vals]), np.array([v.max() for v in vals]), "min–max"


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _curves_plot(analysis: Analysis, path: Path, series, ylabel: str, title: str,
                 target: Optional[float] = None) -> Optional[str]:
    """Shared body of the FID and loss curves: one line + band per strategy. Returns the band kinds used."""
    styles = strategy_styles(s.strategy for s in analysis.summaries)
    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.add_subplot()
    kinds, drawn, lows, highs = set(), 0, [], []
    for s in analysis.summaries:
        curves = [series(r) for r in s.runs]
        curves = [c for c in curves if len(c[0])]
        if not curves:
            continue
        steps, centre, lo, hi, kind = band(curves)
        kinds.add(kind)
        ax.plot(steps, centre, marker="o", ms=3, lw=1.6, **styles[s.strategy],
                label=f"{s.strategy} (n={len(curves)}, {kind})")
        if len(curves) > 1:
            ax.fill_between(steps, lo, hi, color=styles[s.strategy]["color"], alpha=0.2, lw=0)
        lows.append(np.nanmin(lo)), highs.append(np.nanmax(hi))
        drawn += 1
    if not drawn:
        return None
    if target is not None:
        ax.axhline(target, color="0.3", ls="--", lw=1, label=f"target FID = {target:g}")
    positive = min(lows) > 0
    if positive and max(highs) / min(lows) > 4:
        ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    add_legend(ax, drawn + (target is not None))
    save(fig, path)
    return " and ".join(sorted(kinds))


def plot_fid_curves(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    kinds = _curves_plot(analysis, out_dir / "fid_curves.png", lambda r: r.fid_curve(),
                         "FID (lower is better)", f"FID vs step — {analysis.sweep.name}", analysis.target_fid)
    if kinds is None:
        return None
    return Plot("fid_curves.png", "FID vs training step",
                f"Line: mean over seeds; band: {kinds} over seeds (min–max when a strategy has < 3 seeds). "
                f"Finished runs only." + (f" Dashed: target FID {analysis.target_fid:g}." if analysis.target_fid else ""))


def plot_loss_curves(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    kinds = _curves_plot(analysis, out_dir / "loss_curves.png", lambda r: r.train_series("loss"),
                         "unweighted training loss (target-space MSE)", f"Training loss vs step — {analysis.sweep.name}")
    if kinds is None:
        return None
    return Plot("loss_curves.png", "Unweighted training loss vs step",
                f"Mean of the per-sample unweighted loss over each logging window; line: mean over seeds, band: "
                f"{kinds}. Comparable across strategies only for the same prediction target.")


def plot_per_seed(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    """Every seed's final FID (and steps to the target), one column per strategy, with the baseline's mean ± the
    minimum detectable difference of each comparison: what the verdicts are made of."""
    if analysis.mode != "fid" or not any(s.fid_runs for s in analysis.summaries):
        return None
    styles = strategy_styles(s.strategy for s in analysis.summaries)
    panels = [("final FID (lower is better)", lambda s: s.final_fids, analysis.comparisons)]
    if analysis.target_fid is not None:
        panels.append((f"steps to FID ≤ {analysis.target_fid:g} (fewer is faster)",
                       lambda s: [v for v in s.steps_to_target if v is not None], analysis.step_comparisons))
    fig = Figure(figsize=(4.2 * len(panels) + 0.8, 4.0))
    base = analysis.summary(analysis.baseline)
    for i, (ylabel, values_of, comparisons) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        mdd = {c.strategy: c.mdd for c in comparisons}
        for x, s in enumerate(analysis.summaries):
            values = np.asarray(values_of(s), float)
            if not len(values):
                continue
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.plot(x + jitter, values, "o", ms=4, alpha=0.8, color=styles[s.strategy]["color"])
            ax.hlines(values.mean(), x - 0.25, x + 0.25, color=styles[s.strategy]["color"], lw=2)
            if base is not None and s is not base and math.isfinite(mdd.get(s.strategy, math.nan)):
                centre = np.mean(values_of(base))
                ax.errorbar(x + 0.32, centre, yerr=mdd[s.strategy], fmt="none", ecolor="0.4", capsize=3, lw=1)
        ax.set_xticks(range(len(analysis.summaries)), [s.strategy for s in analysis.summaries], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Per seed — {analysis.sweep.name}", fontsize=10)
    save(fig, out_dir / "per_seed.png")
    return Plot("per_seed.png", "Per-seed results and the minimum detectable difference",
                "Dots: one per seed (finished runs; for steps, the seeds that reached the target); bar: the mean. "
                f"Grey whisker beside a strategy: the baseline's mean ± the minimum difference Welch's test would "
                f"detect with 80% power for that comparison (docs/statistics.md): a strategy mean inside it could "
                f"differ from the baseline without this sweep being able to tell.")


# ------------------------------------------------------------------------------------------------
# per-log-SNR statistics (logsnr_stats.npz)
# ------------------------------------------------------------------------------------------------
def stats_runs(analysis: Analysis) -> dict[str, list[RunRecord]]:
    return {s.strategy: [r for r in s.runs if r.stats is not None] for s in analysis.summaries
            if any(r.stats is not None for r in s.runs)}


def occupied_range(groups: dict[str, list[RunRecord]]) -> tuple[float, float]:
    """λ range of the bins that ever received a sample (plots crop to it; the default bins span ±20)."""
    lo, hi = math.inf, -math.inf
    for runs in groups.values():
        for r in runs:
            edges, count = r.stats["edges"], np.nansum(r.stats["count"], axis=0)
            used = np.nonzero(count > 0)[0]
            if len(used):
                lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
    return (lo, hi) if lo < hi else (-20.0, 20.0)


def pooled_last(stats: dict, key: str, last: int = LAST_FLUSHES) -> np.ndarray:
    """Count-weighted mean of a per-bin mean over the last `last` flushes (NaN where no sample fell)."""
    count = np.nan_to_num(stats["count"][-last:])
    values = stats[key][-last:]
    total = count.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.nansum(np.where(count > 0, values, 0.0) * count, axis=0) / total
    return np.where(total > 0, pooled, np.nan)


def plot_loss_vs_logsnr(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    groups = stats_runs(analysis)
    if not groups:
        return None
    styles = strategy_styles(s.strategy for s in analysis.summaries)
    panels = [("loss_mean", "unweighted loss ℓ(λ)"), ("wloss_mean", "weighted loss w·ℓ(λ)"),
              ("weight_mean", "applied weight w(λ)")]
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    lo, hi = occupied_range(groups)
    for ax, (key, label) in zip(axes, panels):
        for strategy, runs in groups.items():
            curves = [pooled_last(r.stats, key) for r in runs if key in r.stats]
            if not curves:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # bins empty in every seed stay NaN
                y = np.nanmean(np.vstack(curves), axis=0)
            y = np.where(y > 0, y, np.nan)
            ax.plot(runs[0].stats["centers"], y, lw=1.6, **styles[strategy], label=f"{strategy} (n={len(curves)})")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xlabel(LAMBDA_LABEL)
        ax.set_title(label, fontsize=11)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("per-bin mean (log scale)")
    add_legend(axes[-1], len(groups))
    fig.suptitle(f"Loss vs log-SNR, last {LAST_FLUSHES} logging windows pooled, mean over seeds — {analysis.sweep.name}")
    save(fig, out_dir / "loss_vs_logsnr.png")
    return Plot("loss_vs_logsnr.png", "Loss vs log-SNR (end of training)",
                f"Per-bin means of the last {LAST_FLUSHES} logging windows of each run (count-weighted), then the mean "
                f"over seeds. Unweighted ℓ is in the prediction-target space; w·ℓ is what each strategy minimises.")


def mean_over_seeds(runs: list[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[step, bin]): nan-mean over the seeds that flushed at each step."""
    by_step: dict[int, list[np.ndarray]] = {}
    for r in runs:
        if key not in r.stats:
            continue
        for s, row in zip(r.stats["step"], r.stats[key]):
            by_step.setdefault(int(s), []).append(row)
    steps = np.array(sorted(by_step))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        grid = np.vstack([np.nanmean(np.vstack(by_step[s]), axis=0) for s in steps]) if len(steps) else np.zeros((0, 0))
    return steps, grid


def plot_variance_heatmaps(analysis: Analysis, out_dir: Path, key: str = "loss_var") -> Optional[Plot]:
    groups = stats_runs(analysis)
    data = {}
    for strategy, runs in groups.items():
        steps, grid = mean_over_seeds(runs, key)
        if len(steps):
            data[strategy] = (runs[0].stats["edges"], steps, grid, len(runs))
    if not data:
        return None
    norm = robust_log_norm(np.concatenate([g.ravel() for _, _, g, _ in data.values()]))
    if norm is None:
        return None
    n = len(data)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols + 1.4, 3.0 * nrows + 0.8), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06, hspace=0.04)   # keep "1000" and the next panel's "0" apart
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    lo, hi = occupied_range(groups)
    mesh = None
    for i, (ax, (strategy, (edges, steps, grid, nseeds))) in enumerate(zip(axes, data.items())):
        mesh = draw_variance_heatmap(ax, steps, edges, grid, norm=norm) or mesh
        ax.set_title(f"{strategy} (n={nseeds})", fontsize=10)
        ax.set_ylim(lo, hi)
        bottom = i + ncols >= n                 # no panel below: this one carries the step axis
        ax.tick_params(labelbottom=bottom)
        ax.set_xlabel("training step" if bottom else "")
        ax.set_ylabel("log-SNR λ" if i % ncols == 0 else "")
    for ax in axes[n:]:
        ax.set_visible(False)
    what = "unweighted loss ℓ" if key == "loss_var" else "weighted loss w·ℓ"
    cbar = fig.colorbar(mesh, ax=list(axes[:n]), shrink=0.95, extend="both")
    cbar.set_label(f"variance of the {what} per bin (log scale)")
    fig.suptitle(f"Per-bin variance of the {what} vs step (mean over seeds, shared colour scale) — {analysis.sweep.name}",
                 fontsize=11)
    name = f"{key}_heatmap.png"
    save(fig, out_dir / name)
    return Plot(name, f"Variance of the {what} per log-SNR bin vs step",
                "One panel per strategy, shared logarithmic colour scale (1st–99th percentile of all panels; "
                "beyond it: clipped). Each column is one logging window; grey = no sample in that bin.")


def plot_logsnr_density(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    groups = stats_runs(analysis)
    if not groups:
        return None
    styles = strategy_styles(s.strategy for s in analysis.summaries)
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    for strategy, runs in groups.items():
        edges = runs[0].stats["edges"]
        count = sum(np.nansum(r.stats["count"], axis=0) for r in runs)
        if count.sum() <= 0:
            continue
        density = count / (count.sum() * np.diff(edges))
        ax.stairs(density, edges, lw=1.6, **styles[strategy], label=f"{strategy} (n={len(runs)})")
    ax.set_xlim(*occupied_range(groups))
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel("density of sampled λ (per unit λ)")
    ax.set_title(f"Sampled log-SNR density (all steps, all seeds) — {analysis.sweep.name}")
    ax.grid(alpha=0.3)
    add_legend(ax, len(groups))
    save(fig, out_dir / "logsnr_density.png")
    return Plot("logsnr_density.png", "Sampled log-SNR density",
                "Histogram of the λ drawn during training, counts summed over every logging window and seed, "
                "normalised to unit area. Adaptive samplers change it over training; this is the whole-run average.")


# ------------------------------------------------------------------------------------------------
# sample grids (<run>/samples/step_*.png)
# ------------------------------------------------------------------------------------------------
SAMPLE_ROWS = 4              # at most this many steps, evenly spread, always with the last common one


def sample_grids(run: RunRecord) -> dict[int, Path]:
    """step → the run's sample grid PNG."""
    if run.path is None:
        return {}
    grids = {}
    for path in (Path(run.path) / "samples").glob("step_*.png"):
        step = path.stem.removeprefix("step_")
        if step.isdigit():
            grids[int(step)] = path
    return grids


def grid_runs(analysis: Analysis) -> tuple[dict[str, RunRecord], Optional[int]]:
    """One finished run per strategy with sample grids: the seed every strategy has (the smallest), else each
    strategy's smallest seed (the second value is then None)."""
    have = {s.strategy: [r for r in s.runs if sample_grids(r)] for s in analysis.summaries}
    have = {k: sorted(v, key=lambda r: (r.seed is None, r.seed)) for k, v in have.items() if v}
    common = set.intersection(*({r.seed for r in runs} for runs in have.values())) - {None} if have else set()
    if common:
        seed = min(common)
        return {k: next(r for r in runs if r.seed == seed) for k, runs in have.items()}, seed
    return {k: runs[0] for k, runs in have.items()}, None


def plot_sample_grids(analysis: Analysis, out_dir: Path) -> Optional[Plot]:
    from PIL import Image

    chosen, seed = grid_runs(analysis)
    if not chosen:
        return None
    grids = {k: sample_grids(r) for k, r in chosen.items()}
    common = sorted(set.intersection(*(set(g) for g in grids.values())))
    if not common:
        return None
    picks = sorted({common[int(round(i))] for i in np.linspace(0, len(common) - 1, min(SAMPLE_ROWS, len(common)))})
    styles = strategy_styles(chosen)
    rows, cols = len(picks), len(chosen)
    fig = Figure(figsize=(2.6 * cols + 0.6, 2.6 * rows + 0.7), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, (strategy, run) in enumerate(chosen.items()):
        for i, step in enumerate(picks):
            ax = axes[i, j]
            with Image.open(grids[strategy][step]) as image:
                pixels = np.asarray(image.convert("RGB"))
            ax.imshow(pixels, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(strategy if seed is not None else f"{strategy} (seed {run.seed})", fontsize=10,
                             color=styles[strategy]["color"])
            if j == 0:
                ax.set_ylabel(f"step {step}", fontsize=10)
    fig.suptitle(f"EMA samples at equal steps{f', training seed {seed}' if seed is not None else ''} — "
                 f"{analysis.sweep.name}", fontsize=11)
    save(fig, out_dir / "sample_grids.png")
    if seed is not None:
        which = f"the runs of training seed {seed}"
    else:
        which = "no training seed is common to every strategy, so each column shows its smallest seed"
    sample_seeds = sorted({str(dotted(r.config, "sample.seed")) for r in chosen.values()})
    if len(sample_seeds) == 1 and sample_seeds != ["None"]:
        noise = f"one sample seed ({sample_seeds[0]}) for all, so every column starts from the same noise"
    else:
        noise = f"the sample seeds differ ({', '.join(sample_seeds)}), so the columns start from different noise"
    return Plot("sample_grids.png", "Samples side by side",
                f"One column per strategy, one row per step at which every strategy saved a grid "
                f"({', '.join(map(str, picks))}); {which}; {noise}.")


def make_figures(analysis: Analysis, out_dir: Path) -> tuple[list[Plot], list[str]]:
    """All figures; returns the plots written and one line per figure that could not be drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, missing = [], []
    no_npz = "no logsnr_stats.npz in the finished runs"
    why_var = no_npz if not stats_runs(analysis) else "no bin with ≥ 2 samples"
    for title, fn, why in [
        ("FID vs step", plot_fid_curves, "no FID evaluation in the finished runs (eval disabled or skipped)"),
        ("Per-seed results", plot_per_seed, "no FID evaluation in the finished runs"),
        ("Training loss vs step", plot_loss_curves, "no training record in the finished runs"),
        ("Loss vs log-SNR", plot_loss_vs_logsnr, no_npz),
        ("Loss-variance heatmaps", lambda a, d: plot_variance_heatmaps(a, d, "loss_var"), why_var),
        ("Weighted-loss-variance heatmaps", lambda a, d: plot_variance_heatmaps(a, d, "wloss_var"), why_var),
        ("Sampled log-SNR density", plot_logsnr_density, no_npz),
        ("Samples side by side", plot_sample_grids,
         "no step at which every strategy's finished run saved a sample grid (samples/step_*.png)"),
    ]:
        plot = fn(analysis, out_dir)
        if plot is None:
            missing.append(f"{title}: {why}")
        else:
            plots.append(plot)
    return plots, missing
