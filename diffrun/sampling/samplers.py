"""The papers' samplers, written on the λ axis of diffrun's VP convention z = α x + σ ε (α² = sigmoid(λ)).

  ddim             DDIM (Song et al. 2021, arXiv:2010.02502, Eq. 12): z_s = α_s x̂0 + √(σ_s² − c²) ε̂ + c ξ,
                   c² = η² σ_s² (1 − SNR_t/SNR_s) (Eq. 16). Continuous t grid, or the respaced DDPM grid when
                   the schedule is discrete (`schedule.timesteps`), as improved-diffusion `ddim_sample_loop`.
  ddpm             DDPM ancestral (Ho et al. 2020, arXiv:2006.11239, Alg. 2) on the schedule's discrete T-step grid
                   (respaced to `steps` as improved-diffusion's `space_timesteps`): z_s ~ N(μ̃(z_t, x̂0), v),
                   v = β_t (fixed_large) or β̃_t (fixed_small) (improved-diffusion `p_sample`, tqch/ddpm-torch), or the
                   model's learned range exp(v' log β_t + (1 − v') log β̃_t) (learned; Nichol & Dhariwal 2021, Eq. 15).
  ddpm_continuous  the same step on the uniform continuous-t grid (diffrun's earlier `ddpm`, with fixed_small).
  heun             EDM's 2nd-order sampler (Karras et al. 2022, arXiv:2206.00364, Algorithm 2; NVlabs/edm
                   `edm_sampler`) in EDM's σ (z/α = x + σ n, λ = −2 ln σ), deterministic when S_churn = 0.
Each ddim/ddpm step evaluates the network once and the last step returns x̂0; Heun evaluates twice per step
but the last (NFE = 2N − 1). Random draws come from `generator` in a fixed order (see docs/samplers.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.sampling.grids import (continuous_logsnr_grid, discrete_logsnr_grid, edm_sigma_grid, round_sigma,
                                   schedule_sigmas)
from diffrun.sampling.guidance import GuidedDenoiser
from diffrun.sampling.options import SamplerOptions
from diffrun.schedules import NoiseSchedule


@dataclass
class Samples:
    images: Tensor            # (N, C, H, W) float32; in [−1, 1] when x̂0 is clipped (ddim, ddpm by default)
    nfe: int                  # network evaluations per image (a guided, doubled batch counts once)
    options: SamplerOptions


def _log_sigmoid(x: float) -> float:
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))  # −softplus(−x), stable for any |x|


def _alpha_sigma(logsnr: float) -> tuple[float, float]:
    return math.exp(0.5 * _log_sigmoid(logsnr)), math.exp(0.5 * _log_sigmoid(-logsnr))


def ddim(predict: GuidedDenoiser, logsnrs: list[float], eta: float, z: Tensor, generator) -> Tensor:
    for i, lam_t in enumerate(logsnrs):
        x0, eps = predict(z, lam_t)
        if i == len(logsnrs) - 1:
            return x0
        lam_s = logsnrs[i + 1]
        alpha_s, sigma_s = _alpha_sigma(lam_s)
        # c² = η² (1 − ᾱ_s)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_s) = η² σ_s² (1 − SNR_t/SNR_s)  (Song et al. 2021, Eq. 16)
        c = eta * sigma_s * math.sqrt(max(-math.expm1(lam_t - lam_s), 0.0))
        z = alpha_s * x0 + math.sqrt(max(sigma_s**2 - c**2, 0.0)) * eps
        if c > 0:
            z = z + c * torch.randn(z.shape, generator=generator, device=z.device)
    return z


def ancestral(predict: GuidedDenoiser, logsnrs: list[float], variance: str, z: Tensor, generator) -> Tensor:
    for i, lam_t in enumerate(logsnrs):
        x0, _, v = predict.with_variance(z, lam_t)
        if i == len(logsnrs) - 1:
            return x0  # the posterior mean at ᾱ_prev = 1 is x̂0 itself, and no noise is added
        lam_s = logsnrs[i + 1]
        log_abar_t, log_abar_s = _log_sigmoid(lam_t), _log_sigmoid(lam_s)
        beta = -math.expm1(log_abar_t - log_abar_s)                   # β_t = 1 − ᾱ_t/ᾱ_s on this (respaced) grid
        one_minus_t, one_minus_s = math.exp(_log_sigmoid(-lam_t)), math.exp(_log_sigmoid(-lam_s))
        # μ̃ = √ᾱ_s β_t/(1 − ᾱ_t) x̂0 + √(1 − β_t)(1 − ᾱ_s)/(1 − ᾱ_t) z_t,  β̃_t = β_t (1 − ᾱ_s)/(1 − ᾱ_t)  (Ho et al. Eq. 7)
        coef_x0 = math.exp(0.5 * log_abar_s) * beta / one_minus_t
        coef_z = math.sqrt(1 - beta) * one_minus_s / one_minus_t
        mean = coef_x0 * x0 + coef_z * z
        posterior_var = beta * one_minus_s / one_minus_t
        if variance == "learned":   # β and β̃ of this (respaced) grid, as improved-diffusion's respaced betas
            frac = (v + 1) / 2
            std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(posterior_var)))
        else:
            std = math.sqrt(beta if variance == "fixed_large" else posterior_var)
        z = mean + std * torch.randn(z.shape, generator=generator, device=z.device)
    return z


def heun(predict: GuidedDenoiser, sigmas: list[float], options: SamplerOptions, latents: Tensor, generator,
         sigma_grid: Tensor | None) -> Tensor:
    """Algorithm 2 of Karras et al. 2022 in float64, as `edm_sampler`: x_0 = σ_0·n, then per step an optional churn
    to σ̂ = σ(1 + γ), an Euler step and (except towards σ = 0) the trapezoidal correction."""
    steps = len(sigmas) - 1

    def denoised(x: Tensor, sigma: float) -> Tensor:
        lam = -2 * math.log(sigma)
        z = (x / math.sqrt(1 + sigma**2)).float()                        # z = α x_EDM, α = 1/√(1 + σ²)
        return predict(z, lam)[0].double()

    x_next = latents.double() * sigmas[0]
    for i in range(steps):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        sigma_hat, x_hat = sigma_cur, x_cur
        if options.s_churn > 0:  # one draw per step, as edm_sampler's randn_like, so the streams agree
            in_range = options.s_min <= sigma_cur <= options.s_max
            gamma = min(options.s_churn / steps, math.sqrt(2) - 1) if in_range else 0.0
            sigma_hat = round_sigma(sigma_cur + gamma * sigma_cur, sigma_grid)
            noise = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float64)
            x_hat = x_cur + math.sqrt(sigma_hat**2 - sigma_cur**2) * options.s_noise * noise
        d_cur = (x_hat - denoised(x_hat, sigma_hat)) / sigma_hat                    # Euler step
        x_next = x_hat + (sigma_next - sigma_hat) * d_cur
        if i < steps - 1:                                                           # 2nd-order correction
            d_prime = (x_next - denoised(x_next, sigma_next)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


@torch.no_grad()
def run_sampler(denoiser: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], options: SamplerOptions, *,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                autocast_dtype: torch.dtype | None = None, class_labels: Tensor | None = None,
                num_classes: int | None = None) -> Samples:
    """Draw `shape[0]` images with `options.sampler`; the network runs under `autocast_dtype` (None: fp32).

    `class_labels` (LongTensor (N,), on `device`) conditions the model; with `options.cfg_scale != 1` the null
    label is `num_classes` (default: the model's)."""
    if options.ddpm_variance == "learned" and not getattr(denoiser, "learn_sigma", False):
        raise ConfigError(f"{options.key}.ddpm_variance=learned needs a model that learns its variance "
                          f"(model.learn_sigma=true); allowed fixed_large or fixed_small")
    predict = GuidedDenoiser(denoiser, options, class_labels, num_classes, autocast_dtype, device)
    latents = torch.randn(shape, generator=generator, device=device)
    if options.sampler == "heun":
        sigmas = edm_sigma_grid(schedule, options.steps, options.sigma_min, options.sigma_max, options.rho)
        images = heun(predict, sigmas, options, latents, generator, schedule_sigmas(schedule))
    else:
        discrete = options.sampler == "ddpm" or (options.sampler == "ddim" and schedule.timesteps is not None)
        logsnrs = (discrete_logsnr_grid(schedule, options.steps, options.key) if discrete
                   else continuous_logsnr_grid(schedule, options.steps))
        if options.sampler == "ddim":
            images = ddim(predict, logsnrs, options.eta, latents, generator)
        else:
            images = ancestral(predict, logsnrs, options.ddpm_variance, latents, generator)
    assert predict.evaluations == options.nfe, (predict.evaluations, options.nfe)
    return Samples(images=images, nfe=predict.evaluations, options=options)


@torch.no_grad()
def sample(denoiser: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], steps: int = 50,
           sampler: str = "ddim", eta: float = 0.0, clip_x0: bool | None = None,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           autocast_dtype: torch.dtype | None = None, class_labels: Tensor | None = None,
           num_classes: int | None = None, **options) -> Tensor:
    """`run_sampler(...).images` with the options as keywords (see `SamplerOptions` for the rest)."""
    spec = SamplerOptions(sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0, **options)
    return run_sampler(denoiser, schedule, shape, spec, generator=generator, device=device,
                       autocast_dtype=autocast_dtype, class_labels=class_labels, num_classes=num_classes).images
