"""Per-log-SNR-bin loss statistics, accumulated on the device with no host sync.

Each step adds, per bin of λ: the count, Σℓ, Σℓ² of the unweighted per-sample loss, Σwℓ and
Σ(wℓ)² of the weighted loss, and Σw of the applied weight. Mean and variance per bin follow at
flush time (every `log_every` steps), when the host reads the sums once and resets them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffrun.config import option
from diffrun.strategies.ops import bin_index

FIELDS = ("count", "loss_sum", "loss_sq_sum", "wloss_sum", "wloss_sq_sum", "weight_sum")


class LogSNRStats:
    def __init__(self, bins: int = 64, logsnr_min: float = -20.0, logsnr_max: float = 20.0, device="cpu"):
        self.bins, self.lo, self.hi = bins, logsnr_min, logsnr_max
        self.edges = torch.linspace(logsnr_min, logsnr_max, bins + 1)
        self.sums = torch.zeros(len(FIELDS), bins, dtype=torch.float64, device=device)

    @classmethod
    def from_config(cls, stats_cfg, schedule=None, device="cpu") -> "LogSNRStats":
        """Bins from `cfg.stats`: [logsnr_min, logsnr_max], or the schedule's own [λ(1), λ(0)] with range=schedule."""
        lo, hi = stats_range(stats_cfg, schedule)
        return cls(stats_cfg.bins, lo, hi, device)

    @torch.no_grad()
    def update(self, logsnr: Tensor, loss: Tensor, weight: Tensor, good: Tensor | None = None) -> None:
        """Add one batch; with `good` (0-d bool) False the batch adds nothing (a skipped step)."""
        index = bin_index(logsnr, self.lo, self.hi, self.bins)
        loss, weight = loss.double(), weight.double()
        wloss = weight * loss
        values = torch.stack([torch.ones_like(loss), loss, loss**2, wloss, wloss**2, weight])
        if good is not None:
            values = values * good
        self.sums.index_add_(1, index, values)

    def reduce_(self, reducer) -> None:
        """Sum across ranks (DDP): pass e.g. `torch.distributed.all_reduce`."""
        reducer(self.sums)

    def flush(self) -> dict[str, Tensor]:
        """Read the window's statistics (one host transfer) and reset. Empty bins give NaN means."""
        sums = self.sums.to("cpu", copy=True)  # a copy: on CPU `.cpu()` would alias the sums zeroed below
        self.sums.zero_()
        count, loss_sum, loss_sq, wloss_sum, wloss_sq, weight_sum = sums
        safe = count.clamp(min=1)
        nan = torch.full_like(count, float("nan"))
        has = count > 0
        mean = torch.where(has, loss_sum / safe, nan)
        wmean = torch.where(has, wloss_sum / safe, nan)
        var = torch.where(count > 1, (loss_sq - count * mean.nan_to_num() ** 2) / (count - 1).clamp(min=1), nan)
        wvar = torch.where(count > 1, (wloss_sq - count * wmean.nan_to_num() ** 2) / (count - 1).clamp(min=1), nan)
        return {
            "count": count,
            "loss_mean": mean,
            "loss_var": var.clamp(min=0),
            "wloss_mean": wmean,
            "wloss_var": wvar.clamp(min=0),
            "weight_mean": torch.where(has, weight_sum / safe, nan),
        }


def stats_range(stats_cfg, schedule=None) -> tuple[float, float]:
    """The λ range the bins span: [stats.logsnr_min, stats.logsnr_max], or with `stats.range=schedule`
    the schedule's own [λ(t=1), λ(t=0)] (falls back to the fixed range if that is not finite)."""
    mode = stats_cfg.get("range", "fixed")
    if option(mode) == "schedule" and schedule is not None:
        lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
        if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
            return lo, hi
    return float(stats_cfg.logsnr_min), float(stats_cfg.logsnr_max)
