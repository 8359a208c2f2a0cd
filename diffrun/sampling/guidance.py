"""One network evaluation at one noise level → (x̂0, ε̂), with classifier-free guidance and its count.

Guidance (Ho & Salimans 2022, arXiv:2207.12598): out = out_uncond + s·(out_cond − out_uncond), on the raw
network output. x̂0 and ε̂ are affine in the output with weights that sum to one here, so this is the same
as guiding x̂0 or ε̂. The conditional and unconditional halves are one doubled batch: one evaluation.
Guidance interval (Kynkäänniemi et al. 2024, arXiv:2404.07724): outside σ ∈ (σ_lo, σ_hi] the step is
conditional only (a single batch).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.sampling.options import SamplerOptions
from diffrun.schedules import alpha_sigma


def null_label_of(denoiser: nn.Module) -> int | None:
    """The unconditional label: the model's `num_classes` (labels 0..K−1 are classes, K is 'no class')."""
    for module in (denoiser, getattr(denoiser, "net", None)):
        classes = getattr(module, "num_classes", None)
        if classes:
            return int(classes)
    return None


class GuidedDenoiser:
    """x̂0, ε̂ of `denoiser` at (z, λ), under autocast, guided and clipped as the options say; counts evaluations."""

    def __init__(self, denoiser: nn.Module, options: SamplerOptions, class_labels: Tensor | None,
                 num_classes: int | None, autocast_dtype: torch.dtype | None, device: torch.device):
        self.denoiser, self.options, self.autocast_dtype = denoiser, options, autocast_dtype
        self.device_type = torch.device(device).type
        self.labels = class_labels
        self.null_labels = None
        self.evaluations = 0
        if class_labels is None:
            return
        if class_labels.dtype != torch.long or class_labels.ndim != 1:
            raise ConfigError(f"class_labels must be a 1-D LongTensor, got {class_labels.dtype}, "
                              f"shape {tuple(class_labels.shape)}")
        if options.cfg_scale != 1:
            null = num_classes if num_classes is not None else null_label_of(denoiser)
            if null is None:
                raise ConfigError(f"{options.key}.cfg_scale={options.cfg_scale}: classifier-free guidance needs the "
                                  f"null label, but the model has no num_classes (unconditional model?)")
            self.null_labels = torch.full_like(class_labels, null)

    def _network(self, z: Tensor, logsnr: Tensor, labels: Tensor | None) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.denoiser(z, logsnr) if labels is None else self.denoiser(z, logsnr, class_labels=labels)
        return out.float()

    def output(self, z: Tensor, logsnr: Tensor, sigma: float) -> tuple[Tensor, Tensor | None]:
        """The (guided) prediction F at one noise level and, for a model with a learned variance, its v (the
        conditional one under guidance, as DiT's `forward_with_cfg`); one network evaluation."""
        self.evaluations += 1
        scale = self.options.cfg_scale
        if self.labels is None or scale == 1 or not self.options.guided_at(sigma):
            return self.denoiser.split(self._network(z, logsnr, self.labels))
        if scale == 0:
            return self.denoiser.split(self._network(z, logsnr, self.null_labels))
        both, v = self.denoiser.split(self._network(torch.cat([z, z]), torch.cat([logsnr, logsnr]),
                                                    torch.cat([self.labels, self.null_labels])))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond), None if v is None else v.chunk(2)[0]

    def __call__(self, z: Tensor, logsnr: float) -> tuple[Tensor, Tensor]:
        """(x̂0, ε̂) at λ = `logsnr` for the batch z (float32); x̂0 clipped to [−1, 1] and ε̂ re-derived from it
        when the options clip (improved-diffusion `p_mean_variance(clip_denoised=True)`)."""
        x0, eps, _ = self.with_variance(z, logsnr)
        return x0, eps

    def with_variance(self, z: Tensor, logsnr: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x̂0, ε̂, v): as calling it, plus the learned-variance output v (None when the model has none)."""
        lam = torch.full((z.shape[0],), logsnr, dtype=torch.float32, device=z.device)
        out, v = self.output(z, lam, math.exp(-logsnr / 2))
        x0, eps = self.denoiser.predict_x0_eps(z, lam, out)
        if self.options.clips:
            x0 = x0.clamp(-1, 1)
            alpha, sigma = (c.view(-1, *[1] * (z.ndim - 1)) for c in alpha_sigma(lam))
            eps = (z - alpha * x0) / sigma  # keep ε̂ consistent with the clipped x̂0
        return x0, eps, v
