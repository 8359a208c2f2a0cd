"""Learned variance and the hybrid loss of Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672).

A network with `model.learn_sigma` outputs twice the image channels: the prediction (ε, x0, v or EDM's F) and
v ∈ [−1, 1] per pixel, which interpolates the reverse-step variance in log space between the posterior
variance β̃_t and β_t (Eq. 15, "learned range"):

    Σ_θ(x_t, t) = exp(v' log β_t + (1 − v') log β̃_t),   v' = (v + 1)/2 (improved-diffusion's `frac`)

Σ is learned by the variational bound alone (Eq. 16): L_hybrid = L_simple + λ L_vlb, λ = 0.001, with the mean's
gradient stopped in L_vlb. L_vlb = Σ_t L_t, so one sample at step t carries λ·T·L_t (improved-diffusion's
`vb *= num_timesteps / 1000`, which is also DiT's and SpeeD's term at T = 1000), and L_t is in bits per dimension:
KL(q(x_{t−1}|x_t, x0) ‖ p_θ(x_{t−1}|x_t)) for t > 1, the discretised-Gaussian decoder NLL at t = 1 (Ho et al. 2020,
arXiv:2006.11239, Eq. 5 and §3.3). Every quantity lives on the schedule's discrete T-step grid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.errors import ConfigError

HYBRID_VB_WEIGHT = 0.001   # λ of L_hybrid (Nichol & Dhariwal 2021, Eq. 16)


class DiscretePosterior:
    """q(x_{t−1} | x_t, x0) on a T-step grid, from its λ table (index 0 = the least noisy step, as
    improved-diffusion's t = 0), in float64 (Ho et al. 2020, Eq. 6–7):

        μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,   β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t)

    with β_t = 1 − ᾱ_t/ᾱ_{t−1} and ᾱ_0 = 1; log β̃ at the first step (β̃ = 0 there) takes the second step's value,
    improved-diffusion's `posterior_log_variance_clipped`."""

    def __init__(self, logsnr_table: Tensor):
        lam = logsnr_table.double()
        log_abar = torch.nn.functional.logsigmoid(lam)
        log_abar_prev = torch.cat([log_abar.new_zeros(1), log_abar[:-1]])
        one_minus_abar = torch.sigmoid(-lam)
        one_minus_abar_prev = torch.cat([one_minus_abar.new_zeros(1), one_minus_abar[:-1]])
        beta = -torch.expm1(log_abar - log_abar_prev)
        posterior_var = beta * one_minus_abar_prev / one_minus_abar
        self.log_beta = torch.log(beta)
        self.log_posterior_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        self.coef_x0 = torch.exp(0.5 * log_abar_prev) * beta / one_minus_abar
        self.coef_z = torch.sqrt(1 - beta) * one_minus_abar_prev / one_minus_abar

    def to(self, device: torch.device | str) -> "DiscretePosterior":
        for name, value in vars(self).items():
            setattr(self, name, value.to(device))
        return self

    @staticmethod
    def _at(table: Tensor, index: Tensor, like: Tensor) -> Tensor:
        return table[index].to(like.dtype).view(-1, *[1] * (like.ndim - 1))

    def mean(self, index: Tensor, x0: Tensor, z: Tensor) -> Tensor:
        """μ̃(x_t, x0) at the steps `index`."""
        return self._at(self.coef_x0, index, z) * x0 + self._at(self.coef_z, index, z) * z

    def log_variance(self, index: Tensor, like: Tensor) -> Tensor:
        """log β̃ (clipped at the first step), the true posterior's."""
        return self._at(self.log_posterior_var, index, like)

    def learned_log_variance(self, index: Tensor, v: Tensor) -> Tensor:
        """log Σ_θ = v' log β_t + (1 − v') log β̃_t, v' = (v + 1)/2 (Nichol & Dhariwal 2021, Eq. 15)."""
        frac = (v + 1) / 2
        return frac * self._at(self.log_beta, index, v) + (1 - frac) * self.log_variance(index, v)

    def vb_bits(self, index: Tensor, x0: Tensor, z: Tensor, x0_hat: Tensor, v: Tensor) -> Tensor:
        """L_t per sample in bits/dim: the KL to the posterior for t > 1, the decoder NLL of x0 at t = 1, for the
        model p_θ(x_{t−1}|x_t) = N(μ̃(x_t, x̂0), Σ_θ). Pass a detached x̂0 for the hybrid loss's stop-gradient."""
        model_mean, model_log_var = self.mean(index, x0_hat, z), self.learned_log_variance(index, v)
        kl = normal_kl(self.mean(index, x0, z), self.log_variance(index, z), model_mean, model_log_var)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        per_dim = torch.where(index.view(-1, *[1] * (x0.ndim - 1)) == 0, nll, kl)
        return per_dim.flatten(1).mean(1) / math.log(2.0)


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^{log_var1}) ‖ N(mean2, e^{log_var2})) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation Ho et al.'s decoder NLL uses."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element, nats, of N(mean, e^{2 log_scale}) integrated over x's bin of width 2/255 for data in
    [−1, 1] (8-bit images); the outermost bins extend to ±∞ (Ho et al. 2020, Eq. 13)."""
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1 / 255))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def hybrid_vb_term(posterior: DiscretePosterior, num_timesteps: int, index: Tensor, x0: Tensor, z: Tensor,
                   x0_hat: Tensor, v: Tensor) -> Tensor:
    """λ·T·L_t per sample: this sample's share of λ L_vlb in L_hybrid (x̂0 detached by the caller)."""
    return HYBRID_VB_WEIGHT * num_timesteps * posterior.vb_bits(index, x0, z, x0_hat, v)


def check_settings(learn_sigma: bool, timesteps: int | None, ddpm_variance: dict[str, str]) -> None:
    """IDDPM's variational bound lives on the discrete T-step grid; sampling with the learned variance needs a
    model that learns it."""
    if learn_sigma and timesteps is None:
        raise ConfigError("model.learn_sigma=true trains the variance with IDDPM's variational bound, defined on the "
                          "discrete T-step grid, but schedule.timesteps=null (continuous t); allowed "
                          "schedule.timesteps=1000 (DiT, SpeeD: schedule=linear) or model.learn_sigma=false")
    for section, variance in ddpm_variance.items():       # sample, eval
        if variance == "learned" and not learn_sigma:
            raise ConfigError(f"{section}.ddpm_variance=learned needs a model that learns its variance, and "
                              f"model.learn_sigma=false; allowed {section}.ddpm_variance=fixed_large|fixed_small "
                              f"or model.learn_sigma=true")
