"""Which observers a run gets. Each is an object with any of these methods, called by the Trainer:

    on_flush(trainer, record: dict, stats: dict[str, Tensor])  # every train.log_every steps
    on_sample(trainer, images_uint8: Tensor, path: Path)       # after a sample grid is written
    on_step(trainer)                                           # after every step (keep it cheap: host-side only)
    on_train_end(trainer) -> dict | None                       # merged into the run summary / status.json
    close()                                                    # always called (finally), also on failure
"""
from __future__ import annotations

from omegaconf import DictConfig


def default_callbacks(cfg: DictConfig, trainer) -> list:
    callbacks: list = []
    return callbacks
