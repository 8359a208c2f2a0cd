"""Sampled images to uint8 and to a PNG grid."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """[−1, 1] floats → uint8 images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
