"""One W&B run per diffrun run (docs/wandb.md): its id in `<run>/wandb_id.txt`, its group and tags, and its start.

* The id is kept in `<run>/wandb_id.txt` (`resume="allow"`), so a requeued job and an evaluation job
  (`diffrun-eval`, job_type eval) continue it. One writer at a time: the process writing to that id holds
  `<run>/wandb/writer.lock`; an evaluation job that finds it held (training still running) writes a sibling
  W&B run `<id>-eval-<step>` instead, and a training job that finds it held (an evaluation writing) logs offline.
* Never a prompt: online needs credentials found without asking; the online attempt is bounded by
  `wandb.init_timeout` seconds, after which the run logs offline into a fresh `<run>/wandb/offline-run-*` with
  the same id, which `wandb sync` uploads later into the same W&B run. If W&B still refuses to start, the run
  logs offline without W&B's environment variables, so no W&B data is lost.
* Comparable across strategies: group `<sweep or experiment>/<strategy>` (one chart line per strategy, a band
  over seeds), every series against `images_seen` (also `kimg`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffrun.files import atomic_write, try_lock, unlock
from diffrun.monitoring.wandb_mode import ENV_MODES, resolve_mode, unusable_environment

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
WRITER_LOCK = "writer.lock"                     # in <run>/wandb/: held by the process writing to the W&B id
STEP_METRIC = "images_seen"                     # the x-axis of every series
SERIES = ("train/*", "eval/*", "eval_*", "stats/*", "logsnr_band/*", "samples", "kimg")


def run_id(run_dir: Path, name: str, fresh: bool = False) -> str:
    """The W&B run id kept in `<run_dir>/wandb_id.txt`; created from the name and directory the first time.

    `fresh` (resume=never: the run is trained again from scratch) starts a new W&B run instead.
    """
    path = run_dir / ID_FILE
    if path.exists() and not fresh:
        text = path.read_text().strip()
        if text:
            return text
    digest_of = str(run_dir.resolve()) + (f"@{time.time_ns()}-{os.getpid()}" if fresh else "")
    digest = hashlib.sha1(digest_of.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:48] or "run"
    value = f"{slug}-{digest}"
    atomic_write(path, value + "\n")
    return value


def strategy_of(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "weighting.name", default=None) or "unknown")


def sweep_label(cfg: DictConfig, group: str | None) -> str | None:
    """What the runs being compared share: `group` (`wandb.group`), else the experiment preset, else the sweep
    name in a multirun; None for a lone run."""
    if group:
        return str(group)
    if cfg.get("experiment"):
        return str(cfg.experiment)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return str(cfg.sweep_name)
    except (ValueError, ImportError):  # outside a Hydra app
        pass
    return None


def group_name(cfg: DictConfig, group: str | None) -> str | None:
    """`<sweep or experiment>/<strategy>`: W&B's grouped charts then draw one line per strategy (mean and
    a band over its seeds) instead of averaging every strategy of the sweep into one."""
    label = sweep_label(cfg, group)
    return f"{label}/{strategy_of(cfg)}" if label else None


def default_tags(cfg: DictConfig, extra: list) -> list[str]:
    def name(key):
        return OmegaConf.select(cfg, f"{key}.name", default=None)

    tags = [f"strategy:{name('weighting')}", f"dataset:{name('dataset')}", f"seed:{cfg.seed}",
            f"schedule:{name('schedule')}", f"model:{name('model')}", *map(str, extra or [])]
    return [t[:64] for t in dict.fromkeys(tags)]


def start_run(settings, config: DictConfig, run_dir: Path, job_type: str, step: int, fresh: bool):
    """(W&B run, saved environment, writer lock's descriptor) of the module docstring, with the `wandb` node
    `settings`, the recorded `config` and, for `fresh`, a new W&B id; (None, {}, None) when disabled or if W&B
    is unusable."""
    mode = resolve_mode(settings.mode)
    if mode == "disabled":
        return None, {}, None
    try:
        import wandb
    except ImportError:
        log.warning("wandb.mode=%s but wandb is not installed; not logging to W&B", mode)
        return None, {}, None
    wandb_dir = run_dir / "wandb"
    lock = None
    try:
        wandb_dir.mkdir(parents=True, exist_ok=True)
        lock = try_lock(wandb_dir / WRITER_LOCK)
        kwargs = _init_kwargs(settings, config, run_dir, job_type, step, lock is not None, fresh)
    except OSError as exc:                   # e.g. evaluating a run directory this user cannot write
        if lock is not None:
            unlock(lock)
        log.warning("W&B needs a writable %s (%s); continuing without W&B", wandb_dir, exc)
        return None, {}, None
    if lock is None:
        if job_type != "eval" and mode == "online":
            log.warning("an evaluation job is writing to W&B run %s; this training logs offline to %s — upload "
                        "later with `wandb sync %s/offline-run-*`", kwargs["id"], wandb_dir, wandb_dir)
            mode = "offline"
    # Artifacts (tables) are staged before upload; keep them with the run instead of ~/.local/share.
    restore = {key: os.environ.get(key) for key in ("WANDB_DIR", "WANDB_DATA_DIR")}
    for key, value in unusable_environment().items():
        why = "empty" if not value.strip() else f"not a W&B mode (allowed {', '.join(ENV_MODES)})"
        log.warning("$%s=%r is %s; treated as unset", key, value, why)
        restore.setdefault(key, os.environ.pop(key))
    os.environ["WANDB_DIR"] = str(wandb_dir.parent)
    os.environ["WANDB_DATA_DIR"] = str(wandb_dir / "data")
    if mode == "online" and not _has_credentials(wandb):
        log.warning("wandb.mode=online but no W&B credentials were found (WANDB_API_KEY, or `wandb login`); "
                    "logging offline to %s — upload later with `wandb login && wandb sync %s/offline-run-*`",
                    wandb_dir, wandb_dir)
        mode = "offline"
    timeout = float(settings.init_timeout)
    run = error = None
    before = set(wandb_dir.glob("*run-*"))          # earlier pieces' folders (offline-run-* too) stay
    try:
        run = _init(wandb, mode, kwargs, timeout)
    except Exception as exc:  # noqa: BLE001 - W&B must never stop training
        error = exc
    if run is None and mode == "online":
        log.warning("W&B online start failed (%s: %s; wandb.init_timeout=%g s); logging offline to %s — "
                    "upload later with `wandb sync %s/offline-run-*`", type(error).__name__,
                    (str(error).splitlines() or [""])[0], timeout, wandb_dir, wandb_dir)
        _abandon_online_attempt(wandb, set(wandb_dir.glob("run-*")) - before)
        try:
            run = _init(wandb, "offline", kwargs, timeout)
        except Exception as exc:  # noqa: BLE001
            error = exc
    others = [key for key in os.environ if key.startswith("WANDB_") and key not in ("WANDB_DIR", "WANDB_DATA_DIR")]
    if run is None and others:   # no W&B data lost to a setting W&B refuses: offline, under its defaults
        log.warning("W&B could not start (%s: %s); logging offline to %s without the W&B environment variables "
                    "%s — upload later with `wandb sync %s/offline-run-*`", type(error).__name__,
                    (str(error).splitlines() or [""])[0], wandb_dir, ", ".join(sorted(others)), wandb_dir)
        for key in others:
            restore.setdefault(key, os.environ.pop(key))
        _abandon_online_attempt(wandb, set(wandb_dir.glob("*run-*")) - before)
        try:
            run = _init(wandb, "offline", kwargs, timeout)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if run is None:
        log.warning("W&B could not start (%s: %s); continuing without W&B", type(error).__name__, error)
        if lock is not None:
            unlock(lock)
        restore_environment(restore)
        return None, {}, None
    _define_metrics(run)
    return run, restore, lock


def _init_kwargs(settings, cfg: DictConfig, run_dir: Path, job_type: str, step: int, writer: bool,
                 fresh: bool) -> dict:
    """wandb.init arguments. Training: the run's own W&B id. Evaluation: the training run's id when no
    other process writes to it (`writer`: this process holds its writer lock; config, job_type and tags
    stay the training's), else a sibling W&B run in the same group."""
    name = str(cfg.name)
    common = dict(project=settings.project, entity=settings.entity, resume="allow",
                  group=group_name(cfg, settings.group), dir=str(run_dir))
    tags = default_tags(cfg, settings.tags)
    config = {**OmegaConf.to_container(cfg), "strategy": strategy_of(cfg)}
    if job_type != "eval":
        wandb_id = run_id(run_dir, name, fresh=fresh)
        return dict(common, id=wandb_id, name=name, job_type="train", tags=tags, config=config)
    exists = (run_dir / ID_FILE).exists()
    training_id = run_id(run_dir, name)
    if writer and exists:
        return dict(common, id=training_id)
    if writer:                # no training W&B run yet: this evaluation starts it
        return dict(common, id=training_id, name=name, job_type="eval", tags=tags, config=config)
    log.warning("W&B run %s is being written by another process (training still running); this evaluation "
                "goes to the sibling W&B run %s-eval-%d in the same group", training_id, training_id, step)
    return dict(common, id=f"{training_id}-eval-{step}", name=f"{name}-eval-{step}", job_type="eval",
                tags=tags, config=config)


def _has_credentials(wandb) -> bool:
    """Whether W&B finds credentials without asking: never an interactive prompt, and no network. W&B's
    early account query (for the "logged in as" line; 5 s per try without network, tried up to three
    times during login and init) is turned off with `x_disable_viewer`."""
    try:
        wandb.setup(settings=wandb.Settings(mode="online", x_disable_viewer=True))   # over $WANDB_MODE
        return bool(wandb.login(prompt=False, verify=False))
    except Exception as exc:  # noqa: BLE001 - e.g. a malformed key
        log.warning("W&B credentials unusable (%s: %s)", type(exc).__name__, exc)
        return False


def _init(wandb, mode: str, kwargs: dict, timeout: float):
    run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
    log.info("W&B run %s (%s): %s", run.id, mode, getattr(run, "url", None) or Path(run.dir).parent)
    return run


def _abandon_online_attempt(wandb, leftovers: set[Path]) -> None:
    """Stop W&B's service, which still holds the failed run's id (the offline retry would otherwise fail
    with "run ID … is in use"), and remove the folder the attempt made (earlier runs' folders stay)."""
    try:
        wandb.teardown()
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B teardown after the failed online attempt: %s: %s", type(exc).__name__, exc)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _define_metrics(run) -> None:
    """Every series against images seen; `kimg` is logged beside it as a second choice of x-axis."""
    try:
        run.define_metric(STEP_METRIC)
        for pattern in SERIES:
            run.define_metric(pattern, step_metric=STEP_METRIC)
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B define_metric failed: %s: %s", type(exc).__name__, exc)


def restore_environment(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

