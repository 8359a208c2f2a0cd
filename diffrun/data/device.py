"""placement=device: the whole dataset as one tensor on the training device.

CIFAR-size datasets fit in device memory many times over, and at 32×32 a DataLoader is the usual
bottleneck, so batches are gathered by index on the device and flipped there. With the default
`order=iid` the indices and flips come from the global torch RNG (with replacement across batches), as
diffrun always did; with `order=epoch` they come from `EpochOrder`, the stream's order, so that the two
placements give the same batches.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from diffrun.data.base import PIXELS, ArraySource, Source
from diffrun.data.order import EpochOrder
from diffrun.errors import CheckpointError, ConfigError


class InMemoryImages:
    """A `Source` materialised on the device → random float batches (and labels when `num_classes` > 0).

    `InMemoryImages(uint8 images (N, C, H, W), name, random_flip, labels)` wraps a tensor directly."""

    def __init__(self, source: Source | Tensor, name: str | None = None, random_flip: bool = False,
                 labels: np.ndarray | Tensor | None = None, *, num_classes: int = 0, order: EpochOrder | None = None,
                 workers: int = 0, epoch_order: Callable[[], EpochOrder] | None = None):
        if isinstance(source, Tensor):
            source = ArraySource(source, name or "tensor", random_flip, labels)
        source.check_labels(num_classes)
        self.source, self.num_classes, self.order = source, num_classes, order
        self.epoch_order = epoch_order   # order=auto: how to continue a checkpoint drawn in epoch order
        self.items = source.materialize(workers)   # pixels (N, C, H, W) uint8; latents (N, F, C, H, W)
        self.labels = torch.from_numpy(source.labels) if num_classes else None

    name = property(lambda self: self.source.name)
    shape = property(lambda self: self.source.shape)
    channels = property(lambda self: self.source.shape[0])
    image_size = property(lambda self: self.source.shape[-1])
    random_flip = property(lambda self: self.source.random_flip)
    images = property(lambda self: self.items)  # pixel datasets: the uint8 images (N, C, H, W)

    def __len__(self) -> int:
        return self.items.shape[0]

    def to(self, device: torch.device | str) -> "InMemoryImages":
        self.items = self.items.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size > len(self):
            raise ConfigError(
                f"train.batch_size={batch_size} is larger than dataset {self.name} ({len(self)} images); "
                f"use train.batch_size<={len(self)}"
            )

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """(x float (B, C, H, W), labels (B,) or None): pixels in [−1, 1], or latents."""
        device = self.items.device
        if self.order is None:   # iid: the draws diffrun always made, in the same order (runs stay bit-identical)
            index = torch.randint(len(self), (batch_size,), device=device, generator=generator)
            flip = (torch.rand(batch_size, 1, 1, 1, device=device, generator=generator) < 0.5
                    if self.random_flip else None)
        else:
            keys, flips = (torch.from_numpy(a) for a in self.order.take(batch_size))
            if device.type == "cuda":          # pinned: the copies do not wait for the host
                keys, flips = keys.pin_memory(), flips.pin_memory()
            index = keys.to(device, non_blocking=True)
            flip = flips.view(-1, 1, 1, 1).to(device, non_blocking=True) if self.random_flip else None
        if self.source.kind == PIXELS:
            x = self.source.to_input(self.items[index])
            if flip is not None:
                x = torch.where(flip, x.flip(-1), x)
        else:  # latents: the stored mirror is the flip
            variant = flip.view(-1).long() if flip is not None else torch.zeros_like(index)
            x = self.source.to_input(self.items[index, variant])
        return x, (self.labels[index] if self.labels is not None else None)

    def reference_images(self, count: int, seed: int) -> Tensor:
        return self.source.reference_images(count, seed)

    def decode(self, x: Tensor) -> Tensor:
        return self.source.decode(x)

    def state_dict(self) -> dict:
        return self.order.state_dict() if self.order is not None else {"order": "iid"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") == "epoch" and self.order is None and self.epoch_order is not None:
            self.order = self.epoch_order()   # order=auto chose iid here, the checkpoint was streamed: continue its order
        check_same_order(state, self.order)
        if self.order is not None:
            self.order.load_state_dict(state)

    def close(self) -> None:
        pass


def check_same_order(state: dict, order: EpochOrder | None) -> None:
    """A checkpoint's data stream can be continued only in the order it was drawn in."""
    saved = state.get("order", "iid")
    current = "iid" if order is None else "epoch"
    if saved != current:
        raise CheckpointError(
            f"the checkpoint drew its batches with dataset.order={saved}, this run with dataset.order={current} "
            f"(placement or order changed since): set dataset.order={saved}"
            + (" dataset.placement=device" if saved == "iid" else "") + " to continue the same data stream")
    if order is not None and state.get("size", order.size) != order.size:
        raise CheckpointError(f"the checkpoint's data stream ran over {state['size']} items, this dataset has "
                              f"{order.size}: it is not the dataset the run was trained on")
