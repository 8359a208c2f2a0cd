"""The published schedules as λ(t). Once committed, a schedule's formula is never changed:
add a new name instead (the improved-diffusion policy for `get_named_beta_schedule`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.schedules.base import NoiseSchedule, is_real, require


class BetaSchedule(NoiseSchedule):
    """A DDPM β table and its continuous-time limit (Song et al. 2021, VP-SDE; NVlabs/edm `VPLoss`).

    Continuous: β(t) = 1000·β_{1000}(t), ᾱ(t) = exp(−B(t)), B(t) = ∫₀ᵗ β(s) ds, so λ(t) = −log(expm1(B(t))).
    `discrete_logsnr(T)` is the exact DDPM product ᾱ_k = ∏_{i ≤ k}(1 − β_i) with the betas rescaled by
    1000/T (improved-diffusion's `scale = 1000 / T`), so every T has the same continuous limit.
    Subclasses give the T-step betas, B(t) and its inverse.
    """

    def __init__(self, beta_start: float, beta_end: float, t_min: float, timesteps: int | None):
        require(is_real(beta_start) and 0 < beta_start < 1, "beta_start", beta_start, "(0, beta_end)")
        require(is_real(beta_end) and beta_start < beta_end < 1, "beta_end", beta_end,
                f"(schedule.beta_start={beta_start}, 1): beta_start < beta_end < 1")
        require(is_real(t_min) and 0 < t_min < 1, "t_min", t_min, "(0, 1) (λ is finite only for t > 0)")
        self.beta_start, self.beta_end, self.t_min = beta_start, beta_end, t_min
        super().__init__(timesteps)
        if timesteps is not None:
            require(bool(self.betas(timesteps)[-1] < 1), "timesteps", timesteps,
                    f"null or an integer >= {self._shortest_grid()} (β_T = 1000/T · beta_end must stay below 1)")

    def _shortest_grid(self) -> int:
        return math.floor(1000 * self.beta_end) + 1

    def betas(self, num_timesteps: int) -> Tensor:
        raise NotImplementedError

    def _integral(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _integral_inverse(self, integral: Tensor) -> Tensor:
        raise NotImplementedError

    def logsnr(self, t: Tensor) -> Tensor:
        t = t.clamp(min=self.t_min)
        return -torch.log(torch.expm1(self._integral(t)))

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        # B(t) = −log ᾱ = log(1 + e^{−λ})
        return self._integral_inverse(torch.nn.functional.softplus(-logsnr)).clamp(0.0, 1.0)

    def discrete_logsnr(self, num_timesteps: int) -> Tensor:
        betas = self.betas(num_timesteps)
        if not betas[-1] < 1:
            raise ConfigError(f"{self.name} schedule on T={num_timesteps} steps: β_T = {float(betas[-1]):.4g} >= 1 "
                              f"(betas are rescaled by 1000/T); use T >= {self._shortest_grid()}")
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


class LinearSchedule(BetaSchedule):
    """DDPM linear betas (Ho et al. 2020): β from `beta_start` to `beta_end` over T = 1000 steps.

    Continuous form: β(t) = β_min + t β_d with β_min = 1000·beta_start, β_d = 1000·(beta_end − beta_start),
    so B(t) = β_min t + ½ β_d t² (EDM's `VPLoss` with β_min = 0.1, β_d = 19.9).
    """

    name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, t_min: float = 1e-5,
                 timesteps: int | None = None):
        super().__init__(beta_start, beta_end, t_min, timesteps)
        self.beta_min = 1000 * beta_start
        self.beta_d = 1000 * (beta_end - beta_start)

    def betas(self, num_timesteps: int) -> Tensor:
        scale = 1000 / num_timesteps
        return torch.linspace(scale * self.beta_start, scale * self.beta_end, num_timesteps, dtype=torch.float64)

    def _integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * self.beta_d * t**2

    def _integral_inverse(self, integral: Tensor) -> Tensor:
        # ½β_d t² + β_min t − B = 0, t ≥ 0
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * integral)) / self.beta_d


class QuadSchedule(BetaSchedule):
    """"quad" betas (tqch/ddpm-torch `get_beta_schedule`, the CIFAR-10 config of Kim et al. 2025,
    arXiv:2411.09998): β = linspace(√beta_start, √beta_end, T)², T = 1000.

    Continuous form, the analogue of LinearSchedule's: β(t) = 1000·(a + t d)² with a = √beta_start,
    d = √beta_end − √beta_start, so B(t) = 1000·((a + t d)³ − a³)/(3d) and t(B) = ((a³ + 3dB/1000)^⅓ − a)/d.
    At T = 1000 `discrete_logsnr` is ddpm-torch's table exactly (λ_1000 = −7.22, λ > 0 for k ≤ 418); for other T
    the betas are rescaled by 1000/T as LinearSchedule's are (ddpm-torch does not rescale).
    """

    name = "quad"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, t_min: float = 1e-5,
                 timesteps: int | None = None):
        super().__init__(beta_start, beta_end, t_min, timesteps)
        self.a = math.sqrt(beta_start)
        self.d = math.sqrt(beta_end) - self.a

    def betas(self, num_timesteps: int) -> Tensor:
        root = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, num_timesteps, dtype=torch.float64)
        return 1000 / num_timesteps * root**2

    def _integral(self, t: Tensor) -> Tensor:
        return 1000 * ((self.a + t * self.d) ** 3 - self.a**3) / (3 * self.d)

    def _integral_inverse(self, integral: Tensor) -> Tensor:
        return ((self.a**3 + 3 * self.d * integral / 1000) ** (1 / 3) - self.a) / self.d


class CosineSchedule(NoiseSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t+s)/(1+s)).

    Ignoring the tiny f(0) normalisation, λ(t) = −2 log tan(π/2 · (t+s)/(1+s)). improved-diffusion
    clips β ≤ 0.999, which bounds λ from below near t = 1; we clip λ at `logsnr_min` (−20 ≈ that clip)
    so that ε-prediction can still recover x0 at the noisiest step.
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, logsnr_min: float = -20.0, timesteps: int | None = None):
        # s < 0 puts (t + s)/(1 + s) below 0 near t = 0 (λ not monotone; f(0) = 0 at s = −0.5, 1/0 at s = −1)
        require(is_real(s) and s >= 0, "s", s, "[0, ∞) (the offset of t; 0.008 in Nichol & Dhariwal)")
        self.s, self.min_logsnr = s, -math.inf
        self._f0 = math.cos(math.pi / 2 * s / (1 + s)) ** 2
        top = float(self.logsnr(torch.tensor(0.0, dtype=torch.float64)))
        self.min_logsnr = logsnr_min
        require(is_real(logsnr_min) and logsnr_min < top, "logsnr_min", logsnr_min,
                f"(−∞, {top:.2f}) (λ at t = 0), finite")
        super().__init__(timesteps)

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
                 logsnr_min: float = -15.0, logsnr_max: float = 15.0, timesteps: int | None = None):
        require(is_real(image_size) and image_size > 0, "image_size", image_size, "> 0 (pixels)")
        require(is_real(base_resolution) and base_resolution > 0, "base_resolution", base_resolution, "> 0 (pixels)")
        require(is_real(logsnr_min), "logsnr_min", logsnr_min, "a finite number below logsnr_max")
        require(is_real(logsnr_max) and logsnr_max > logsnr_min, "logsnr_max", logsnr_max,
                f"a finite number above logsnr_min = {logsnr_min}")
        super().__init__(timesteps)
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

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 timesteps: int | None = None):
        require(is_real(sigma_min) and sigma_min > 0, "sigma_min", sigma_min, "(0, sigma_max)")
        require(is_real(sigma_max) and sigma_max > sigma_min, "sigma_max", sigma_max, f"({sigma_min}, ∞), finite")
        require(is_real(rho) and rho > 0, "rho", rho, "(0, ∞) (7 in EDM)")
        super().__init__(timesteps)
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def logsnr(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = (lo + t * (hi - lo)) ** self.rho
        return -2 * torch.log(sigma)

    def t_of_logsnr(self, logsnr: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = torch.exp(-logsnr / 2)
        return ((sigma ** (1 / self.rho) - lo) / (hi - lo)).clamp(0.0, 1.0)
