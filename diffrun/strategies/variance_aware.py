"""Variance-aware adaptive weighting (Sun & Shi 2026, arXiv:2603.10391; code "to be released").

The paper keeps EDM's log-normal sampling and multiplies the EDM loss by an extra per-sample factor.
Its three public descriptions disagree, so each is a `variant` (see docs/strategies.md):
  gaussian     w = exp(−α(λ − μ)²), μ = batch-mean log-SNR             (paper Eq. 13)
  cauchy       w = 1/(1 + α(λ − μ)²)                                    (paper App. D, Alg. 1, line 12)
  loss_zscore  w = 1 + α(ℓ_i − mean ℓ)/std ℓ over the batch             (official README)
None of them estimates a loss variance. `BinnedVariance` implements what the abstract describes:
per-log-SNR-bin EMA estimates of the loss variance, and weights ∝ σ_b^exponent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw
from diffrun.strategies.densities import EDM
from diffrun.strategies.ops import bin_index, scatter_moments

VARIANTS = ("gaussian", "cauchy", "loss_zscore")


def batch_sums(values: Tensor, comm) -> tuple[Tensor, Tensor, Tensor]:
    """(n, Σx, Σx²) of the global batch in float64: this rank's sums, added over DDP ranks by `comm`."""
    x = values.detach().double()
    sums = torch.stack([torch.full((), x.numel(), dtype=x.dtype, device=x.device), x.sum(), x.square().sum()])
    n, total, total_sq = comm.summed(sums).unbind()
    return n, total, total_sq


class VarianceAware(EDM):
    """EDM sampling and weight × a batch-centred factor (`variant`, see the module docstring).

    μ is the mean λ of the global batch (all DDP ranks). For `loss_zscore`, ℓ is the EDM-weighted per-sample
    loss (the F-loss for prediction=edm; the README writes ℓ as the ε-MSE of its ε-parameterised
    description); the factor is clamped at 0 (it can only go negative for |z| > 1/α, i.e. never for
    α = 0.05 and batches below 400). `normalize=True` divides the factor by its batch mean (the paper
    does not say; default off).
    """

    name = "variance_aware"

    def __init__(self, variant: str = "gaussian", alpha: float = 0.05, normalize: bool = False,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float | None = None, **kw):
        super().__init__(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data, **kw)
        if variant not in VARIANTS:
            raise ConfigError(f"weighting.variant={variant!r}: allowed {', '.join(VARIANTS)}")
        if alpha < 0:
            raise ConfigError(f"weighting.alpha must be >= 0, got {alpha}")
        self.variant, self.alpha, self.normalize = variant, float(alpha), bool(normalize)

    def factor(self, logsnr: Tensor, weighted_loss: Tensor) -> Tensor:
        """The per-sample factor. Batch statistics (μ, mean/std of ℓ, the normaliser) are over the global
        batch: summed over DDP ranks (one small all-reduce), so the factor does not depend on world size."""
        if self.variant == "loss_zscore":
            n, total, total_sq = batch_sums(weighted_loss, self.comm)
            mean = total / n
            std = ((total_sq - n * mean**2).clamp(min=0.0) / (n - 1).clamp(min=1)).sqrt()
            z = (weighted_loss - mean.float()) / std.float().clamp(min=1e-12)
            w = torch.where(n >= 2, (1 + self.alpha * z).clamp(min=0.0), torch.ones_like(weighted_loss))
        else:
            n, total, _ = batch_sums(logsnr, self.comm)
            d2 = (logsnr - (total / n).float()) ** 2
            w = torch.exp(-self.alpha * d2) if self.variant == "gaussian" else 1 / (1 + self.alpha * d2)
        if self.normalize:
            n, total, _ = batch_sums(w, self.comm)
            w = w / (total / n).float().clamp(min=1e-12)
        return w

    def loss_weights(self, draw: NoiseDraw, loss: Tensor) -> Tensor:
        base = self.weight_in(self.prediction, draw.logsnr)                     # EDM λ(σ) on the target loss
        return base * self.factor(draw.logsnr, (base * loss).detach()).detach() * draw.proposal_weight

    def log_factor_at_init(self, logsnr: Tensor) -> Tensor:
        """log of the expected factor at λ for plots: μ → E[λ] = −2 P_mean (large batch); z-score → 0."""
        if self.variant == "loss_zscore":
            return torch.zeros_like(logsnr)
        d2 = (logsnr + 2 * self.p_mean) ** 2
        return -self.alpha * d2 if self.variant == "gaussian" else -torch.log1p(self.alpha * d2)


