"""`<run>/logsnr_stats.npz`: the per-log-SNR-bin statistics of every flush, one row per flush.

Arrays (S flushes × B bins unless noted):

    step (S,), images_seen (S,)                        when the row was flushed
    count                                              samples drawn per bin in the window: the sampling
                                                       distribution of λ (density = count / Σcount / Δλ)
    loss_mean, loss_var                                unweighted per-sample loss ℓ (target space)
    wloss_mean, wloss_var                              weighted loss w·ℓ
    weight_mean                                        effective weight E[w | λ] the strategy applied
    edges (B+1,), centers (B,)                         the bins, in λ = log(α²/σ²)
    run_name, strategy (0-d strings)                   for plots without the config

Means are NaN where count = 0, variances where count < 2. The file is rewritten whole at every
flush, to a temporary name then `os.replace`d, so a killed run leaves the previous complete file.
After a resume the rows flushed after the checkpoint (step ≥ the first new flush) are dropped
before appending, so no step appears twice.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffrun.files import atomic_write
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

log = logging.getLogger(__name__)

FILENAME = "logsnr_stats.npz"
PER_BIN = ("count", "loss_mean", "loss_var", "wloss_mean", "wloss_var", "weight_mean")
PER_ROW = ("step", "images_seen")


def load_stats(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of a `logsnr_stats.npz` (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


class StatsWriter(Callback):
    """Appends the flushed per-bin statistics to `<run_dir>/logsnr_stats.npz` when `write` (`stats.write`);
    `strategy` (`weighting.name`) is stored beside them, for plots without the config."""

    def __init__(self, write: bool = True, strategy: str = ""):
        self.enabled = write
        self.strategy = strategy
        self.rows: dict[str, list[np.ndarray]] | None = None  # loaded lazily at the first flush (after resume)

    def on_start(self, run: RunView) -> None:
        self.path = Path(run.run_dir) / FILENAME
        self.edges = run.stats.edges.numpy().astype(np.float64)
        self.centers = 0.5 * (self.edges[1:] + self.edges[:-1])
        self.meta = {"run_name": np.array(run.name), "strategy": np.array(self.strategy)}

    # --- history ---------------------------------------------------------------------------------
    def _load_previous(self, first_step: int) -> dict[str, list]:
        rows: dict[str, list] = {key: [] for key in (*PER_ROW, *PER_BIN)}
        if not self.path.exists():
            return rows
        try:
            old = load_stats(self.path)
        except Exception as exc:  # unreadable (e.g. written by another version): keep it aside, start anew
            aside = self.path.with_name(self.path.stem + ".unreadable.npz")
            os.replace(self.path, aside)
            log.warning("could not read %s (%s); moved it to %s and started a new file", self.path, exc, aside)
            return rows
        if any(key not in old for key in (*PER_ROW, *PER_BIN, "edges")) or not np.array_equal(old["edges"], self.edges):
            aside = self.path.with_name(self.path.stem + ".previous_bins.npz")
            os.replace(self.path, aside)
            log.warning("%s has other log-SNR bins (stats.*) or fields than this run; moved it to %s", self.path, aside)
            return rows
        keep = old["step"] < first_step
        dropped = int((~keep).sum())
        if dropped:
            log.info("%s: dropping %d row(s) at step >= %d flushed after the resumed checkpoint",
                     self.path.name, dropped, first_step)
        for key in rows:
            rows[key] = list(old[key][keep])
        return rows

    def history(self) -> dict[str, np.ndarray] | None:
        """The arrays as they are now (S × B), or None before the first flush."""
        if not self.rows or not self.rows["step"]:
            return None
        out = {key: np.asarray(value) for key, value in self.rows.items()}
        out["step"] = out["step"].astype(np.int64)
        out["images_seen"] = out["images_seen"].astype(np.int64)
        out["count"] = out["count"].astype(np.int64)
        return {**out, "edges": self.edges, "centers": self.centers, **self.meta}

    # --- callback --------------------------------------------------------------------------------
    def on_flush(self, run: RunView, record: dict, stats: dict) -> None:
        if not self.enabled:
            return
        if self.rows is None:
            self.rows = self._load_previous(int(record["step"]))
        self.rows["step"].append(int(record["step"]))
        self.rows["images_seen"].append(int(record.get("images_seen", 0)))
        for key in PER_BIN:
            value = stats[key]
            value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            self.rows[key].append(value.astype(np.int64 if key == "count" else np.float32))
        try:
            history = self.history()
            atomic_write(self.path, lambda fh: np.savez(fh, **history))
        except OSError as exc:  # a full disk must not kill the run; the next flush tries again with all rows
            log.warning("could not write %s: %s", self.path, exc)
