"""The log-SNR axis shared by every schedule, strategy and sampler."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.building import build_failure, build_spec, spec_values
from diffrun.errors import ConfigError


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP coefficients from log-SNR: α² = sigmoid(λ), σ² = sigmoid(−λ) (Kingma et al. 2021, VDM §2)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def require(ok: bool, key: str, value, allowed: str) -> None:
    """ConfigError naming `schedule.<key>`, its value and the allowed range unless `ok`.

    Written so that NaN fails: every bound is a comparison, and NaN compares False."""
    if not ok:
        raise ConfigError(f"schedule.{key}={value!r} is out of range: allowed {allowed}")


def is_real(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class NoiseSchedule:
    """A monotone decreasing log-SNR curve λ(t), t ∈ [0, 1].

    Subclasses implement `logsnr(t)` and `t_of_logsnr(λ)`. `discrete_logsnr(T)` gives the T-step
    variant (t_k = k/T, k = 1..T) used by methods defined on integer timesteps (importance
    sampling, adaptive timestep sampling, DDPM ancestral sampling with T steps).

    `timesteps`: None trains in continuous time (t ~ U[0, 1]); an integer T trains on the DDPM grid
    (k ~ U{1..T}, λ = `discrete_logsnr(T)[k − 1]`), and `logsnr_min/max` are then that grid's ends.
    """

    name: str = "schedule"

    def __init__(self, timesteps: int | None = None):
        require(timesteps is None or (isinstance(timesteps, int) and not isinstance(timesteps, bool)
                                      and timesteps >= 2),
                "timesteps", timesteps, "null (continuous t) or an integer >= 2 (discrete DDPM steps)")
        self.timesteps = timesteps

    def logsnr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def logsnr_min(self) -> float:
        if self.timesteps is not None:
            return float(self.discrete_logsnr(self.timesteps)[-1])
        return float(self.logsnr(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def logsnr_max(self) -> float:
        if self.timesteps is not None:
            return float(self.discrete_logsnr(self.timesteps)[0])
        return float(self.logsnr(torch.tensor(0.0, dtype=torch.float64)))

    def discrete_logsnr(self, num_timesteps: int) -> Tensor:
        """λ at t_k = k/T for k = 1..T (index 0 ↔ the least noisy step), float64."""
        k = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
        return self.logsnr(k / num_timesteps)

    def timestep_table(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Tensor:
        """`discrete_logsnr(timesteps)`, computed once per device and dtype (per-step callers stay on the device).
        The trainer makes its tables at setup: first made inside a CUDA-graph-captured step, a table would live in
        the graph's memory pool and the next step would recompile."""
        cache = self.__dict__.setdefault("_timestep_tables", {})
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:   # "cuda" and "cuda:0" are one table
            device = torch.device("cuda", torch.cuda.current_device())
        key = (str(device), dtype)
        if key not in cache:
            cache[key] = self.discrete_logsnr(self.timesteps).to(device=device, dtype=dtype)
        return cache[key]

    def __repr__(self) -> str:
        grid = f", T = {self.timesteps}" if self.timesteps is not None else ""
        return f"{type(self).__name__}(λ ∈ [{self.logsnr_min:.2f}, {self.logsnr_max:.2f}]{grid})"


def build_schedule(spec: dict):
    """The schedule, with λ(t) probed on [0, 1]: no NaN, and decreasing from λ(0) to λ(1)."""
    schedule = build_spec(spec, "schedule")
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    try:
        logsnr = schedule.logsnr(t)
    except Exception as exc:
        raise build_failure("schedule", spec, "λ(t) on t ∈ [0, 1]", exc) from None
    bad = torch.isnan(logsnr)
    rises = logsnr[1:] > logsnr[:-1]
    if bad.any() or rises.any() or not logsnr[0] > logsnr[-1]:
        where = f"is NaN at t={float(t[bad][0]):.3g}" if bad.any() else (
            f"rises at t={float(t[1:][rises][0]):.3g}" if rises.any() else "is constant")
        raise ConfigError(f"schedule ({spec_values(spec, 'schedule')}): its log-SNR λ(t) {where}; allowed values "
                          f"give a λ(t) that decreases from t=0 to t=1 without NaN")
    return schedule
