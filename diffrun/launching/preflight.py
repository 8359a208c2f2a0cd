"""A bad config is refused before Hydra makes anything on disk.

Hydra creates the run directory, `.hydra/` and the job's log file before it calls the task function, so a
check inside `diffrun.cli.main` is too late to leave nothing behind. `ValidateBeforeRun` (a Hydra callback,
`hydra.callbacks` in conf/config.yaml) runs `validate` earlier:

    diffrun ...        on_run_start: before the run directory exists; also checks that hydra.run.dir can
                       be made. A bad value prints one line and exits with status 1.
                       A launcher (`hydra/launcher=`) or a preset that sweeps (`hydra.sweeper.params`) is
                       refused without `-m`, naming the command that runs the sweep.
    ... --dry-run      the same checks, then the plan and what the jobs need (diffrun/launching/dry_run.py),
                       and an exit before Hydra makes anything.
    diffrun -m ...     on_multirun_start: before the sweep directory exists, every job the basic sweeper
                       will start is composed and checked (its values; with the local launcher also this
                       machine's devices and paths). A SLURM job is checked against what its launcher asks
                       for (`check_launcher_resources`: GPUs, precision, ranks, the data and files it will
                       read), and the submission needs sbatch and srun here. Each bad job prints one line
                       naming its overrides; then the sweep exits with status 1. The node checks its own
                       devices and paths again when the job starts.

A job that fails its checks where it runs (a SLURM node without the GPU it asked for, or a sweeper other
than the basic one) removes what Hydra made for it, `remove_hydra_leftovers`, and fails with its message.
"""
from __future__ import annotations

import copy
import logging
import re
import shlex
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffrun.checks import check_writable_dir, show
from diffrun.config import option
from diffrun.distributed import check_batch
from diffrun.errors import ConfigError, DiffrunError
from diffrun.launching import dry_run
from diffrun.training.environment import cpu_threads
from diffrun.validation import check_dataset_files, validate

_CHECKED: set[int | None] = set()   # jobs this process validated, environment included (None: the single run)

log = logging.getLogger("diffrun")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def refuse(messages: list[str]) -> None:
    """Print each message on one line (Hydra's job logging is not set up yet) and exit with status 1."""
    for message in messages:
        print(f"[diffrun][ERROR] - {message}", file=sys.stderr)
    sys.exit(1)


