"""The log-SNR axis shared by every schedule, strategy and sampler."""
from __future__ import annotations

import torch
from torch import Tensor


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP coefficients from log-SNR: α² = sigmoid(λ), σ² = sigmoid(−λ) (Kingma et al. 2021, VDM §2)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def snr(logsnr: Tensor) -> Tensor:
    """SNR = α²/σ² = exp(λ)."""
    return logsnr.exp()


class NoiseSchedule:
    """A monotone decreasing log-SNR curve λ(t), t ∈ [0, 1].

    Subclasses implement `logsnr(t)` and `t_of_logsnr(λ)`. `discrete_logsnr(T)` gives the T-step
    variant (t_k = k/T, k = 1..T) used by methods defined on integer timesteps (importance
    sampling, adaptive timestep sampling, DDPM ancestral sampling with T steps).
    """

    name: str = "schedule"

    def logsnr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def logsnr_min(self) -> float:
        return float(self.logsnr(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def logsnr_max(self) -> float:
        return float(self.logsnr(torch.tensor(0.0, dtype=torch.float64)))

    def discrete_logsnr(self, num_timesteps: int) -> Tensor:
        """λ at t_k = k/T for k = 1..T (index 0 ↔ the least noisy step), float64."""
        k = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
        return self.logsnr(k / num_timesteps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(λ ∈ [{self.logsnr_min:.2f}, {self.logsnr_max:.2f}])"
