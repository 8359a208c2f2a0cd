"""A whole image dataset held as one uint8 tensor on the training device.

CIFAR-size datasets fit in device memory many times over, and at 32×32 a DataLoader is the
usual bottleneck, so batches are drawn by index on the device and flipped there.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffrun.errors import ConfigError, DataError


class InMemoryImages:
    """uint8 images (N, C, H, W) → random float batches in [−1, 1]."""

    def __init__(self, images: Tensor, name: str, random_flip: bool = False, labels: Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"dataset {name}: expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"dataset {name}: no images")
        self.images, self.name, self.random_flip, self.labels = images, name, random_flip, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device: torch.device | str) -> "InMemoryImages":
        self.images = self.images.to(device)
        return self

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size > len(self):
            raise ConfigError(
                f"train.batch_size={batch_size} is larger than dataset {self.name} ({len(self)} images); "
                f"use train.batch_size<={len(self)}"
            )

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """A random batch (with replacement across batches, without within one) as float in [−1, 1]."""
        device = self.images.device
        index = torch.randint(len(self), (batch_size,), device=device, generator=generator)
        x = self.images[index].float().div_(127.5).sub_(1.0)
        if self.random_flip:
            flip = torch.rand(batch_size, 1, 1, 1, device=device, generator=generator) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return x