class ValidateBeforeRun(Callback):
    """conf/config.yaml `hydra.callbacks.validate`: the checks of diffrun/validation.py before Hydra writes anything."""

    dry_run = False   # `--dry-run` on the command line (diffrun.cli.main): print the plan, then exit

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        checked = copy.deepcopy(config)
        try:
            check_single_run(config)
            validate(checked)
            _CHECKED.add(None)
            cpu_threads()               # a malformed OMP_NUM_THREADS / SLURM_CPUS_PER_TASK
            check_writable_dir(config.hydra.run.dir, "hydra.run.dir")
        except DiffrunError as exc:
            if not self.dry_run:
                refuse([str(exc)])
            dry_run.report(config, [(command_overrides(config, "task"), checked)], {0: str(exc)}, launcher_name(config))
        if self.dry_run:
            dry_run.report(config, [(command_overrides(config, "task"), checked)], {}, launcher_name(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        except DiffrunError as exc:
            refuse([str(exc)])
        local = config.hydra.launcher._target_ == BASIC_LAUNCHER
        slurm = is_slurm_launcher(config.hydra.launcher)
        jobs = sweep_jobs(config)
        values = defaultdict(set)   # key → the overrides of it the jobs have; a job is named by those that vary
        for overrides, _ in jobs:
            for override in overrides:
                values[override.split("=", 1)[0]].add(override)
        swept = {override for overrides in values.values() if len(overrides) > 1 for override in overrides}
        failures, labels = {}, {}   # job number → its message; → "job 1 (weighting=min_snr)"
        for num, (overrides, job) in enumerate(jobs):
            try:
                validate(job, environment=local)
                if local:
                    _CHECKED.add(num)
                if slurm:
                    check_launcher_resources(job, config.hydra.launcher, launcher_name(config))
            except DiffrunError as exc:
                name = " ".join(o for o in overrides if o in swept)
                failures[num], labels[num] = str(exc), f"job {num}{f' ({name})' if name else ''}"
        problems = []
        if slurm:
            try:
                check_slurm_commands(launcher_name(config))
            except DiffrunError as exc:
                problems.append(str(exc))
        if self.dry_run:
            dry_run.report(config, jobs, failures, launcher_name(config), problems, multirun=True)
        if len(failures) > 1 and len(failures) == len(jobs) and len(set(failures.values())) == 1:
            refuse([f"every job of the sweep: {next(iter(failures.values()))}"])
        if failures:
            refuse([f"{labels[num]}: {message}" for num, message in failures.items()])
        if problems:
            refuse(problems)


def launcher_name(config: DictConfig) -> str:
    return str(config.hydra.runtime.choices.get("hydra/launcher") or "the launcher")


def is_slurm_launcher(launcher: DictConfig) -> bool:
    return str(launcher.get("_target_", "")).endswith("SlurmLauncher")


def command_overrides(config: DictConfig, which: str) -> list[str]:
    """The command line's `hydra` or `task` overrides as typed (an interpolation in a value is not resolved)."""
    return [str(o) for o in OmegaConf.to_container(config.hydra.overrides, resolve=False).get(which) or []]


def command_line(config: DictConfig, multirun: bool) -> str:
    """The `diffrun` command that composed `config`, as the user would type it (with `-m` when `multirun`)."""
    words = [o for o in command_overrides(config, "hydra") if not o.startswith("hydra.mode=")]
    words += command_overrides(config, "task")
    return shlex.join(["diffrun", *(["-m"] if multirun else []), *words])


def check_single_run(config: DictConfig) -> None:
    """A single run (no `-m`) that was meant as a sweep: Hydra would ignore the launcher, or train only the first
    job of a preset's sweep, on this machine."""
    launchers = [o for o in command_overrides(config, "hydra") if o.split("=", 1)[0].lstrip("+") == "hydra/launcher"]
    if launchers:
        raise ConfigError(f"{launchers[0]} launches the jobs of a sweep and is ignored without -m (the run would "
                          f"train here, on this machine); run: {command_line(config, multirun=True)}")
    given = {o.split("=", 1)[0].lstrip("+~") for o in command_overrides(config, "task")}
    params = config.hydra.sweeper.get("params") or {}
    swept = {key: str(values) for key, values in params.items() if "," in str(values) and key not in given}
    if swept:
        preset = config.hydra.runtime.choices.get("experiment")
        what = f"experiment={preset}" if preset else "this config"
        jobs = " × ".join(f"{key}: {values}" for key, values in swept.items())
        pick = " ".join(f"{key}=<one of {values}>" for key, values in swept.items())
        raise ConfigError(f"{what} is a sweep ({jobs}) and without -m only its first job would train, here; run "
                          f"every job with: {command_line(config, multirun=True)} hydra/launcher=slurm_gpu (or "
                          f"hydra/launcher=local), or one job with {pick}")


def launcher_gpus(launcher: DictConfig) -> int:
    """GPUs per node the launcher asks SLURM for: `gpus_per_node`, else a `gres: gpu[:type]:N`."""
    if launcher.get("gpus_per_node"):
        return int(launcher.gpus_per_node)
    gres = str(launcher.get("gres") or (launcher.get("additional_parameters") or {}).get("gres") or "")
    found = re.search(r"gpu(?::[\w-]+)?:(\d+)", gres)
    return int(found[1]) if found else (1 if re.fullmatch(r"gpu(:[\w-]+)?", gres) else 0)


def check_launcher_resources(job: DictConfig, launcher: DictConfig, name: str) -> None:
    """One job of a SLURM sweep against what `hydra/launcher=<name>` asks for, before anything is submitted: a
    GPU where the run needs one, one task (rank) per GPU, a batch the ranks share evenly, and the data and files
    the job reads (from this machine: a login node sees the cluster's shared paths)."""
    gpus = launcher_gpus(launcher)
    nodes, tasks = int(launcher.get("nodes") or 1), int(launcher.get("tasks_per_node") or 1)
    device, precision = str(job.device), option(job.precision)
    gpu_presets = "hydra/launcher=slurm_gpu (or slurm_multinode)"
    if gpus == 0:
        asked = (f"hydra/launcher={name} gives each job no GPU "
                 f"(hydra.launcher.gpus_per_node={launcher.get('gpus_per_node') or 'null'})")
        if device.startswith("cuda"):
            raise ConfigError(f"device={device} needs a GPU, and {asked}; use {gpu_presets}, or device=cpu")
        if precision in ("fp16", "bf16"):
            raise ConfigError(f"precision={precision} is a GPU precision, and {asked}: the job would fail (fp16) or "
                              f"crawl (bf16) on the node's CPU; use {gpu_presets}, or precision=fp32")
    elif tasks > gpus:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} with hydra.launcher.gpus_per_node={gpus}: one task "
                          f"is one rank and needs a GPU of its own; allowed tasks_per_node <= gpus_per_node")
    if device == "mps":
        raise ConfigError(f"device=mps: SLURM nodes have no Apple GPU; allowed auto, cpu or cuda with "
                          f"hydra/launcher={name}")
    world = nodes * tasks
    if world > 1 and job.dist.devices > 1:
        raise ConfigError(f"dist.devices={job.dist.devices} with hydra/launcher={name}: the launcher starts the ranks "
                          f"({nodes} node(s) × {tasks} task(s)); allowed dist.devices=1")
    if gpus and job.dist.devices > gpus and not device.startswith("cpu"):
        raise ConfigError(f"dist.devices={job.dist.devices}: one GPU per rank, and hydra/launcher={name} asks for "
                          f"hydra.launcher.gpus_per_node={gpus}; allowed dist.devices <= {gpus}")
    check_batch(job.train.batch_size, world, f"the {world} ranks hydra/launcher={name} starts ({nodes} node(s) × "
                                             f"{tasks} task(s))")
    for key in ("eval.inception_weights", "eval.reference_stats"):
        value = OmegaConf.select(job, key)
        if job.eval.enabled and value is not None and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"{key}={show(str(value))}: no such file (checked from this machine, which submits "
                              f"the jobs); allowed a file the nodes can read, or null")
    check_dataset_files(job)


