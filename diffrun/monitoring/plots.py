"""Plots of the per-log-SNR statistics (`logsnr_stats.npz`) of a run or of every run in a sweep.

    diffrun-plot outputs/runs/digits_unet_small_uniform_seed0          # → <run>/plots/*.png
    diffrun-plot outputs/sweeps/minsnr --steps 500 1000 --out /tmp/p  # per-run plots + overlays

For a run: `loss_vs_logsnr.png` (mean and variance of the per-sample loss over λ at a few flushes),
`loss_var_heatmap.png` (variance over λ × training step, log colour scale) and `density_weight.png`
(how often each λ was drawn, the weight applied there, and their product). For a sweep (a directory
whose subdirectories hold runs): the same per run under `<out>/<job>/`, plus `density_weight.png` and
`loss_vs_logsnr_final.png` overlaying every run, one colour per strategy.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global backend state). One module, ~390 lines:
diffrun-plot and the figures it draws, which share the run loader and the per-strategy styles.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from diffrun.errors import DiffrunError
from diffrun.monitoring.stats_writer import FILENAME, load_stats

LAMBDA = "log-SNR λ = log(α²/σ²)"
LOSS = "per-sample loss ℓ (MSE per pixel, target space)"
DPI = 120


@dataclass
class RunStats:
    path: Path
    arrays: dict
    name: str
    strategy: str
    info: dict = field(default_factory=dict)   # dataset, schedule, seed, model (from config.yaml)

    @property
    def steps(self) -> np.ndarray:
        return self.arrays["step"]

    @property
    def title(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.info.items() if k in ("schedule", "seed") and v is not None)
        return f"{self.name} — strategy {self.strategy}" + (f" ({extra})" if extra else "")


def load_run(run_dir: str | Path) -> RunStats:
    run_dir = Path(run_dir)
    arrays = load_stats(run_dir / FILENAME)
    order = np.argsort(arrays["step"], kind="stable")
    arrays = {k: (v[order] if v.ndim and len(v) == len(order) and k not in ("edges", "centers") else v)
              for k, v in arrays.items()}
    name = str(arrays.get("run_name", "")) or run_dir.name
    strategy = str(arrays.get("strategy", "")) or "?"
    info: dict = {}
    config = run_dir / "config.yaml"
    if config.exists():
        import yaml

        cfg = yaml.safe_load(config.read_text()) or {}
        name = cfg.get("name") or name
        strategy = (cfg.get("weighting") or {}).get("name") or strategy
        info = {"dataset": (cfg.get("dataset") or {}).get("name"), "schedule": (cfg.get("schedule") or {}).get("name"),
                "seed": cfg.get("seed"), "model": (cfg.get("model") or {}).get("name")}
    return RunStats(run_dir, arrays, name, strategy, info)


def find_runs(root: str | Path) -> list[Path]:
    """The run directories at or under `root` (each holds a logsnr_stats.npz)."""
    root = Path(root)
    if (root / FILENAME).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(FILENAME))


def select_rows(steps: np.ndarray, requested=None, count: int = 5) -> list[int]:
    """Row indices: the flush nearest each requested step, or `count` evenly spaced flushes (incl. the last)."""
    if len(steps) == 0:
        return []
    if requested:
        return sorted({int(np.abs(steps - s).argmin()) for s in requested})
    return sorted({int(i) for i in np.linspace(0, len(steps) - 1, min(count, len(steps))).round()})


# ---------------------------------------------------------------------------------------------------
# single-run figures
# ---------------------------------------------------------------------------------------------------
def _positive(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(values > 0, values, np.nan)


def _yscale(ax, *arrays) -> None:
    """Log y when the positive values span more than a factor 20, else linear (readable ticks)."""
    values = np.concatenate([np.ravel(_positive(a)) for a in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if values.size and values.max() / values.min() > 20:
        ax.set_yscale("log")


def fig_loss_curves(run: RunStats, steps=None) -> Figure:
    """Mean and variance of ℓ over λ at the chosen flushes, one colour per step (early → late)."""
    a = run.arrays
    rows = select_rows(run.steps, steps)
    fig = Figure(figsize=(12, 4.6), dpi=DPI, layout="constrained")
    ax_mean, ax_var = fig.subplots(1, 2, sharex=True)
    colors = _step_colors(len(rows))
    for color, i in zip(colors, rows):
        label = f"step {int(run.steps[i])}"
        ax_mean.plot(a["centers"], _positive(a["loss_mean"][i]), ".-", color=color, label=label, ms=3, lw=1.2)
        ax_var.plot(a["centers"], _positive(a["loss_var"][i]), ".-", color=color, label=label, ms=3, lw=1.2)
    _yscale(ax_mean, a["loss_mean"][rows])
    _yscale(ax_var, a["loss_var"][rows])
    ax_mean.set(xlabel=LAMBDA, ylabel=f"E[ℓ | λ]: {LOSS}", title="mean loss per λ bin")
    ax_var.set(xlabel=LAMBDA, ylabel="Var[ℓ | λ] (squared loss units)", title="loss variance per λ bin")
    for ax in (ax_mean, ax_var):
        ax.grid(True, which="major", alpha=0.3)
    ax_mean.legend(title="flushed at", fontsize=8, title_fontsize=8)
    window = f"each curve: the {int(np.median(np.diff(run.steps))) if len(run.steps) > 1 else int(run.steps[0])} steps before it"
    fig.suptitle(f"{run.title}\nloss vs log-SNR ({window}; gaps: no samples in the bin)", fontsize=10)
    return fig


def robust_log_norm(values: np.ndarray) -> LogNorm | None:
    """A log colour scale over the finite positive values, 1st–99th percentile when there are enough of them:
    one odd bin must not wash out the rest. None when there is nothing to scale."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99]) if finite.size > 20 else (finite.min(), finite.max())
    return LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))


