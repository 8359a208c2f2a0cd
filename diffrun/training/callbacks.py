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

    # --- per-log-SNR statistics → <run>/logsnr_stats.npz --------------------------------------------
    writer = None
    if trainer.rank == 0 and cfg.stats.get("write", True):
        from diffrun.monitoring.stats_writer import StatsWriter

        writer = StatsWriter(trainer.run_dir, trainer.stats.edges.numpy(), run_name=str(cfg.name),
                             strategy=str(cfg.weighting.get("name", "")))
        callbacks.append(writer)

    # --- Weights & Biases (rank 0; None when disabled) ----------------------------------------------
    from diffrun.monitoring.wandb_logger import WandbLogger

    logger = WandbLogger.create(cfg, trainer, stats_source=writer)
    if logger is not None:
        callbacks.append(logger)

    # --- FID / KID with torch-fidelity (rank 0; skipped with a reason when Inception is unavailable)
    if cfg.eval.enabled and trainer.rank == 0:
        from diffrun.evaluation.callback import FIDCallback

        callbacks.append(FIDCallback(cfg, trainer))
    return callbacks
