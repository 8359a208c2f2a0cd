"""Effective ε-space weighting W(λ) = p(λ)·w_ε(λ) of every conf/weighting/*.yaml (Kingma & Gao 2023 view).

    python scripts/plot_weightings.py [--out docs/figures/effective_weighting.png]

Cosine schedule (Nichol & Dhariwal 2021), σ_data = 0.5, λ ∈ [−15, 15]. p(λ) is the density the objective is
defined under (the base density for importance-corrected samplers); w_ε the per-sample weight re-expressed on
the ε-MSE. Adaptive strategies are drawn in their initial state (importance, adaptive_histogram: their unbiased
objective = uniform; adaptive_timestep: the initial Beta(0.974, 0.974) policy; variance_aware: μ = E[λ] = 2.4;
z-score and binned: factor 1). Each curve is divided by its maximum on the plotted range.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffrun.monitoring import plots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PANELS = {
    "x0-space SNR family (t ~ U)": ["uniform", "snr", "truncated_snr", "snr_plus_one", "min_snr", "soft_min_snr"],
    "ε-space weights (t ~ U)": ["uniform", "p2", "p2_gamma05", "debiased", "sigmoid", "sigmoid_density"],
    "noise-level densities": ["uniform", "edm", "edm_narrow", "lognormal", "logit_normal", "speed", "speed_p2"],
    "adaptive (initial state)": ["uniform", "importance", "adaptive_histogram", "adaptive_timestep",
                                 "variance_aware_gaussian", "variance_aware_cauchy", "variance_aware_zscore",
                                 "variance_aware_binned"],
}
# curves that coincide on this plot, said in the legend instead of hidden under each other
NOTES = {
    "uniform": "uniform (ε-MSE, t ~ U)",
    "snr": "snr (= uniform on ε)",
    "debiased": "debiased (≡ K&G sigmoid(−λ) on cosine)",
    "importance": "importance (objective = uniform)",
    "adaptive_histogram": "adaptive_histogram (objective = uniform)",
    "adaptive_timestep": "adaptive_timestep (initial Beta)",
    "variance_aware_zscore": "variance_aware_zscore (factor drawn as 1 = edm)",
    "variance_aware_binned": "variance_aware_binned (= edm in warm-up)",
    "speed": "speed (T = 1000 steps, τ = 700, M = 959 on cosine)",
    "speed_p2": "speed_p2 (tanh levels, P2 weight)",
}
STYLES = [(0, ()), (0, (6, 2)), (0, (2, 1.5)), (0, (8, 2, 2, 2)), (0, (3, 3)), (0, (1, 1)), (0, (10, 3)),
          (0, (4, 1, 1, 1))]


def effective_weighting(name: str, logsnr: torch.Tensor) -> torch.Tensor:
    return plots.effective_weighting(name, logsnr)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures" / "effective_weighting.png"))
    args = parser.parse_args()
    logsnr = torch.linspace(-15, 15, 1201, dtype=torch.float64)
    fig, axes = plt.subplots(2, 2, figsize=(16, 9.5), sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, names) in zip(axes.flat, PANELS.items()):
        for i, name in enumerate(names):
            w = effective_weighting(name, logsnr)
            if name == "uniform":
                ax.plot(logsnr, w, color="0.6", lw=3.5, alpha=0.6, label=NOTES[name], zorder=1)
            else:
                ax.plot(logsnr, w, color=colors[(i - 1) % len(colors)], ls=STYLES[(i - 1) % len(STYLES)], lw=1.9,
                        label=NOTES.get(name, name), zorder=2)
        ax.set_title(title, fontsize=12)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 2)
        ax.set_xlim(-15, 15)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    for ax in axes[1]:
        ax.set_xlabel("log-SNR λ  (noisy ←  → clean)")
    for ax in axes[:, 0]:
        ax.set_ylabel("W(λ) = p(λ)·w_ε(λ), ÷ max")
    fig.suptitle("Effective ε-space weighting on the cosine schedule "
                 "(σ_data = 0.5; adaptive methods at their initial state)", fontsize=13)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
