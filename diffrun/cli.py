"""`diffrun`: compose a run with Hydra, train it, sample it, score it.

    diffrun                                   # digits, unet_small, CPU (docs/performance.md: how long)
    diffrun dataset=cifar10 model=ddpm_cifar10 weighting=min_snr
    diffrun -m seed=0,1,2 weighting=uniform,min_snr sweep_name=minsnr
    diffrun -m experiment=min_snr_cifar10 hydra/launcher=slurm_gpu --dry-run   # the jobs and checks, no training
"""
from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from diffrun import conf_dir
from diffrun.config import DistConfig
from diffrun.errors import DiffrunError
from diffrun.launching.hydra_node import register_app
from diffrun.run_folder import CHECKPOINTS, METRICS, STATUS
from diffrun.run_folder import status as run_status

log = logging.getLogger("diffrun")
CONF_DIR = str(conf_dir())

register_app()


class JobFailed(DiffrunError, CompactHydraException):
    """A multirun job's DiffrunError as the sweeper re-raises it at the end: Hydra prints it as one line."""


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests, submitit pickles)
        return Path("outputs/runs") / cfg.name


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Train one run in `run_dir`. A run that finished is skipped (idempotent sweeps), a run with checkpoints
    resumes; a directory that holds another run, or is being trained by another process, stops before any work."""
    from diffrun import distributed  # deferred: the training stack
    from diffrun.training.environment import resolve_device  # deferred: the training stack

    run_dir = Path(run_dir or run_dir_of(cfg))
    dist_cfg = cfg.get("dist") or DistConfig()
    if dist_cfg.devices > 1 and not distributed.env_info().enabled:
        # dist.devices=N: this process is rank 0, ranks 1..N-1 run this same function (resolved config: no
        # second ${now:} in the children)
        cfg = copy.deepcopy(cfg)
        OmegaConf.resolve(cfg)
        from diffrun.launching.local_ranks import local_ranks  # deferred: the training stack

        with local_ranks(dist_cfg.devices, "diffrun.cli:train", (cfg, run_dir)):
            return train(cfg, run_dir)
    with distributed.session(resolve_device(cfg.device), dist_cfg.backend, dist_cfg.timeout_s) as ranks:
        return _train_rank(cfg, run_dir, ranks.is_main)


def _train_rank(cfg: DictConfig, run_dir: Path, is_main: bool) -> dict:
    from diffrun import distributed  # deferred: the training stack
    from diffrun.launching.sweep import concurrent_jobs  # deferred: the training stack
    from diffrun.training.environment import set_cpu_threads  # deferred: the training stack
    from diffrun.training.identity import RunMismatchError  # deferred: the training stack
    from diffrun.training.run_directory import RunDirectory  # deferred: the training stack
    from diffrun.training.trainer import Trainer  # deferred: the training stack

    jobs, launcher = concurrent_jobs()   # the jobs and ranks that share this machine's CPUs with this process
    set_cpu_threads(jobs * distributed.local_processes(), launcher if jobs > 1 else "")
    directory = RunDirectory(run_dir)
    if is_main:
        directory.lock()   # a second process on this run stops here, naming the holder
    try:
        status = directory.check_identity(cfg, force=str(cfg.resume) == "force")
        finished = status.get("state") == run_status.FINISHED and status.get("total_steps") == cfg.train.steps
        if finished and cfg.resume != "never":
            log.info("run %s already finished (%s/%s); skipping. Use resume=never to train it again.",
                     cfg.name, run_dir, STATUS)
            directory.unlock()
            return status
        trainer = Trainer(cfg, run_dir, directory=directory if is_main else None)
    except BaseException as exc:
        if is_main and not isinstance(exc, RunMismatchError):  # a sweep job that cannot start still says why
            previous = run_status.read_status(run_dir) or {}
            run_status.write_status(run_dir, run_status.FAILED, int(previous.get("step", 0)), cfg.train.steps,
                                    error=f"{type(exc).__name__}: {exc}")
        directory.unlock()
        raise
    return trainer.fit()


def closing_summary(cfg: DictConfig, run_dir: Path, summary: dict) -> str:
    """What a run left, in a few lines: how far it got, FID/KID (or why there is none) and where the files are."""
    step, stopped = summary.get("step", "?"), summary.get("interrupted")
    if stopped:
        head = (f"stopped {cfg.name} at step {step}/{cfg.train.steps} after a signal (checkpoint saved); rerun the "
                f"same command to continue")
    else:
        head = f"finished {cfg.name}: {step} steps"
    if "fid" in summary:
        count = f" ({summary['fid_num_samples']} EMA samples)" if "fid_num_samples" in summary else ""
        kid = f", KID {summary['kid_mean']:.4f} ± {summary['kid_std']:.4f}" if "kid_mean" in summary else ""
        head += f"; FID {summary['fid']:.2f}{kid}{count}"
    elif summary.get("fid_skipped"):
        head += f"; FID skipped: {summary['fid_skipped']}"
    elif not cfg.eval.enabled and not stopped:
        head += "; no FID (eval.enabled=false)"
    files = [("run directory", run_dir), ("metrics", run_dir / METRICS), ("checkpoints", run_dir / CHECKPOINTS)]
    if summary.get("samples"):
        files.insert(1, ("samples", summary["samples"]))
    return "\n".join([head] + [f"  {what:<14} {shown(where)}" for what, where in files])


def shown(path) -> str:
    """A path relative to the working directory when it lies inside it (as the user would type it)."""
    path = Path(path)
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:
    """The `diffrun` command: Hydra's command line, plus `--dry-run` (diffrun/launching/dry_run.py)."""
    from diffrun.launching import dry_run  # deferred: the training stack
    from diffrun.launching.preflight import ValidateBeforeRun, override_character_errors, refuse  # deferred

    errors = override_character_errors(sys.argv[1:])     # characters Hydra's grammar cannot read: one line each
    if errors:
        refuse(errors)
    ValidateBeforeRun.dry_run = dry_run.take_flag(sys.argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")   # Hydra's errors reach `say_override_error`, not its printer
    try:
        hydra_main()
    except Exception as exc:  # noqa: BLE001 — what is not an override failure goes on as Hydra would show it
        say_override_error(exc)
        raise


def say_override_error(exc: BaseException) -> None:
    """Exit with diffrun's one line when `exc` is a failure of the command line's overrides (or a job's
    CompactHydraException, which Hydra prints as one line too); return otherwise."""
    from diffrun.launching.overrides import override_error  # deferred: the training stack

    args = hydra_args()
    message = override_error(exc, args.overrides, [args.config_dir] if args.config_dir else [])
    if message is not None:
        print(f"[diffrun][ERROR] - {message}", file=sys.stderr)
        sys.exit(1)
    if isinstance(exc, CompactHydraException):
        print(str(exc), file=sys.stderr)
        sys.exit(1)


def hydra_args():
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(sys.argv[1:])[0]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from diffrun import distributed  # deferred: the training stack
    from diffrun.launching.preflight import checked_in_this_process, remove_hydra_leftovers  # deferred
    from diffrun.launching.sweep import pin_sweep_name, record_job_start  # deferred: the training stack
    from diffrun.validation import validate  # deferred: the training stack

    pin_sweep_name(cfg)
    hydra_cfg = HydraConfig.get()
    try:
        # Once per process: a single run and the jobs of a local multirun were checked before Hydra made their
        # folders (launching/preflight.py); a job that starts in a process of its own (a SLURM job on its node,
        # a torchrun rank) is checked here, with that machine's devices and paths.
        if not checked_in_this_process(None if hydra_cfg.mode.name == "RUN" else hydra_cfg.job.num):
            validate(cfg)
    except DiffrunError as exc:
        log.error("%s", exc)
        remove_hydra_leftovers(Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.name)
        if hydra_cfg.mode.name == "RUN":
            sys.exit(1)
        raise JobFailed(str(exc)) from exc
    if distributed.env_info().rank == 0:
        previous = (run_status.read_status(run_dir_of(cfg)) or {}).get("state")
        record_job_start(cfg, previous_state=previous)  # multirun: <sweep>/index.jsonl
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
    log.info("%s", closing_summary(cfg, run_dir_of(cfg), summary))
    return summary.get("fid") if isinstance(summary, dict) else None


if __name__ == "__main__":
    main()
