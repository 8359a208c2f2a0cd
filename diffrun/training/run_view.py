"""What a callback sees of a run: a small, typed, read-only view, the same for a training run (the Trainer
makes it) and for a checkpoint's evaluation (diffrun-eval makes it without building a Trainer).

A callback's settings come from its own config node (its constructor's arguments); the view holds only
what the run is and has now. `step` and `images_seen` are read live.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffrun.training.logsnr_stats import LogSNRStats

# (num_images, seed or one seed per image, settings node, its section name, class labels or None)
#   → (uint8 images, network evaluations per image); diffrun.sampling.generate.ImageSampler
Generate = Callable[..., tuple[torch.Tensor, int]]


class Results(Protocol):
    """Where a callback puts a result for the others (diffrun.training.callbacks.Events)."""

    def emit_eval(self, record: dict) -> None: ...
    def emit_sample(self, images, path: Path) -> None: ...


@dataclass(frozen=True)
class RunView:
    name: str                               # the run's name (titles, W&B)
    run_dir: Path
    job_type: str                           # "train", or "eval" for diffrun-eval (it only appends its record)
    config: DictConfig                      # the resolved config, read-only: what ran, for records of it (W&B's
                                            # run config and tags); never a callback's settings
    events: Results                         # emit_eval / emit_sample: results for the other callbacks
    data: object                            # the dataset: FID's reference images, image shape, classes
    ema: nn.Module                          # the EMA network that `generate` samples
    generate: Generate
    device: torch.device
    autocast_dtype: torch.dtype | None      # the run's training precision (`precision: train` of sampling)
    progress: Callable[[], tuple[int, int]]  # (step, images_seen) now
    stats: LogSNRStats | None = None        # per-log-SNR statistics of training; None in diffrun-eval
    rank: int = 0
    world_size: int = 1

    @property
    def step(self) -> int:
        return self.progress()[0]

    @property
    def images_seen(self) -> int:
        return self.progress()[1]


def recorded_config(cfg: DictConfig) -> DictConfig:
    """A resolved, read-only copy of `cfg` (RunView.config)."""
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_readonly(config, True)
    return config