class BinnedVariance(EDM):
    """EDM sampling and weight × w_b, w_b ∝ σ_b^exponent, σ_b² the per-log-SNR-bin loss variance.

    Rule (one choice where the paper gives none; every knob is a parameter):
      * ℓ = EDM-weighted per-sample loss. Per bin b (equal width on [logsnr_min, logsnr_max], outer bins
        take the tails): EMA (rate `ema`, per step in which the bin is hit; the first hit initialises)
        of the batch means of ℓ and ℓ²; σ_b² = E[ℓ²] − E[ℓ]².
      * bins with fewer than `min_count` samples so far get the P-weighted mean log-weight of the others;
      * w_b = σ_b^exponent, normalised so that Σ_b P_b w_b = 1 with P_b the log-normal mass of bin b
        (mean 1 under the sampling density), then clipped to `clip` (so the mean is ≈ 1 after clipping);
      * w = 1 for the first `warmup` observed steps.
    exponent = −1 down-weights noisy-loss levels (inverse-std weighting); +1 would be the abstract's
    "p* ∝ σ(λ)" (paper Eq. 11) applied as a weight.
    """

    name = "variance_aware_binned"
    observes = True

    def __init__(self, bins: int = 25, logsnr_min: float = -10.0, logsnr_max: float = 15.0, exponent: float = -1.0,
                 clip: Sequence[float] = (0.2, 5.0), ema: float = 0.99, warmup: int = 500, min_count: int = 16,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float | None = None, **kw):
        super().__init__(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data, **kw)
        clip = tuple(float(c) for c in clip)
        if bins < 1 or not logsnr_min < logsnr_max:
            raise ConfigError(f"weighting.bins must be >= 1 and logsnr_min < logsnr_max, got {bins}, "
                              f"{logsnr_min}, {logsnr_max}")
        if len(clip) != 2 or not 0 < clip[0] <= 1 <= clip[1]:
            raise ConfigError(f"weighting.clip must be [low, high] with 0 < low <= 1 <= high, got {list(clip)}")
        if not 0.0 <= ema < 1.0 or warmup < 0 or min_count < 2:
            raise ConfigError(f"weighting.ema in [0, 1), warmup >= 0, min_count >= 2; got {ema}, {warmup}, {min_count}")
        self.bins, self.lo, self.hi = bins, float(logsnr_min), float(logsnr_max)
        self.exponent, self.clip, self.ema = float(exponent), clip, float(ema)
        self.warmup, self.min_count = int(warmup), int(min_count)
        self.register_buffer("loss_mean", torch.zeros(bins))
        self.register_buffer("loss_sq", torch.zeros(bins))
        self.register_buffer("count", torch.zeros(bins))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # P_b: mass of λ ~ N(−2 P_mean, (2 P_std)²) in each bin, outer bins including the tails.
        edges = torch.linspace(self.lo, self.hi, bins + 1, dtype=torch.float64)
        cdf = 0.5 * (1 + torch.erf((edges + 2 * self.p_mean) / (2 * self.p_std * math.sqrt(2))))
        cdf[0], cdf[-1] = 0.0, 1.0
        self.register_buffer("bin_mass", (cdf[1:] - cdf[:-1]).float(), persistent=False)

    def bin_weights(self) -> Tensor:
        var = (self.loss_sq - self.loss_mean**2).clamp(min=0.0)
        ok = (self.count >= self.min_count) & (var > 0)
        log_w = self.exponent * 0.5 * torch.log(torch.where(ok, var, torch.ones_like(var)))
        mass = self.bin_mass * ok
        fill = (mass * log_w).sum() / mass.sum().clamp(min=1e-30)
        w = torch.exp(torch.where(ok, log_w, fill))
        w = (w / (self.bin_mass * w).sum()).clamp(*self.clip)
        return torch.where(self.steps >= self.warmup, w, torch.ones_like(w))

    def loss_weights(self, draw: NoiseDraw, loss: Tensor) -> Tensor:
        base = self.weight_in(self.prediction, draw.logsnr)
        w_bin = self.bin_weights()[bin_index(draw.logsnr, self.lo, self.hi, self.bins)]
        return base * w_bin * draw.proposal_weight

    @torch.no_grad()
    def observe(self, draw: NoiseDraw, loss: Tensor, good: Tensor) -> None:
        ell = (self.weight_in(self.prediction, draw.logsnr) * loss).nan_to_num(0.0)
        b = bin_index(draw.logsnr, self.lo, self.hi, self.bins)
        n, s1, s2 = scatter_moments(b, ell, self.bins)
        n = n * good                                                            # a skipped step changes nothing
        hit, first = n > 0, self.count == 0
        for state, batch in ((self.loss_mean, s1 / n.clamp(min=1)), (self.loss_sq, s2 / n.clamp(min=1))):
            updated = torch.where(first, batch, self.ema * state + (1 - self.ema) * batch)
            state.copy_(torch.where(hit, updated, state))
        self.count.add_(n)
        self.steps.add_(good.long())

    def log_factor_at_init(self, logsnr: Tensor) -> Tensor:
        """Warm-up state: factor 1."""
        return torch.zeros_like(logsnr)
