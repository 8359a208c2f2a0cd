"""Prediction targets as a thin wrapper around any backbone (the EDMPrecond idea, Karras et al. 2022).

The backbone F(input, c_noise) never knows what it predicts. `Denoiser` turns its output into
x̂0 and ε̂ and says what F regresses onto for each target:

    eps  F ≈ ε                                  (Ho et al. 2020)
    x0   F ≈ x                                  (predict_xstart)
    v    F ≈ v = α ε − σ x                      (Salimans & Ho 2022, §4)
    edm  D = c_skip·(z/α) + c_out·F ≈ x        (Karras et al. 2022, Table 1, σ_data = 0.5)

Every loss is ‖F − F*‖². Relative to the x0-loss ‖x̂0 − x‖² its size is r(λ):
x0: 1, eps: SNR, v: 1 + SNR, edm: SNR + 1/σ_data². A weight written in space a is used in
space b as w_b = w_a · r_a / r_b (`convert_log_weight`).

With `learn_sigma` the backbone returns twice the channels: F, then IDDPM's variance interpolation v
(diffrun/models/learned_variance.py); `split` separates them, and only F enters the helpers below.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.schedules import alpha_sigma

PREDICTIONS = ("eps", "x0", "v", "edm")
WEIGHT_SPACES = PREDICTIONS


def log_loss_ratio(space: str, logsnr: Tensor, sigma_data: float = 0.5) -> Tensor:
    """log r_space(λ): how much larger the `space` MSE is than the x0 MSE for the same error."""
    if space == "x0":
        return torch.zeros_like(logsnr)
    if space == "eps":
        return logsnr
    if space == "v":
        return nn.functional.softplus(logsnr)
    if space == "edm":
        return torch.logaddexp(logsnr, torch.full_like(logsnr, -2 * math.log(sigma_data)))
    raise ConfigError(f"unknown weight space {space!r}; allowed: {', '.join(WEIGHT_SPACES)}")


def convert_log_weight(log_weight: Tensor, logsnr: Tensor, src: str, dst: str, sigma_data: float = 0.5) -> Tensor:
    """log of a per-sample loss weight re-expressed from space `src` to space `dst`:
    log w_dst = log w_src + log r_src − log r_dst, in log space so that it stays finite wherever the
    converted formula is (e.g. SNR on a v-loss at λ = 100)."""
    if src == dst:
        return log_weight
    total = log_weight + log_loss_ratio(src, logsnr, sigma_data) - log_loss_ratio(dst, logsnr, sigma_data)
    # ∞ − ∞ at zero terminal SNR (λ = −∞, e.g. min(SNR, γ) on ε) is undefined: weight 1 there, as Hang et
    # al.'s code does (Min-SNR PR #4).
    undefined = torch.isnan(total) & ~torch.isnan(log_weight)
    return torch.where(undefined, torch.zeros_like(total), total)


class Denoiser(nn.Module):
    """Backbone + prediction target. `forward` returns the raw F output; helpers map it to x̂0, ε̂."""

    def __init__(self, net: nn.Module, prediction: str = "eps", sigma_data: float = 0.5, learn_sigma: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
        self.net, self.prediction, self.sigma_data, self.learn_sigma = net, prediction, sigma_data, learn_sigma

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """(F, v) from the raw output: v, the learned-variance channels, is None without `learn_sigma`."""
        if not self.learn_sigma:
            return out, None
        prediction, v = out.chunk(2, dim=1)
        return prediction, v

    @staticmethod
    def _bcast(v: Tensor, like: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def _edm_coefficients(self, logsnr: Tensor):
        sigma_ve2 = torch.exp(-logsnr)  # EDM's σ² (variance-exploding scale)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma_ve2 + sd2)
        c_out = sigma_ve2.sqrt() * self.sigma_data / (sigma_ve2 + sd2).sqrt()
        c_in = 1 / (sigma_ve2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def forward(self, z: Tensor, logsnr: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """F(z, c_noise[, class_labels][, augment_labels]), with `learn_sigma` F and v stacked on channels; labels
        are passed on only when given, so a backbone with the bare (x, c_noise) signature still works (contract:
        `conditioning`)."""
        c_noise = -logsnr / 8  # = ln(σ_ve)/4, EDM's c_noise, for every target
        if self.prediction == "edm":
            alpha, _ = alpha_sigma(logsnr)
            _, _, c_in = self._edm_coefficients(logsnr)
            z = z * self._bcast(c_in / alpha, z)
        labels = {}
        if class_labels is not None:
            labels["class_labels"] = class_labels
        if augment_labels is not None:
            labels["augment_labels"] = augment_labels
        return self.net(z, c_noise, **labels)

    def target(self, x0: Tensor, eps: Tensor, z: Tensor, logsnr: Tensor) -> Tensor:
        """F*, what the backbone output regresses onto."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        alpha, sigma = (self._bcast(c, x0) for c in alpha_sigma(logsnr))
        if self.prediction == "v":
            return alpha * eps - sigma * x0
        c_skip, c_out, _ = (self._bcast(c, x0) for c in self._edm_coefficients(logsnr))
        return (x0 - c_skip * z / alpha) / c_out

    def predict_x0_eps(self, z: Tensor, logsnr: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) from the raw output, using z = α x + σ ε."""
        alpha, sigma = (self._bcast(c, z) for c in alpha_sigma(logsnr))
        if self.prediction == "eps":
            return (z - sigma * out) / alpha, out
        if self.prediction == "x0":
            return out, (z - alpha * out) / sigma
        if self.prediction == "v":
            x0 = alpha * z - sigma * out
            return x0, sigma * z + alpha * out
        c_skip, c_out, _ = (self._bcast(c, z) for c in self._edm_coefficients(logsnr))
        x0 = c_skip * z / alpha + c_out * out
        return x0, (z - alpha * x0) / sigma
