"""placement=stream: items read by torch DataLoader workers, in `EpochOrder`, into pinned memory.

For datasets larger than the device's memory (ImageNet pixels, image folders read file by file). The order
and the flips are decided on the host by `EpochOrder` from the seed, never by a worker, so the stream is the
same for any number of workers and continues exactly after a resume (the checkpoint records the position).
Workers send items as stored (uint8 pixels, float16/32 latents, already mirrored); the conversion to the
network's float input happens on the device, with the same arithmetic as placement=device.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffrun.data.base import Source
from diffrun.data.device import check_same_order
from diffrun.data.order import EpochOrder
from diffrun.errors import ConfigError


class _Items(Dataset):
    """The Dataset the workers index with (item index, flip) keys."""

    def __init__(self, source: Source, with_labels: bool):
        self.source, self.with_labels = source, with_labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, bool]):
        index, flip = key
        item = self.source.item(index, flip)
        return (item, int(self.source.labels[index])) if self.with_labels else item


class StreamingData:
    """Batches from DataLoader workers (`workers` processes, `prefetch` batches ahead each)."""

    def __init__(self, source: Source, order: EpochOrder, device: torch.device, *, num_classes: int = 0,
                 workers: int = 4, prefetch: int = 2):
        source.check_labels(num_classes)
        self.source, self.order, self.device, self.num_classes = source, order, torch.device(device), num_classes
        self.workers, self.prefetch = workers, prefetch
        self._iterator = None
        self._batch_size = None

    name = property(lambda self: self.source.name)
    shape = property(lambda self: self.source.shape)
    channels = property(lambda self: self.source.shape[0])
    image_size = property(lambda self: self.source.shape[-1])
    random_flip = property(lambda self: self.source.random_flip)

    def __len__(self) -> int:
        return len(self.source)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size > len(self):
            raise ConfigError(f"train.batch_size={batch_size} is larger than dataset {self.name} ({len(self)} items); "
                              f"use train.batch_size<={len(self)}")

    def _start(self, batch_size: int) -> None:
        self.close()
        loader = DataLoader(
            _Items(self.source, self.num_classes > 0),
            batch_sampler=self.order.batches(batch_size),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
            generator=torch.Generator(),   # the workers' base seed: drawn from the global RNG otherwise, which would
        )                                  # shift the training noise at every (re)start of the workers
        self._iterator, self._batch_size = iter(loader), batch_size

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """The next `batch_size` items of this rank's stream (`generator` is not used: the order is the seed's)."""
        if self._iterator is None or batch_size != self._batch_size:
            self._start(batch_size)
        got = next(self._iterator)
        self.order.position += batch_size
        items, labels = got if self.num_classes else (got, None)
        x = self.source.to_input(items.to(self.device, non_blocking=True))
        return x, (labels.to(self.device, non_blocking=True) if labels is not None else None)

    def reference_images(self, count: int, seed: int) -> Tensor:
        return self.source.reference_images(count, seed)

    def decode(self, x: Tensor) -> Tensor:
        return self.source.decode(x)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        check_same_order(state, self.order)
        self.order.load_state_dict(state)
        self.close()   # the workers ran ahead from the old position

    def close(self) -> None:
        """Stop the workers (they start again, at the current position, with the next batch)."""
        self._iterator = None
