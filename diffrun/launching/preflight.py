"""A bad config is refused before Hydra makes anything on disk.

Hydra creates the run directory, `.hydra/` and the job's log file before it calls the task function, so a
check inside `diffrun.cli.main` is too late to leave nothing behind. `ValidateBeforeRun` (a Hydra callback,
`hydra.callbacks` in conf/config.yaml) runs `validate` earlier:

    diffrun ...        on_run_start: before the run directory exists; also checks that hydra.run.dir can
                       be made. A bad value prints one line and exits with status 1.
    diffrun -m ...     on_multirun_start: before the sweep directory exists, every job the basic sweeper
                       will start is composed and checked (its values; with the local launcher also this
                       machine's devices and paths: a SLURM job checks its node's when it starts). Each bad
                       job prints one line naming its overrides; then the sweep exits with status 1.

A job that fails its checks where it runs (a SLURM node without the GPU it asked for, or a sweeper other
than the basic one) removes what Hydra made for it, `remove_hydra_leftovers`, and fails with its message.
"""
from __future__ import annotations

import copy
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffrun.config import validate
from diffrun.errors import DiffrunError
from diffrun.training.environment import cpu_threads
from diffrun.validation import check_writable_dir

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

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            checked = copy.deepcopy(config)
            shorten_warmup(checked)     # diffrun.cli.main shortens the run's own config, and says so
            validate(checked)
            cpu_threads()               # a malformed OMP_NUM_THREADS / SLURM_CPUS_PER_TASK
            check_writable_dir(config.hydra.run.dir, "hydra.run.dir")
        except DiffrunError as exc:
            refuse([str(exc)])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        except DiffrunError as exc:
            refuse([str(exc)])
        local = config.hydra.launcher._target_ == BASIC_LAUNCHER
        jobs = sweep_jobs(config)
        values = defaultdict(set)   # key → the overrides of it the jobs have; a job is named by those that vary
        for overrides, _ in jobs:
            for override in overrides:
                values[override.split("=", 1)[0]].add(override)
        swept = {override for overrides in values.values() if len(overrides) > 1 for override in overrides}
        failures = {}
        for num, (overrides, job) in enumerate(jobs):
            try:
                shorten_warmup(job)
                validate(job, environment=local)
            except DiffrunError as exc:
                name = " ".join(o for o in overrides if o in swept)
                failures[f"job {num}{f' ({name})' if name else ''}"] = str(exc)
        if len(failures) > 1 and len(failures) == len(jobs) and len(set(failures.values())) == 1:
            refuse([f"every job of the sweep: {next(iter(failures.values()))}"])
        if failures:
            refuse([f"{job}: {message}" for job, message in failures.items()])


def shorten_warmup(cfg: DictConfig) -> str | None:
    """A learning-rate warm-up that is not shorter than the run (`optimizer.warmup_steps >= train.steps`, e.g. a
    quick `train.steps=60` with the default warm-up of 100) becomes a tenth of the run. Changes `cfg` in place
    (its run name stays the one Hydra's folder has) and returns the line to log; None when nothing changed."""
    warmup, steps = OmegaConf.select(cfg, "optimizer.warmup_steps"), OmegaConf.select(cfg, "train.steps")
    if not (isinstance(warmup, int) and isinstance(steps, int) and 0 < steps <= warmup):
        return None    # in range, or a value validation refuses with its own message
    if "name" in cfg:
        cfg.name = cfg.name        # resolved before the change: the name's fingerprint suffix must not move
    cfg.optimizer.warmup_steps = steps // 10
    return (f"optimizer.warmup_steps={warmup} is not shorter than train.steps={steps}: the learning rate warms up "
            f"over {steps // 10} steps (a tenth of the run) instead; set optimizer.warmup_steps to choose another")


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