def draw_variance_heatmap(ax, steps: np.ndarray, edges: np.ndarray, var: np.ndarray, colorbar_fig=None,
                          norm: LogNorm | None = None):
    """Var[ℓ | λ] as an image: x = training step (each column spans the window before its flush), y = λ.
    Grey = no estimate (fewer than 2 samples in the bin). `norm` shares one colour scale between panels;
    by default the panel's own robust scale. Returns the mesh (None when no bin has an estimate)."""
    steps = np.asarray(steps, dtype=np.float64)
    x_edges = np.concatenate([[0.0 if steps[0] > 0 else -1.0], steps])
    values = np.ma.masked_invalid(_positive(var).T)                       # (bins, steps)
    ax.set_facecolor("0.88")
    ax.set(xlabel="training step", ylabel=LAMBDA)
    norm = norm or robust_log_norm(values.compressed())
    if values.count() == 0 or norm is None:
        ax.text(0.5, 0.5, "no bin with ≥ 2 samples yet", ha="center", va="center", transform=ax.transAxes)
        return None
    mesh = ax.pcolormesh(x_edges, edges, values, norm=norm, cmap="viridis", shading="flat")
    if colorbar_fig is not None:
        finite = values.compressed()
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
            (bool(finite.min() < norm.vmin), bool(finite.max() > norm.vmax))]
        colorbar_fig.colorbar(mesh, ax=ax, label="Var[ℓ | λ] (squared loss units, log scale)", extend=extend)
    return mesh


