"""The published schedules as λ(t). Once committed, a schedule's formula is never changed:
add a new name instead (the improved-diffusion policy for `get_named_beta_schedule`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.schedules.base import NoiseSchedule


class LinearSchedule(NoiseSchedule):
    """DDPM linear betas (Ho et al. 2020): β from `beta_start` to `beta_end` over T = 1000 steps.

    Continuous form (Song et al. 2021, VP-SDE; NVlabs/edm `VPLoss`): β(t) = β_min + t β_d with
    β_min = T·beta_start, β_d = T·(beta_end − beta_start), so
        λ(t) = −log(expm1(β_min t + ½ β_d t²)).
    `discrete_logsnr(T)` uses the exact DDPM product ᾱ_t = ∏(1 − β_s) with betas rescaled by 1000/T
    (improved-diffusion's `scale = 1000 / T`).
    """

    name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, t_min: float = 1e-5):
        if not 0 < beta_start < beta_end < 1:
            raise ConfigError(
                f"schedule.beta_start/beta_end must satisfy 0 < beta_start < beta_end < 1, "
                f"got {beta_start}, {beta_end}"
            )
        self.beta_start, self.beta_end, self.t_min = beta_start, beta_end, t_min
        self.beta_min = 1000 * beta_start
        self.beta_d = 1000 * (beta_end - beta_start)

    def _integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def logsnr(self, t: Tensor) -> Tensor:
        t = t.clamp(min=self.t_min)
        return -torch.log(torch.expm1(self._integral(t)))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        # Solve ½β_d t² + β_min t − log(1 + e^{−λ}) = 0 for t ≥ 0.
        c = torch.nn.functional.softplus(-logsnr)
        t = (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * c)) / self.beta_d
        return t.clamp(0.0, 1.0)

    def discrete_logsnr(self, num_timesteps: int) -> Tensor:
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * self.beta_start, scale * self.beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


class CosineSchedule(NoiseSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t+s)/(1+s)).

    Ignoring the tiny f(0) normalisation, λ(t) = −2 log tan(π/2 · (t+s)/(1+s)). improved-diffusion
    clips β ≤ 0.999, which bounds λ from below near t = 1; we clip λ at `logsnr_min` (−20 ≈ that clip)
    so that ε-prediction can still recover x0 at the noisiest step.
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, logsnr_min: float = -20.0):
        self.s, self.min_logsnr = s, logsnr_min
        self._f0 = math.cos(math.pi / 2 * s / (1 + s)) ** 2

    def logsnr(self, t: Tensor) -> Tensor:
        alpha_bar = torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s)) ** 2 / self._f0
        alpha_bar = alpha_bar.clamp(0.0, 1.0 - 1e-12)
        lam = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        return lam.clamp(min=self.min_logsnr)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        alpha_bar = torch.sigmoid(logsnr) * self._f0
        t = torch.acos(alpha_bar.sqrt().clamp(max=1.0)) * 2 / math.pi * (1 + self.s) - self.s
        return t.clamp(0.0, 1.0)


class ShiftedCosineSchedule(NoiseSchedule):
    """Shifted cosine (Hoogeboom et al. 2023, simple diffusion §3.1): λ(t) = λ_cos(t) + 2 log(base/res).

    λ_cos here is the truncated continuous cosine of k-diffusion: −2 log tan(t_min + t (t_max − t_min)),
    with t_min, t_max from [logsnr_min, logsnr_max] before shifting. `base_resolution` 64 with a
    32-pixel image shifts λ up by 2 log 2 (less noise), as in the paper's table.
    """

    name = "shifted_cosine"

    def __init__(self, image_size: int = 32, base_resolution: int = 64,
                 logsnr_min: float = -15.0, logsnr_max: float = 15.0):
        if image_size <= 0 or base_resolution <= 0:
            raise ConfigError("schedule.image_size and schedule.base_resolution must be positive")
        self.shift = 2 * math.log(base_resolution / image_size)
        self.t_lo = math.atan(math.exp(-logsnr_max / 2))
        self.t_hi = math.atan(math.exp(-logsnr_min / 2))

    def logsnr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(torch.tan(self.t_lo + t * (self.t_hi - self.t_lo))) + self.shift

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        u = torch.atan(torch.exp(-(logsnr - self.shift) / 2))
        return ((u - self.t_lo) / (self.t_hi - self.t_lo)).clamp(0.0, 1.0)


class EDMSchedule(NoiseSchedule):
    """EDM's σ grid as a schedule (Karras et al. 2022, Eq. 5): σ(t) = (σ_min^{1/ρ} + t(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ.

    λ = −2 log σ, where σ is EDM's variance-exploding noise level (z/α = x + σ n). Training with
    t ~ U on this schedule draws σ with the sampler's spacing; the `edm` strategy instead draws
    ln σ ~ N(P_mean, P_std²) and ignores t.
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"schedule.sigma_min must be in (0, sigma_max), got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def logsnr(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = (lo + t * (hi - lo)) ** self.rho
        return -2 * torch.log(sigma)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = torch.exp(-logsnr / 2)
        return ((sigma ** (1 / self.rho) - lo) / (hi - lo)).clamp(0.0, 1.0)
