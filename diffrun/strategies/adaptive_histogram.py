"""Adaptive noise schedule by a log-SNR histogram (Kingma & Gao, NeurIPS 2023, arXiv:2303.00848, App. F).

The objective is fixed by a base strategy: E_{λ~p0}[w(λ) L(λ)] with p0 its λ-density and w its weight.
λ is instead drawn from a piecewise-constant proposal q whose bin masses track an EMA of the integrand
p0(λ) w(λ) L(λ) (the variance-minimising proposal is ∝ that integrand); each sample is weighted by
p0(λ)/q(λ). So the objective is unchanged (on [λ_min, λ_max]) and only the Monte-Carlo variance falls.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw, Strategy
from diffrun.strategies.ops import bin_index, sample_categorical, scatter_moments
from diffrun.strategies.weights import Uniform


class AdaptiveHistogram(Strategy):
    """Importance-sample λ from a histogram of the EMA weighted loss; weight p0/q (unbiased).

    `base`: any strategy with a closed-form density and weight (weights.py, densities.py); default
    `Uniform()`, i.e. t ~ U on the run's schedule and weight 1 on the target loss, so the objective is
    exactly the `uniform` strategy's E_{t~U}[‖F − F*‖²]. Bins span [logsnr_min, logsnr_max] (default:
    the schedule's range); base mass outside it is dropped from the objective.
    Bins never observed count as the mean of the observed ones (all equal before the first step).
    """

    name = "adaptive_histogram"
    observes = True
    supports_timesteps = False

    def __init__(self, bins: int = 100, ema: float = 0.99, uniform_mix: float = 0.01, base: Strategy | None = None,
                 logsnr_min: float | None = None, logsnr_max: float | None = None, **kw):
        super().__init__(**kw)
        if bins < 1:
            raise ConfigError(f"weighting.bins must be >= 1, got {bins}")
        if not 0.0 <= ema < 1.0:
            raise ConfigError(f"weighting.ema must be in [0, 1), got {ema}")
        if not 0.0 < uniform_mix <= 1.0:
            raise ConfigError(f"weighting.uniform_mix must be in (0, 1] (keeps q > 0 on every bin), got {uniform_mix}")
        self.bins, self.ema, self.uniform_mix = bins, ema, uniform_mix
        self.base = base if base is not None else Uniform()
        self.space = self.base.space
        self._range = (logsnr_min, logsnr_max)
        self.register_buffer("bin_value", torch.ones(bins))                  # EMA of p0·w·L per bin
        self.register_buffer("bin_count", torch.zeros(bins, dtype=torch.long))  # samples seen per bin

    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        self.base.bind(schedule, prediction, sigma_data, comm)
        lo = schedule.logsnr_min if self._range[0] is None else float(self._range[0])
        hi = schedule.logsnr_max if self._range[1] is None else float(self._range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"weighting.logsnr_min/max must be finite with min < max, got {lo}, {hi}")
        self.lo, self.hi = lo, hi
        return self

    # --- the proposal -------------------------------------------------------------------------
    def bin_probabilities(self) -> Tensor:
        seen = self.bin_count > 0
        fill = (self.bin_value * seen).sum() / seen.sum().clamp(min=1)
        value = torch.where(seen, self.bin_value, torch.where(seen.any(), fill, torch.ones_like(fill)))
        value = value.clamp(min=0.0)
        total = value.sum()
        p = torch.where(total > 0, value / total.clamp(min=1e-30), torch.full_like(value, 1.0 / self.bins))
        return p * (1 - self.uniform_mix) + self.uniform_mix / self.bins

    def sample(self, x0: Tensor) -> NoiseDraw:
        width = (self.hi - self.lo) / self.bins
        p = self.bin_probabilities()
        b = sample_categorical(p, x0.shape[0])
        logsnr = (self.lo + (b + torch.rand(b.shape, device=b.device, dtype=torch.float64)) * width).float()
        log_q = torch.log(p[b] / width)
        ratio = torch.exp(self.base.log_density(logsnr) - log_q).float()     # p0(λ)/q(λ)
        return NoiseDraw(logsnr=logsnr, proposal_weight=ratio, t=self.schedule.t_of_logsnr(logsnr))

    # --- objective: the base's density and weight -----------------------------------------------
    def log_weight(self, logsnr: Tensor) -> Tensor:
        return self.base.log_weight(logsnr)

    def log_density(self, logsnr: Tensor) -> Tensor:
        return self.base.log_density(logsnr)

    @torch.no_grad()
    def observe(self, draw: NoiseDraw, loss: Tensor, good: Tensor) -> None:
        logsnr = draw.logsnr
        integrand = torch.exp(self.base.log_density(logsnr)) * self.weight_in(self.prediction, logsnr) * loss
        b = bin_index(logsnr, self.lo, self.hi, self.bins)
        count, total, _ = scatter_moments(b, integrand.nan_to_num(0.0), self.bins)
        count = count * good                                                    # a skipped step changes nothing
        mean = total / count.clamp(min=1)
        updated = torch.where(self.bin_count > 0, self.ema * self.bin_value + (1 - self.ema) * mean, mean)
        self.bin_value.copy_(torch.where(count > 0, updated, self.bin_value))
        self.bin_count.add_(count.long())
