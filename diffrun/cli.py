"""`diffrun`: compose a run with Hydra, train it, sample it, score it.

    diffrun                                   # digits, unet_small, CPU, a few minutes
    diffrun dataset=cifar10 model=ddpm_cifar10 weighting=min_snr
    diffrun -m seed=0,1,2 weighting=uniform,min_snr sweep_name=minsnr
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from diffrun import conf_dir
from diffrun.config import DistConfig, register_configs, validate
from diffrun.errors import DiffrunError

log = logging.getLogger("diffrun")
CONF_DIR = str(conf_dir())

register_configs()


class JobFailed(DiffrunError, CompactHydraException):
    """A multirun job's DiffrunError as the sweeper re-raises it at the end: Hydra prints it as one line."""


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
    from diffrun.launching import distributed
    from diffrun.training.callbacks import default_callbacks
    from diffrun.training.environment import resolve_device

    dist_cfg = cfg.get("dist") or DistConfig()
    if dist_cfg.devices > 1 and not distributed.env_info().enabled:
        # dist.devices=N: this process is rank 0, ranks 1..N-1 run this same function (resolved config: no
        # second ${now:} in the children)
        cfg = copy.deepcopy(cfg)
        OmegaConf.resolve(cfg)
        with distributed.local_ranks(dist_cfg.devices, "diffrun.cli:train", (cfg, run_dir)):
            return train(cfg, run_dir)
    with distributed.session(resolve_device(cfg.device), dist_cfg.backend, dist_cfg.timeout_s) as ranks:
        try:
            trainer = Trainer(cfg, run_dir)
            trainer.callbacks.extend(default_callbacks(cfg, trainer))
        except Exception as exc:  # a job of a sweep that cannot even start still says why in its folder
            if ranks.is_main:
                write_failed_status(run_dir, status, cfg, exc)
            raise
        return trainer.fit()


def write_failed_status(run_dir: Path, previous: dict, cfg: DictConfig, exc: BaseException) -> None:
    from diffrun.training.checkpoint import atomic_write_json

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "status.json", {"state": "failed", "step": previous.get("step", 0),
                                                    "total_steps": cfg.train.steps, "error": f"{type(exc).__name__}: {exc}"})
    except OSError:
        pass  # the run directory itself is the problem; the exception says so


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffrun.launching import distributed
    from diffrun.launching.preflight import remove_hydra_leftovers
    from diffrun.launching.sweep import pin_sweep_name, record_job_start

    pin_sweep_name(cfg)
    hydra_cfg = HydraConfig.get()
    try:
        # A single run was checked before Hydra made its folder (launching/preflight.py); a multirun job is
        # checked here too, on the machine it runs on (a SLURM node's devices and paths).
        validate(cfg)
    except DiffrunError as exc:
        log.error("%s", exc)
        remove_hydra_leftovers(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)
        if hydra_cfg.mode.name == "RUN":
            sys.exit(1)
        raise JobFailed(str(exc)) from exc
    if distributed.env_info().rank == 0:
        record_job_start(cfg, previous_state=read_status(run_dir_of(cfg)).get("state"))  # multirun: <sweep>/index.jsonl
    else:  # torchrun / srun ranks > 0: warnings only, and not into rank 0's log file
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    try:
        summary = train(cfg)
    except DiffrunError as exc:
        log.error("%s", exc)
        if hydra_cfg.mode.name == "RUN":
            sys.exit(1)
        raise JobFailed(str(exc)) from exc
    log.info("done: %s", summary)
    return summary.get("fid") if isinstance(summary, dict) else None


if __name__ == "__main__":
    main()
