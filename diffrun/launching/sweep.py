"""What a multirun job adds to the sweep index (`<sweep_dir>/index.jsonl`, the file: diffrun.run_folder.index),
and what the sweep's plan says.

A multirun writes one folder per job, `<sweep_dir>/<job_num>_<weighting>_seed<seed>/`; the index says
which folder is which strategy, seed and launcher job, and how often it was (re)started:

    {"event": "start", "job_num": 3, "dir": "3_min_snr_seed1", "weighting": "min_snr", "seed": 1,
     "dataset": "digits", "overrides": ["weighting=min_snr", "seed=1"], "slurm_job_id": "412_3",
     "restart_count": 1, "previous_state": "interrupted", "start_time": "2026-...", ...}

A requeued or rerun job appends another line for the same folder; `diffrun-report` keeps the last line per
folder, `diffrun-status` counts them as restarts.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffrun.run_folder import MULTIRUN
from diffrun.run_folder.index import append_entry

log = logging.getLogger(__name__)


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


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job the basic sweeper launches for the sweep in `sweep_dir`, in job-number order,
    from the `multirun.yaml` it wrote before the first job (the sweep's lists: `hydra.sweeper.params` and the
    command line). None when there is no such file or it cannot be expanded here (e.g. `glob(...)`, which
    needs the config folder the sweep was composed from)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / MULTIRUN
    try:
        hydra_cfg = OmegaConf.load(path).hydra
        params = [f"{k}={v}" for k, v in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()]
        arguments = params + list(OmegaConf.select(hydra_cfg, "overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(arguments)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as exc:  # noqa: BLE001 — no file, an unreadable one, or a sweep this parser cannot expand
        log.debug("the sweep's plan (%s) could not be read: %s", path, exc)
        return None


def concurrent_jobs() -> tuple[int, str]:
    """How many jobs of this multirun the launcher runs at once on this machine, and which launcher says so.
    The basic launcher runs one after another; submitit's local launcher starts every job of the sweep at once
    (each with `tasks_per_node` processes); Hydra's joblib launcher runs `n_jobs`. SLURM jobs get CPUs of their
    own (1 here: the allocation is theirs)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return 1, "not a Hydra run"
    if hc.mode != RunMode.MULTIRUN:
        return 1, "a single run"
    target = str(OmegaConf.select(hc, "launcher._target_") or "")
    jobs = len(planned_jobs(Path(str(hc.sweep.dir))) or [None])
    if target.endswith("submitit_launcher.LocalLauncher"):
        tasks = int(OmegaConf.select(hc, "launcher.tasks_per_node") or 1)
        return jobs * tasks, f"submitit's local launcher runs the sweep's {jobs} job(s) at once" + (
            f", {tasks} tasks each" if tasks > 1 else "")
    if "joblib" in target:
        n_jobs = int(OmegaConf.select(hc, "launcher.n_jobs") or 1)
        if n_jobs < 0:  # joblib: -1 = every CPU, -2 = all but one, ...
            n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
        return min(n_jobs, jobs), f"the joblib launcher runs {min(n_jobs, jobs)} job(s) at once"
    return 1, "one job at a time on this machine"
