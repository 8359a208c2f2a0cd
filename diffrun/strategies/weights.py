"""Closed-form weightings w(λ), each in the space its paper writes it in. Sampling: t ~ U[0, 1].

Each class gives `log_weight(λ)` (log w in `space`); `Strategy.weight_in` converts it to the
run's target in log space, so SNR-type weights stay finite at λ → ±∞ where the converted formula is.
Conversions (loss ratios relative to the x0-MSE): eps SNR, v 1 + SNR, edm SNR + 1/σ_data².
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import Strategy, uniform_t_log_density


def _positive(value: float, key: str, paper: str) -> float:
    if value is None or value <= 0:
        raise ConfigError(f"weighting.{key} must be > 0 ({paper}), got {value}")
    return float(value)


class Uniform(Strategy):
    """t ~ U, unweighted loss of the chosen target; for ε-prediction this is DDPM's L_simple (Ho et al. 2020, Eq. 14)."""

    name = "uniform"

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)


class MinSNR(Strategy):
    """Min-SNR-γ (Hang et al., ICCV 2023, arXiv:2303.09556): x0-space w = min(SNR, γ).

    On ε: min(SNR, γ)/SNR; on v: min(SNR, γ)/(SNR + 1); 1 at SNR = 0 (zero terminal SNR).
    """

    name = "min_snr"
    space = "x0"

    def __init__(self, gamma: float = 5.0, **kw):
        super().__init__(**kw)
        self.gamma = _positive(gamma, "gamma", "Min-SNR-γ")

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.clamp(logsnr, max=math.log(self.gamma))          # log min(SNR, γ)


class SNR(Strategy):
    """SNR weighting (Salimans & Ho 2022, arXiv:2202.00512, §4; the ε-MSE written in x0 space): x0-space w = SNR."""

    name = "snr"
    space = "x0"

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return logsnr.clone()                                          # log SNR = λ


class TruncatedSNR(Strategy):
    """Truncated SNR (Salimans & Ho 2022, arXiv:2202.00512, §4): x0-space w = max(SNR, 1)."""

    name = "truncated_snr"
    space = "x0"

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.clamp(logsnr, min=0.0)                            # log max(SNR, 1)


class SNRPlusOne(Strategy):
    """SNR + 1 (Salimans & Ho 2022, arXiv:2202.00512, §4): x0-space w = SNR + 1, i.e. the unweighted v-MSE."""

    name = "snr_plus_one"
    space = "x0"

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return F.softplus(logsnr)                                      # log(1 + e^λ)


class SoftMinSNR(Strategy):
    """Soft-min-SNR (Crowson et al., ICML 2024, arXiv:2401.11605, HDiT §"loss weighting"):
    x0-space w = (1/SNR + 1/γ)⁻¹.

    k-diffusion writes it on the EDM F-loss as (σσ_d)²/(σ² + σ_d²)², i.e. γ = 1/σ_d². `gamma=None`
    takes γ = 1/σ_data² from the run's model; a number fixes γ independently of σ_data.
    """

    name = "soft_min_snr"
    space = "x0"

    def __init__(self, gamma: float | None = 4.0, **kw):
        super().__init__(**kw)
        self.gamma = None if gamma is None else _positive(gamma, "gamma", "soft-min-SNR γ")

    def log_weight(self, logsnr: Tensor) -> Tensor:
        gamma = self.gamma if self.gamma is not None else 1.0 / self.sigma_data**2
        return -torch.logaddexp(-logsnr, torch.full_like(logsnr, -math.log(gamma)))  # −log(1/SNR + 1/γ)


def p2_log_weight(logsnr: Tensor, gamma: float, k: float) -> Tensor:
    """log of the P2 ε-space weight 1/(k + SNR)^γ (Choi et al. 2022), finite at any λ."""
    return -gamma * torch.logaddexp(logsnr, torch.full_like(logsnr, math.log(k)))


class P2(Strategy):
    """Perception-prioritized weighting (Choi et al., CVPR 2022, arXiv:2204.00227):
    ε-space w = 1/(k + SNR)^γ."""

    name = "p2"
    space = "eps"

    def __init__(self, gamma: float = 1.0, k: float = 1.0, **kw):
        super().__init__(**kw)
        if gamma < 0:
            raise ConfigError(f"weighting.gamma must be >= 0 (P2 γ), got {gamma}")
        self.gamma, self.k = float(gamma), _positive(k, "k", "P2 k")

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return p2_log_weight(logsnr, self.gamma, self.k)


class Debiased(Strategy):
    """Debiased estimation (Yu et al. 2023, arXiv:2310.08442): ε-space w = 1/√SNR.

    Infinite at SNR = 0, as the formula is (the cosine schedule's λ ≥ −20 clip bounds it by e^10).
    """

    name = "debiased"
    space = "eps"

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return -0.5 * logsnr                                           # log SNR^(−1/2)


class Sigmoid(Strategy):
    """Sigmoid weighting (Kingma & Gao, NeurIPS 2023, arXiv:2303.00848, §5): w = sigmoid(b − λ) on the ε-loss.

    `density_corrected=False`: a per-sample ε-weight under t ~ U (as StableCascade's GDF and BayesFlow apply
    it), so the effective λ-weighting is p(λ)·sigmoid(b − λ); note sigmoid(b − λ) = e^b/(e^b + SNR), i.e.
    e^b · P2(k = e^b, γ = 1). `True`: divide by the schedule's p(λ) (the paper's −dλ/dt factor), so the
    effective λ-weighting is exactly sigmoid(b − λ), for any schedule.
    """

    name = "sigmoid"
    space = "eps"

    def __init__(self, bias: float = 2.0, density_corrected: bool = False, **kw):
        super().__init__(**kw)
        self.bias, self.density_corrected = float(bias), bool(density_corrected)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        log_w = F.logsigmoid(self.bias - logsnr)
        if self.density_corrected:
            log_w = log_w - uniform_t_log_density(self.schedule, logsnr)
        return log_w