def check_slurm_commands(name: str) -> None:
    """submitit submits with sbatch and starts each job's tasks with srun: both must be on this machine's PATH."""
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise ConfigError(f"hydra/launcher={name} submits with sbatch and srun, and this machine has no "
                          f"{' or '.join(missing)} on PATH: run the command on a SLURM login node, or use "
                          f"hydra/launcher=local to run the jobs here")


def checked_in_this_process(job: int | None) -> bool:
    """Whether this process validated job number `job` (None: the single run) before Hydra started it, with this
    machine's environment: then diffrun.cli does not check it again."""
    return job in _CHECKED


def sweep_jobs(config: DictConfig) -> list[tuple[list[str], DictConfig]]:
    """(overrides, composed config) of every job the basic sweeper will launch; none for other sweepers
    (each of their jobs is checked when it starts) or when a job does not compose (the sweeper says why)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper._target_ != BASIC_SWEEPER or GlobalHydra.instance().hydra is None:
        return []
    loader = GlobalHydra.instance().hydra.config_loader
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.params or {}).items()] + list(config.hydra.overrides.task)
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(params)
        batches = BasicSweeper.split_arguments(parsed, None)
        return [(job, loader.load_sweep_config(config, list(job))) for batch in batches for job in batch]
    except Exception as exc:  # noqa: BLE001 — Hydra reports composition errors itself, with its own message
        log.debug("sweep jobs not checked before launch: %s", exc)
        return []


def remove_hydra_leftovers(run_dir: Path, job_name: str) -> bool:
    """Remove what Hydra wrote for this job (`.hydra/{config,hydra,overrides}.yaml`, `<job_name>.log`) and the
    directory itself, if that is all it holds. A directory that already held a run has status.json,
    checkpoints or metrics beside them, and is left as it is. Returns whether the directory is gone."""
    run_dir = Path(run_dir)
    hydra_dir = run_dir / ".hydra"
    ours = {".hydra", f"{job_name}.log"}
    try:
        if not run_dir.is_dir() or any(p.name not in ours for p in run_dir.iterdir()):
            return False
        if hydra_dir.exists() and any(p.name not in HYDRA_FILES or not p.is_file() for p in hydra_dir.iterdir()):
            return False
        for name in HYDRA_FILES:
            (hydra_dir / name).unlink(missing_ok=True)
        if hydra_dir.exists():
            hydra_dir.rmdir()
        (run_dir / f"{job_name}.log").unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError as exc:
        log.warning("could not remove %s after the failed checks: %s", run_dir, exc)
        return False
    return True


def override_character_errors(args: list[str]) -> list[str]:
    """One line for each command-line override Hydra's grammar refuses for a character outside printable
    ASCII (an emoji, a right-to-left mark, a bell, Arabic-Indic digits, full-width letters): which key, which
    character, and what is allowed. Hydra's own message points at the character without saying what to do."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    errors = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        bad = next((c for c in arg if not " " <= c <= "~"), None)
        if bad is None:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            errors.append(_character_error(arg, bad))
    return errors


def _character_error(arg: str, bad: str) -> str:
    import unicodedata

    key, value = arg.split("=", 1)
    category = unicodedata.category(bad)
    name = unicodedata.name(bad, "a control character" if category == "Cc" else "unnamed")
    fixed = "".join(str(unicodedata.digit(c)) if unicodedata.category(c) == "Nd" else
                    "" if unicodedata.category(c) in ("Cc", "Cf") else unicodedata.normalize("NFKC", c) for c in value)
    if category == "Nd":
        hint = f"numbers take ASCII digits 0-9: {key}={fixed}"
    elif category in ("Cc", "Cf"):
        hint = f"it is an invisible control or formatting character; type the value without it: {key}={fixed}"
    elif fixed.isascii() and fixed != value:
        hint = f"write it in ASCII: {key}={fixed}"
    else:
        hint = f"unquoted values take ASCII only; quote a value (a name) that needs other characters: {key}='{value}'"
    return f"{key.lstrip('+~')}: U+{ord(bad):04X} ({name}) is not allowed here; {hint}"