def fig_variance_heatmap(run: RunStats) -> Figure:
    fig = Figure(figsize=(9, 5.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    draw_variance_heatmap(ax, run.steps, run.arrays["edges"], run.arrays["loss_var"], colorbar_fig=fig)
    ax.set_title(f"{run.title}\nloss variance over log-SNR and training (grey: fewer than 2 samples)", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------
# density / weight (one run or an overlay of a sweep)
# ---------------------------------------------------------------------------------------------------
def sampling_profile(arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over all flushes: density p(λ) per unit λ, effective weight E[w | λ], and p·E[w] normalised to area 1."""
    count = arrays["count"].astype(np.float64).sum(axis=0)
    width = np.diff(arrays["edges"])
    total = count.sum()
    density = count / max(total, 1.0) / width
    weighted = np.nansum(np.nan_to_num(arrays["weight_mean"].astype(np.float64)) * arrays["count"], axis=0)
    weight = np.where(count > 0, weighted / np.maximum(count, 1.0), np.nan)
    product = density * np.nan_to_num(weight)
    area = (product * width).sum()
    return density, weight, product / area if area > 0 else product


def fig_density_weight(runs: list[RunStats], title: str) -> Figure:
    fig = Figure(figsize=(16, 4.8), dpi=DPI, layout="constrained")
    ax_p, ax_w, ax_pw = fig.subplots(1, 3, sharex=True)
    styles = strategy_styles(r.strategy for r in runs)
    seen: set = set()
    for run in runs:
        density, weight, product = sampling_profile(run.arrays)
        centers = run.arrays["centers"]
        label = run.strategy if run.strategy not in seen else None
        seen.add(run.strategy)
        style = dict(**styles[run.strategy], lw=1.5, alpha=0.85, label=label)
        ax_p.step(centers, density, where="mid", **style)
        ax_w.plot(centers, _positive(weight), marker=".", ms=3, **style)
        ax_pw.plot(centers, _positive(product), marker=".", ms=3, **style)
    ax_p.set(xlabel=LAMBDA, ylabel="p(λ) (fraction of samples per unit λ)", title="sampling density of λ")
    profiles = [sampling_profile(r.arrays) for r in runs]
    _yscale(ax_w, *(p[1] for p in profiles))
    _yscale(ax_pw, *(p[2] for p in profiles))
    ax_w.set(xlabel=LAMBDA, ylabel="E[w | λ] (applied loss weight, dimensionless)", title="effective weight per λ bin")
    ax_pw.set(xlabel=LAMBDA, ylabel="p(λ)·E[w | λ] (normalised to area 1)", title="effective weighting of the objective")
    for ax in (ax_p, ax_w, ax_pw):
        ax.grid(True, alpha=0.3)
    ax_p.legend(title="strategy", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def fig_loss_overlay(runs: list[RunStats], title: str) -> Figure:
    """Mean loss over λ at each run's last flush, one colour per strategy."""
    fig = Figure(figsize=(12, 4.6), dpi=DPI, layout="constrained")
    ax_mean, ax_var = fig.subplots(1, 2, sharex=True)
    styles = strategy_styles(r.strategy for r in runs)
    seen: set = set()
    for run in runs:
        a = run.arrays
        label = run.strategy if run.strategy not in seen else None
        seen.add(run.strategy)
        style = dict(**styles[run.strategy], lw=1.3, ms=3, alpha=0.85, label=label)
        ax_mean.plot(a["centers"], _positive(a["loss_mean"][-1]), marker=".", **style)
        ax_var.plot(a["centers"], _positive(a["loss_var"][-1]), marker=".", **style)
    _yscale(ax_mean, *(r.arrays["loss_mean"][-1] for r in runs))
    _yscale(ax_var, *(r.arrays["loss_var"][-1] for r in runs))
    ax_mean.set(xlabel=LAMBDA, ylabel=f"E[ℓ | λ]: {LOSS}", title="mean loss per λ bin (last flush)")
    ax_var.set(xlabel=LAMBDA, ylabel="Var[ℓ | λ] (squared loss units)", title="loss variance per λ bin (last flush)")
    for ax in (ax_mean, ax_var):
        ax.grid(True, alpha=0.3)
    ax_mean.legend(title="strategy", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _step_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


# Every strategy of conf/weighting/ keeps one colour and one dash in every figure of every sweep (diffrun-plot,
# diffrun-report, any subset of strategies). Append new names; never reorder (old figures would change meaning).
STRATEGY_ORDER = (
    "uniform", "min_snr", "p2", "edm", "sigmoid", "snr", "soft_min_snr", "lognormal", "logit_normal", "importance",
    "variance_aware", "adaptive_timestep", "speed", "debiased", "truncated_snr", "snr_plus_one", "p2_gamma05",
    "sigmoid_density", "adaptive_histogram", "variance_aware_gaussian", "variance_aware_cauchy",
    "variance_aware_zscore", "variance_aware_binned",
)
DASHES = ("-", "--", "-.", ":")
SLOTS = 10 * len(DASHES)       # tab10 colours × dashes: slot i and slot i + 10k differ in dash


def _slot_style(slot: int) -> dict:
    from matplotlib import colormaps

    return {"color": colormaps["tab10"](slot % 10), "ls": DASHES[(slot + slot // 10) % len(DASHES)]}


def strategy_styles(names) -> dict[str, dict]:
    """`{name: {"color", "ls"}}` for matplotlib: a strategy's style depends on its name alone, so that it is the
    same in every figure. Neighbours in STRATEGY_ORDER differ in dash as well as colour, so identical curves
    (strategies that draw the same λ) stay visible. A name diffrun does not know gets a slot from its hash;
    within one call, a slot already taken moves it to the next free one."""
    import zlib

    taken: dict[int, str] = {}
    styles = {}
    for name in sorted(set(names), key=lambda n: (n not in STRATEGY_ORDER, n)):
        slot = STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else zlib.crc32(name.encode()) % SLOTS
        while slot in taken and len(taken) < SLOTS:
            slot = (slot + 1) % SLOTS
        taken[slot] = name
        styles[name] = _slot_style(slot)
    return styles


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def render(root: str | Path, out: str | Path | None = None, steps=None) -> list[Path]:
    """Write the PNGs for a run or a sweep directory; returns their paths."""
    root = Path(root)
    run_dirs = find_runs(root)
    if not run_dirs:
        raise FileNotFoundError(f"no {FILENAME} in {root} or its subdirectories (is it a diffrun run or sweep directory?)")
    out = Path(out) if out else root / "plots"
    runs = [load_run(d) for d in run_dirs]
    runs = [r for r in runs if len(r.steps)]
    written: list[Path] = []
    single = len(run_dirs) == 1 and run_dirs[0] == root
    for run in runs:
        target = out if single else out / run.path.relative_to(root)
        written.append(_save(fig_loss_curves(run, steps), target / "loss_vs_logsnr.png"))
        written.append(_save(fig_variance_heatmap(run), target / "loss_var_heatmap.png"))
    if single:
        written.append(_save(fig_density_weight(runs, f"{runs[0].title}: where λ is sampled and how it is weighted"),
                             out / "density_weight.png"))
    else:
        what = f"sweep {root.name} ({len(runs)} runs, {len({r.strategy for r in runs})} strategies)"
        written.append(_save(fig_density_weight(runs, f"{what}: where λ is sampled and how it is weighted"),
                             out / "density_weight.png"))
        written.append(_save(fig_loss_overlay(runs, f"{what}: loss vs log-SNR at each run's last flush"),
                             out / "loss_vs_logsnr_final.png"))
    return written


def effective_weighting(spec: str, logsnr):
    """(name, W(λ) = p(λ)·w_ε(λ) ÷ its maximum) of a weighting: a conf/weighting option's name or a yaml file of
    one (your own: its `_target_` importable, e.g. with PYTHONPATH=.), on the cosine schedule with σ_data = 0.5
    (Kingma & Gao 2023, arXiv:2303.00848, the ε-space view). Adaptive strategies in their initial state."""
    import torch
    from omegaconf import OmegaConf

    from diffrun import conf_dir  # deferred: torch, only for --weighting curves
    from diffrun.building import build  # deferred
    from diffrun.schedules import CosineSchedule  # deferred

    path = Path(spec) if spec.endswith((".yaml", ".yml")) else conf_dir() / "weighting" / f"{spec}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--weighting {spec}: no such option or yaml file; allowed a name from "
                                f"{conf_dir() / 'weighting'} or a path to your own weighting's yaml")
    strategy = build(OmegaConf.load(path), _keep_meta=("name", "citation"))
    strategy.bind(CosineSchedule(), "eps", 0.5)
    with torch.no_grad():
        log_w = strategy.log_density(logsnr) + torch.log(strategy.weight_in("eps", logsnr))
        if hasattr(strategy, "log_factor_at_init"):
            log_w = log_w + strategy.log_factor_at_init(logsnr)
    return strategy.name, torch.exp(log_w - log_w.max())


def fig_weightings(specs: list[str]):
    import torch

    logsnr = torch.linspace(-15, 15, 1201, dtype=torch.float64)
    curves = [effective_weighting(spec, logsnr) for spec in specs]
    styles = strategy_styles([name for name, _ in curves])
    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for name, w in curves:
        ax.plot(logsnr.numpy(), w.numpy(), label=name, **styles[name])
    ax.set(yscale="log", ylim=(1e-4, 2), xlim=(-15, 15), xlabel="log-SNR λ  (noisy ←  → clean)",
           ylabel="W(λ) = p(λ)·w_ε(λ), ÷ max",
           title="Effective ε-space weighting (cosine schedule, σ_data = 0.5)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffrun-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a run directory (with logsnr_stats.npz) or a sweep directory of runs")
    parser.add_argument("--steps", type=int, nargs="+", help="steps for the loss curves (nearest flush; default: 5 evenly spaced)")
    parser.add_argument("--out", help="output directory (default: PATH/plots; with --weighting: a .png file)")
    parser.add_argument("--weighting", action="append", metavar="NAME_OR_YAML",
                        help="plot W(λ) of this weighting (a conf/weighting name or your yaml; repeat to compare)")
    args = parser.parse_args(argv)
    if args.weighting:
        out = Path(args.out or "weighting.png")
        try:
            print(_save(fig_weightings(args.weighting), out))
        except (FileNotFoundError, DiffrunError) as exc:
            print(f"diffrun-plot: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.path is None:
        parser.error("give a run or sweep directory, or --weighting NAME_OR_YAML")
    try:
        written = render(args.path, args.out, args.steps)
    except FileNotFoundError as exc:
        print(f"diffrun-plot: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
