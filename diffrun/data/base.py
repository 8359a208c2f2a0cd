"""The data seam: what training, sampling and evaluation ask of a dataset, and the dataset's items on the CPU.

Every placement (diffrun/data/placement.py) hands the trainer an object with this interface:

    shape                      (C, H, W) of what the network sees: pixels, or latents
    channels, image_size       shape[0], shape[-1]
    num_classes                0: unconditional (batches carry no labels); K: labels in [0, K)
    batch(n)                   -> (x float (n, C, H, W) on the device, labels int64 (n,) or None)
    reference_images(count, seed) -> uint8 pixel images (N, C, H, W) on the CPU, for FID
    decode(x)                  -> pixels in [-1, 1]: the identity for pixels, the VAE for latents
    state_dict(), load_state_dict(state)   where the data stream is, for an exact resume
    close()                    stop loader workers

A `Source` is the dataset itself: its items on the CPU (an array, files, or memory-mapped latents),
labels, the conversion of items to the network's input, the reference images and the decoder.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffrun.errors import DataError

PIXELS, LATENTS = "pixels", "latents"


def pixels_to_input(items: Tensor) -> Tensor:
    """uint8 [0, 255] → float [−1, 1] (the same arithmetic on every placement, so batches agree bit for bit)."""
    return items.float().div_(127.5).sub_(1.0)


def seeded_subset(total: int, count: int, seed: int) -> Tensor | None:
    """Indices of a fixed, sorted random subset of `count` out of `total` (None: all of them)."""
    if count >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


class Source:
    """A dataset's items on the CPU. Subclasses set name, kind, shape, random_flip, labels and implement `item`."""

    name: str
    kind: str = PIXELS                   # pixels: uint8 items; latents: float items with both flips stored
    shape: tuple[int, int, int]          # (C, H, W) of one training item
    random_flip: bool = False            # horizontal flips (pixels: mirrored; latents: the stored mirror)
    labels: np.ndarray | None = None     # (N,) int64 class of each item, or None

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, index: int, flip: bool) -> Tensor:
        """One item as stored for transfer: uint8 (C, H, W) pixels, mirrored when `flip`; latents (C, H, W)."""
        raise NotImplementedError

    def materialize(self, workers: int = 0) -> Tensor:
        """Every item in one CPU tensor: pixels (N, C, H, W) uint8; latents (N, F, C, H, W), F stored flips.
        `workers`: processes that may read in parallel (image files)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the dataset takes on a device (items and labels), known without reading the items."""
        raise NotImplementedError

    def reference_images(self, count: int, seed: int) -> Tensor:
        """A fixed random subset of min(count, N) training images (uint8 pixels, CPU), for FID."""
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        """Network-space samples → pixels in [−1, 1]."""
        return x

    def to_input(self, items: Tensor) -> Tensor:
        """A batch as `item` or `materialize` store it (on the device) → the network's float input."""
        return pixels_to_input(items) if self.kind == PIXELS else items.float()

    def check_labels(self, num_classes: int, key: str = "dataset.num_classes") -> None:
        """The labels fit a K-class model: present when K > 0, and in [0, K)."""
        if num_classes == 0:
            return
        if self.labels is None:
            raise DataError(f"{key}={num_classes} asks for class labels, but dataset {self.name} has none; "
                            f"use {key}=0 (unconditional) or a labelled dataset")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise DataError(f"dataset {self.name} has labels in [{self.labels.min()}, {self.labels.max()}], outside "
                            f"[0, {num_classes}) that {key}={num_classes} allows; set {key} to the number of classes")


class ArraySource(Source):
    """Pixels already in CPU memory: one uint8 tensor (N, C, H, W) (digits, CIFAR, the ImageNet-64 npz)."""

    def __init__(self, images: Tensor, name: str, random_flip: bool = False, labels: np.ndarray | Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"dataset {name}: expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"dataset {name}: no images")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            if labels.shape != (images.shape[0],):
                raise DataError(f"dataset {name}: {labels.shape[0]} labels for {images.shape[0]} images")
        self.images, self.name, self.random_flip, self.labels = images, name, random_flip, labels
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def item(self, index: int, flip: bool) -> Tensor:
        image = self.images[index]
        return image.flip(-1) if flip else image

    def materialize(self, workers: int = 0) -> Tensor:
        return self.images

    def nbytes(self) -> int:
        return self.images.numel() + (0 if self.labels is None else 8 * len(self))

    def reference_images(self, count: int, seed: int) -> Tensor:
        index = seeded_subset(len(self), count, seed)
        return self.images if index is None else self.images[index]
