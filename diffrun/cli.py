"""`diffrun`: compose a run with Hydra, train it, sample it, score it.

    diffrun                                   # digits, unet_small, CPU, a few minutes
    diffrun dataset=cifar10 model=ddpm_cifar10 weighting=min_snr
    diffrun -m seed=0,1,2 weighting=uniform,min_snr sweep_name=minsnr
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffrun.config import register_configs
from diffrun.errors import DiffrunError

log = logging.getLogger("diffrun")
CONF_DIR = os.environ.get("DIFFRUN_CONF", str(Path(__file__).resolve().parent.parent / "conf"))

register_configs()


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests, submitit pickles)
        return Path("outputs/runs") / cfg.name


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Train one run in `run_dir`; skips a run whose directory says it finished (idempotent sweeps)."""
    from diffrun.training.trainer import Trainer

    run_dir = Path(run_dir or run_dir_of(cfg))
    status = read_status(run_dir)
    if status.get("state") == "finished" and cfg.resume != "never" and status.get("total_steps") == cfg.train.steps:
        log.info("run %s already finished (%s/status.json); skipping. Use resume=never to train it again.", cfg.name, run_dir)
        return status
    from diffrun.training.callbacks import default_callbacks

    trainer = Trainer(cfg, run_dir)
    trainer.callbacks.extend(default_callbacks(cfg, trainer))
    return trainer.fit()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except DiffrunError as exc:
        log.error("%s", exc)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(1)
        raise
    log.info("done: %s", summary)
    return summary.get("fid") if isinstance(summary, dict) else None


if __name__ == "__main__":
    main()
