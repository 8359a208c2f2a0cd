"""The sweep index: `<sweep_dir>/index.jsonl`, one line each time a job of a multirun starts.

A multirun writes one folder per job, `<sweep_dir>/<job_num>_<weighting>_seed<seed>/`; the index says
which folder is which strategy, seed and launcher job, and how often it was (re)started:

    {"event": "start", "job_num": 3, "dir": "3_min_snr_seed1", "weighting": "min_snr", "seed": 1,
     "dataset": "digits", "overrides": ["weighting=min_snr", "seed=1"], "slurm_job_id": "412_3",
     "restart_count": 1, "previous_state": "interrupted", "start_time": "2026-...", ...}

Jobs of a SLURM array start concurrently (on several nodes), so the file is append-only: each start
appends one line with a single `write` under an exclusive `flock`, and nothing ever rewrites it. A
requeued or rerun job appends another line for the same folder; readers (`diffrun-report`, via
`diffrun.reporting.collect.read_index`) keep the last line per folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
INDEX_NAME = "index.jsonl"


def slurm_job_id() -> str | None:
    """`<array job>_<task>` for an array task (as squeue/sacct print it), else SLURM_JOB_ID; None off SLURM."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def job_entry(cfg: DictConfig, run_dir: Path, sweep_dir: Path, job_num: int, overrides: list[str],
              launcher_job_id: str | None = None, previous_state: str | None = None) -> dict:
    run_dir, sweep_dir = Path(run_dir).absolute(), Path(sweep_dir).absolute()
    try:
        folder = str(run_dir.relative_to(sweep_dir))
    except ValueError:  # a hydra.sweep.subdir outside the sweep dir: name the folder itself
        folder = run_dir.name
    return {
        "event": "start",
        "job_num": job_num,
        "dir": folder,
        "weighting": OmegaConf.select(cfg, "weighting.name"),
        "seed": OmegaConf.select(cfg, "seed"),
        "dataset": OmegaConf.select(cfg, "dataset.name"),
        "model": OmegaConf.select(cfg, "model.name"),
        "name": OmegaConf.select(cfg, "name"),
        "sweep_name": OmegaConf.select(cfg, "sweep_name"),
        "overrides": list(overrides),
        "slurm_job_id": slurm_job_id(),
        "launcher_job_id": launcher_job_id,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
        "previous_state": previous_state,          # None: a fresh job; finished: it will be skipped
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def append_entry(sweep_dir: Path, entry: dict) -> Path:
    """Append one line to `<sweep_dir>/index.jsonl` (safe with concurrent writers, also on NFS)."""
    path = Path(sweep_dir) / INDEX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)  # releases the lock
    return path


def pin_sweep_name(cfg: DictConfig) -> None:
    """In a multirun without an explicit `sweep_name=`, name the sweep after its directory.

    The default `sweep_name: ${now:...}` is resolved by each job when `hydra.sweep.dir` was given on the
    command line (nothing resolved it in the launching process), so jobs started seconds apart would
    disagree (W&B groups, report titles). The directory is what the jobs share."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    if hc.mode != RunMode.MULTIRUN or any(o.split("=", 1)[0].lstrip("+~") == "sweep_name" for o in hc.overrides.task):
        return
    cfg.sweep_name = Path(str(hc.sweep.dir)).name


def record_job_start(cfg: DictConfig, previous_state: str | None = None) -> Path | None:
    """In a Hydra multirun, add this job to the sweep index; returns the index path (None outside a
    multirun). Never fails the job: an unwritable index is a warning."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    try:
        sweep_dir = Path(str(hc.sweep.dir))
        entry = job_entry(cfg, Path(hc.runtime.output_dir), sweep_dir, int(hc.job.num), list(hc.overrides.task),
                          launcher_job_id=OmegaConf.select(hc, "job.id"), previous_state=previous_state)
        return append_entry(sweep_dir, entry)
    except Exception as exc:  # the index is bookkeeping: the job's own folder says everything too
        log.warning("could not add this job to the sweep index: %s", exc)
        return None
