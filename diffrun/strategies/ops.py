"""Small device-side helpers for adaptive strategies: no `.item()`, no data-dependent shapes."""
from __future__ import annotations

import torch
from torch import Tensor


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for bookkeeping, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def sample_categorical(probs: Tensor, n: int) -> Tensor:
    """n i.i.d. draws from an unnormalised probability vector, by inverting its CDF on the device
    (`torch.multinomial` validates its input on the host)."""
    dtype = wide_dtype(probs.device)
    cdf = torch.cumsum(probs.to(dtype), 0)
    u = torch.rand(n, device=probs.device, dtype=dtype) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1)


def bin_index(values: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Equal-width bin of each value on [lo, hi]; values outside fall into the edge bins."""
    idx = torch.floor((values.to(wide_dtype(values.device)) - lo) / (hi - lo) * bins)
    return torch.nan_to_num(idx, nan=0.0).clamp(0, bins - 1).long()


def scatter_moments(index: Tensor, values: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin count, sum and sum of squares of `values` (duplicates accumulate)."""
    values = values.float()
    count = torch.zeros(size, device=values.device).index_add_(0, index, torch.ones_like(values))
    total = torch.zeros(size, device=values.device).index_add_(0, index, values)
    total_sq = torch.zeros(size, device=values.device).index_add_(0, index, values * values)
    return count, total, total_sq


def ring_push(history: Tensor, filled: Tensor, index: Tensor, values: Tensor) -> None:
    """Append `values[i]` to row `index[i]` of the ring buffer `history` (rows × K), in batch order.

    `filled[r]` counts everything ever pushed to row r (the next slot is filled[r] mod K). A row that
    occurs m times in one batch gets all m values, in batch order; if m > K only the last K are kept
    (so every written slot is written once and the result is deterministic).
    """
    rows, k = history.shape
    order = torch.argsort(index, stable=True)
    sorted_idx, sorted_val = index[order], values[order].to(history.dtype)
    first = torch.searchsorted(sorted_idx, sorted_idx, right=False)        # start of each run of equal rows
    rank = torch.arange(index.numel(), device=index.device) - first         # occurrence number in the batch
    per_row = torch.zeros(rows, dtype=filled.dtype, device=index.device).index_add_(
        0, index, torch.ones_like(index, dtype=filled.dtype))
    keep = rank >= per_row[sorted_idx] - k                                   # the last K occurrences
    slot = sorted_idx * k + (filled[sorted_idx] + rank) % k
    flat = history.view(-1)
    touched = torch.zeros_like(flat).index_fill_(0, slot, 1.0)
    flat.mul_(1 - touched).index_add_(0, slot, torch.where(keep, sorted_val, torch.zeros_like(sorted_val)))
    filled.add_(per_row)
