"""Samplers written on the λ axis, so they work with every schedule and prediction target.

Both walk a grid t_0 = 1 > t_1 > ... > t_N = 0 of the run's schedule, predicting x̂0 and ε̂ at each
noise level with `Denoiser.predict_x0_eps`:
  DDIM (Song et al. 2021, Eq. 12):   z_s = α_s x̂0 + sqrt(σ_s² − c²) ε̂ + c ξ,  c = η σ_{s|t}·σ_s/σ_t
  DDPM ancestral (Ho et al. 2020; Kingma et al. 2021, Eq. 32-33): z_s ~ q(z_s | z_t, x = x̂0).
The last step returns x̂0.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffrun.models.parameterization import Denoiser
from diffrun.schedules import NoiseSchedule, alpha_sigma


def to_uint8(x: Tensor) -> Tensor:
    """[−1, 1] floats → uint8 images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Draw `shape[0]` images in [−1, 1] (float32)."""
    sampler = str(getattr(sampler, "value", sampler))
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sample.sampler={sampler!r}: allowed ddim, ddpm")
    t_grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    logsnr_grid = schedule.logsnr(t_grid).float().to(device)
    z = torch.randn(shape, generator=generator, device=device)
    batch = shape[0]
    device_type = torch.device(device).type
    for i in range(steps):
        lam_t, lam_s = logsnr_grid[i], logsnr_grid[i + 1]
        lam = lam_t.expand(batch)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = denoiser(z, lam)
        x0, eps = denoiser.predict_x0_eps(z, lam, out.float())
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            # keep ε̂ consistent with the clipped x̂0 so the update stays on the forward marginal
            a_t, s_t = alpha_sigma(lam_t)
            eps = (z - a_t * x0) / s_t
        if i == steps - 1:
            return x0
        a_t, s_t = alpha_sigma(lam_t)
        a_s, s_s = alpha_sigma(lam_s)
        noise = torch.randn(shape, generator=generator, device=device)
        if sampler == "ddim":
            # σ_{s|t}² = σ_s²/σ_t² · (1 − α_t²σ_s²/(α_s²σ_t²)) = posterior variance; η scales it.
            post_var = (s_s**2 / s_t**2) * (1 - torch.exp(lam_t - lam_s))
            c = eta * post_var.clamp(min=0).sqrt()
            z = a_s * x0 + (s_s**2 - c**2).clamp(min=0).sqrt() * eps + c * noise
        else:
            alpha_ts = a_t / a_s
            var_ts = s_t**2 - alpha_ts**2 * s_s**2
            mean = (alpha_ts * s_s**2 / s_t**2) * z + (a_s * var_ts / s_t**2) * x0
            z = mean + (var_ts * s_s**2 / s_t**2).clamp(min=0).sqrt() * noise
    return z


def save_grid(images_uint8: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a uint8 (N, C, H, W) batch as one PNG grid (torchvision's `make_grid`)."""
    from torchvision.utils import make_grid
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images_uint8.shape[0]
    nrow = nrow or max(1, int(round(n**0.5)))
    images = images_uint8.cpu()
    scale = max(1, 64 // images.shape[-1])  # small images (digits 16px) are enlarged, pixel-exact, to be seen
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(images, nrow=nrow, padding=scale, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path
