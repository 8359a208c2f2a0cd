"""The order in which training items are drawn with `dataset.order=epoch` (the stream's only order).

Epoch e is a permutation of the N items drawn by NumPy's PCG64 seeded with (seed, e), followed by one flip
bit per position from the same generator (when flips are on). Ranks take interleaved shards, as torch's
DistributedSampler: the permutation is padded with its own head to a multiple of the world size and rank r
takes positions r, r + W, r + 2W, ... A rank's stream is its shards of epochs 0, 1, 2, ... one after the
other, so a batch may span two epochs and nothing is dropped. The only state is `position`, the number of
items this rank has consumed: a resumed run continues the stream exactly. Everything is computed on the
host from the seed, so the device and stream placements draw the same items in the same order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochOrder(Sampler):
    """Positions → (item index, flip) for one rank; iterating yields the keys from `position` on, forever."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, flips: bool = False):
        self.size, self.seed, self.rank, self.world_size, self.flips = size, seed, rank, world_size, flips
        self.shard_size = math.ceil(size / world_size)
        self.position = 0                          # items of this rank's stream consumed so far
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.position // self.shard_size

    def set_epoch(self, epoch: int) -> None:
        """Continue at the start of `epoch` (DistributedSampler's call; a resume sets `position` instead)."""
        self.position = epoch * self.shard_size

    def shard(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, flip bits) of this rank's share of `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.size)
            flip = rng.random(self.size) < 0.5 if self.flips else np.zeros(self.size, dtype=bool)
            padding = self.shard_size * self.world_size - self.size
            order = np.concatenate([order, np.resize(order, padding)])
            flip = np.concatenate([flip, np.resize(flip, padding)])
            self._cached = (epoch, order[self.rank::self.world_size], flip[self.rank::self.world_size])
        return self._cached[1], self._cached[2]

    def keys(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, flips) at stream positions [start, start + count)."""
        index, flip = [], []
        while count > 0:
            epoch, offset = divmod(start, self.shard_size)
            shard_index, shard_flip = self.shard(epoch)
            take = min(count, self.shard_size - offset)
            index.append(shard_index[offset:offset + take])
            flip.append(shard_flip[offset:offset + take])
            start, count = start + take, count - take
        return np.concatenate(index), np.concatenate(flip)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` keys; advances `position`."""
        keys = self.keys(self.position, count)
        self.position += count
        return keys

    def batches(self, batch_size: int) -> Iterator[list[tuple[int, bool]]]:
        """Batches of (index, flip) keys from the current position on, without advancing it (a DataLoader's
        batch sampler runs ahead of what the trainer has consumed)."""
        start = self.position
        while True:
            index, flip = self.keys(start, batch_size)
            yield list(zip(index.tolist(), flip.tolist()))
            start += batch_size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        start = self.position
        while True:
            index, flip = self.keys(start, self.shard_size)
            yield from zip(index.tolist(), flip.tolist())
            start += self.shard_size

    def state_dict(self) -> dict:
        return {"order": "epoch", "position": self.position, "size": self.size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the checkpoint's stream was; with another world size, after the same number of items
        of the whole run (each rank's shard of an epoch is then another one)."""
        self.position = int(state["position"]) * int(state.get("world_size", self.world_size)) // self.world_size
