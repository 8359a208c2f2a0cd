"""The noise levels a sampler visits, as Python floats (float64; host-side, so no device syncs).

λ grids run from the noisiest level to the least noisy one at which the network is evaluated; the last
evaluation returns x̂0. Heun's grid is in EDM's σ (z/α = x + σ n, σ² = e^{−λ}) and ends with σ = 0.
"""
from __future__ import annotations

import math

import torch

from diffrun.errors import ConfigError
from diffrun.schedules import NoiseSchedule

DDPM_TIMESTEPS = 1000  # T of the DDPM grid when the schedule is continuous (Ho et al. 2020)


def grid_size(schedule: NoiseSchedule) -> int:
    """T of the discrete grid: `schedule.timesteps`, else DDPM's 1000."""
    return schedule.timesteps or DDPM_TIMESTEPS


def continuous_logsnr_grid(schedule: NoiseSchedule, steps: int) -> list[float]:
    """λ(t_i), t_i = 1 − i/N for i = 0..N−1 (uniform in continuous t; the last evaluation is at t = 1/N)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return schedule.logsnr(t).tolist()


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` of the T timesteps (0-based, 0 = least noisy), evenly strided from 0 to T − 1 and rounded as
    improved-diffusion's `space_timesteps(T, [steps])` does (respace.py), noisiest first."""
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    position, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(position))
        position += stride  # accumulated as improved-diffusion accumulates it, so that rounding ties agree
    return sorted(set(taken), reverse=True)


def discrete_logsnr_grid(schedule: NoiseSchedule, steps: int, key: str = "sample") -> list[float]:
    """λ of the DDPM T-step table (`schedule.discrete_logsnr(T)`) at `steps` respaced timesteps, noisiest first."""
    T = grid_size(schedule)
    if steps > T:
        raise ConfigError(f"{key}.steps={steps} is not allowed: the DDPM grid has T = {T} steps "
                          f"(schedule.timesteps, else 1000); use steps <= {T}")
    table = schedule.discrete_logsnr(T)
    return [float(table[k]) for k in respaced_timesteps(T, steps)]


def schedule_sigmas(schedule: NoiseSchedule) -> torch.Tensor | None:
    """EDM σ of every level of the discrete grid (ascending), or None for a continuous schedule."""
    if schedule.timesteps is None:
        return None
    return torch.exp(-schedule.discrete_logsnr(schedule.timesteps) / 2)


def round_sigma(sigma: float, grid: torch.Tensor | None) -> float:
    """The nearest σ the network was trained at: itself in continuous time, else the nearest grid level
    (EDM's `iDDPMPrecond.round_sigma` for a discrete-time network)."""
    if grid is None:
        return sigma
    return float(grid[(grid - sigma).abs().argmin()])


def edm_sigma_grid(schedule: NoiseSchedule, steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1, then σ_N = 0 (Karras et al. 2022,
    Eq. 5), with [σ_min, σ_max] clipped to what the schedule supports and each level rounded to it (EDM `edm_sampler`)."""
    grid = schedule_sigmas(schedule)
    sigma_min = max(sigma_min, math.exp(-schedule.logsnr_max / 2))
    sigma_max = min(sigma_max, math.exp(-schedule.logsnr_min / 2))
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (steps - 1) * (lo - hi)) ** rho
    return [round_sigma(float(s), grid) for s in sigmas] + [0.0]
