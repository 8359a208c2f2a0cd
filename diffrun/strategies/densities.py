"""Strategies that change the noise-level *density* (not importance-corrected).

Drawing λ from a density other than the schedule's uniform-t density changes the effective
weighting p(λ)·w(λ) (Kingma & Gao 2023, §3): these are weightings, not variance reduction.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw, Strategy, uniform_t_log_density

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_pdf(x: Tensor, mean: float, std: float) -> Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - _LOG_SQRT_2PI


class LogNormal(Strategy):
    """EDM's noise-level density (Karras et al., NeurIPS 2022, arXiv:2206.00364, Table 1 / `EDMLoss`):
    ln σ ~ N(P_mean, P_std²) with σ EDM's variance-exploding noise level, λ = −2 ln σ,
    i.e. λ ~ N(−2 P_mean, (2 P_std)²) = N(2.4, 2.4²) for the defaults. Unweighted loss of the target.
    λ is not clipped to the schedule's range (EDM does not clip either)."""

    name = "lognormal"
    supports_timesteps = False

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, **kw):
        super().__init__(**kw)
        if p_std <= 0:
            raise ConfigError(f"weighting.p_std must be > 0 (log-normal std of ln σ), got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, x0: Tensor) -> NoiseDraw:
        ln_sigma = self.p_mean + self.p_std * torch.randn(x0.shape[0], device=x0.device)
        logsnr = -2 * ln_sigma                                          # λ = −2 ln σ
        return NoiseDraw(logsnr=logsnr, proposal_weight=torch.ones_like(logsnr),
                         t=self.schedule.t_of_logsnr(logsnr))

    def log_density(self, logsnr: Tensor) -> Tensor:
        return _normal_log_pdf(logsnr, -2 * self.p_mean, 2 * self.p_std)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)


class EDM(LogNormal):
    """EDM (Karras et al. 2022, Table 1; NVlabs/edm `training/loss.py::EDMLoss`): log-normal σ and, on the denoiser (x0)
    loss, λ(σ) = (σ² + σ_d²)/(σ σ_d)² = SNR + 1/σ_d². With prediction=edm the weight on F is exactly 1;
    on ε it is 1 + e^{−λ}/σ_d². `sigma_data=None` uses the model's σ_data (bound by the trainer)."""

    name = "edm"
    space = "x0"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float | None = None, **kw):
        super().__init__(p_mean=p_mean, p_std=p_std, **kw)
        if sigma_data is not None and sigma_data <= 0:
            raise ConfigError(f"weighting.sigma_data must be > 0 or null, got {sigma_data}")
        self.weight_sigma_data = sigma_data

    def log_weight(self, logsnr: Tensor) -> Tensor:
        sd = self.weight_sigma_data or self.sigma_data
        return torch.logaddexp(logsnr, torch.full_like(logsnr, -2 * math.log(sd)))  # log(SNR + 1/σ_d²)


class LogitNormal(Strategy):
    """Logit-normal timesteps (Esser et al., SD3, ICML 2024, arXiv:2403.03206, §3.1 "rf/lognorm(m, s)"):
    t = sigmoid(u), u ~ N(m, s²), mapped through the run's schedule (λ = schedule.logsnr(t)); unweighted.

    On SD3's rectified-flow schedule this is λ ~ N(−2m, 4s²); on other schedules the λ-density differs.
    """

    name = "logit_normal"
    supports_timesteps = False

    def __init__(self, m: float = 0.0, s: float = 1.0, **kw):
        super().__init__(**kw)
        if s <= 0:
            raise ConfigError(f"weighting.s must be > 0 (logit-normal scale), got {s}")
        self.m, self.s = float(m), float(s)

    def sample(self, x0: Tensor) -> NoiseDraw:
        t = torch.sigmoid(self.m + self.s * torch.randn(x0.shape[0], device=x0.device))
        logsnr = self.schedule.logsnr(t).float()
        return NoiseDraw(logsnr=logsnr, proposal_weight=torch.ones_like(logsnr), t=t)

    def log_density(self, logsnr: Tensor) -> Tensor:
        t = self.schedule.t_of_logsnr(logsnr.double()).clamp(1e-12, 1 - 1e-12)
        log_pt = _normal_log_pdf(torch.logit(t), self.m, self.s) - torch.log(t * (1 - t))
        return (log_pt + uniform_t_log_density(self.schedule, logsnr.double())).to(logsnr.dtype)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)
