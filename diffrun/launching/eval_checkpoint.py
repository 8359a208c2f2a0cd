"""Evaluate a checkpoint: its own config as the base, the command line on top, records into its run.

    config      the config embedded in the checkpoint, its `_target_`s limited to diffrun's (diffrun/targets.py),
                typed by the schema (diffrun/config.py); each command-line override replaces its key, a group
                choice (`dataset=cifar100`) replaces the whole group node; `callbacks` come from the eval app
                (conf/callbacks/eval.yaml), not from the training run; then every check of diffrun/validation.py
    model       `diffrun.training.checkpoint.load` (SHA-256 checked; `checkpoint.allow_unverified=true`
                for files without it; data only: `checkpoint.allow_pickle=true` for one's own older files);
                only what sampling and FID need is built: the network with the EMA weights, the schedule, the
                dataset (the reference images). No optimizer, strategy or Trainer; no run lock, no file written
    records     the evaluation record (protocol.py, `source: diffrun-eval`, `checkpoint: <path>`) goes to
                the callbacks as the trainer's would, with a RunView of job_type "eval": `on_start(run)`,
                `on_eval(run, record)`, `close()`. The metrics file appends it to `<run>/metrics.jsonl`; W&B
                resumes the run's id.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrun import distributed
from diffrun.building import build
from diffrun.checks import show
from diffrun.config import GROUPS, RunConfig
from diffrun.errors import ConfigError
from diffrun.evaluation.protocol import evaluate
from diffrun.sampling.generate import ImageSampler
from diffrun.targets import check_targets
from diffrun.training import checkpoint, export
from diffrun.training.callbacks import Events, build_callbacks
from diffrun.training.checkpoint import CheckpointManager
from diffrun.training.run_view import RunView, recorded_config
from diffrun.training.setup import build_data, build_denoiser, prepare_device
from diffrun.validation import validate

SOURCE = "diffrun-eval"                              # `source` of the records this module writes


def checkpoints_in(value: str) -> list[Path]:
    """What `ckpt=` names: a checkpoint file as it is; a run folder → its latest checkpoint (the one a resume reads
    first); a sweep folder → the latest checkpoint of every run in it, in folder order. ConfigError when a folder
    holds none."""
    path = Path(value).expanduser()
    if not path.is_dir():
        return [Path(value)]
    runs = [path] if (path / "checkpoints").is_dir() else sorted(
        p for p in path.iterdir() if (p / "checkpoints").is_dir())
    found = [latest for run in runs if (latest := CheckpointManager(run / "checkpoints").latest_path()) is not None]
    if not found:
        raise ConfigError(f"ckpt={show(value)}: a folder without checkpoints; allowed a checkpoint file, a run folder "
                          f"(<run>/checkpoints/ckpt_*.pt) or a sweep folder of such runs")
    return found


def run_dir_of_checkpoint(ckpt: Path) -> Path:
    """`<run>/checkpoints/ckpt_*.pt` → `<run>`; a file elsewhere → its folder."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


@functools.lru_cache(maxsize=1)
def _load(path: str, size: int, mtime_ns: int, allow_unverified: bool, allow_pickle: bool) -> dict:

    return checkpoint.load(path, allow_unverified, allow_pickle)


def load_checkpoint(ckpt: str | Path, allow_unverified: bool = False, allow_pickle: bool = False) -> dict:
    """The verified state of `ckpt` (read once per process: the pre-run checks and the job share it)."""
    path = Path(str(ckpt)).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"ckpt={show(str(ckpt))}: no such file; allowed a checkpoint written by diffrun, "
                          f"e.g. <run>/checkpoints/ckpt_00001000.pt, or its diffrun-export (.safetensors)")
    if path.suffix == ".safetensors":                # diffrun-export's EMA weights (diffrun/training/export.py)

        return export.as_state(path, "ckpt")
    stat = path.stat()
    state = _load(str(path), stat.st_size, stat.st_mtime_ns, bool(allow_unverified), bool(allow_pickle))
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"ckpt={show(str(ckpt))} has no embedded config: allowed a checkpoint written by diffrun")
    return state


def checkpoint_config(state_config: dict, app: DictConfig, overrides: Sequence[str],
                      source: str = "the checkpoint's config") -> DictConfig:
    """The checkpoint's config with `overrides` (the eval app's command line, values read from its composed
    config `app`) on top, as the module docstring says. Raises ConfigError for a value the schema refuses, and
    UntrustedTargetError for a `_target_` of the file that the command line does not replace (diffrun/targets.py)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser


    parsed = [o for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_hydra_override()]
    check_targets(state_config, source, ["callbacks", *(o.key_or_group for o in parsed)])
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), state_config)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the checkpoint's config does not fit this diffrun's schema: "
                          f"{str(exc).splitlines()[0]}") from None
    for override in parsed:                          # group choices first: `dataset=cifar100 dataset.loader.root=...`
        if override.key_or_group in GROUPS and not override.is_delete():
            cfg[override.key_or_group] = app[override.key_or_group]
    for override in parsed:
        key = override.key_or_group
        if key == "ckpt" or key in GROUPS or key.split(".")[0] == "callbacks":
            continue
        try:
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if not isinstance(node, DictConfig) or leaf not in node:
                    raise ConfigError(f"~{key}: the checkpoint's config has no {key}")
                del node[leaf]
            else:
                OmegaConf.update(cfg, key, OmegaConf.select(app, key), merge=False)
        except OmegaConfBaseException as exc:        # a wrong type, an unknown schema key: one line naming it
            value = show(override.value())
            raise ConfigError(f"{key}={value}: {' '.join(str(exc).splitlines()[0].split())}") from None
    cfg.callbacks = app.callbacks
    cfg.eval.enabled = True                          # `eval.enabled` is about training; this app always evaluates
    return cfg


def evaluation_config(app: DictConfig, overrides: Sequence[str],
                      environment: bool = True) -> tuple[DictConfig, dict, Path]:
    """(run config, checkpoint state, checkpoint path) for the eval app's composed config, checked by
    diffrun/validation.py (`environment=False`: not this machine's devices and paths). Raises DiffrunError
    (one line) for anything wrong."""
    if OmegaConf.is_missing(app, "ckpt"):
        raise ConfigError("ckpt=??? is required: diffrun-eval ckpt=<run>/checkpoints/ckpt_<step>.pt [key=value ...]")
    ckpt = Path(str(app.ckpt)).expanduser().absolute()
    allow_unverified = OmegaConf.select(app, "checkpoint.allow_unverified", default=False)
    allow_pickle = OmegaConf.select(app, "checkpoint.allow_pickle", default=False)
    state = load_checkpoint(ckpt, bool(allow_unverified), bool(allow_pickle))
    cfg = checkpoint_config(state["config"], app, overrides, f"the config embedded in {ckpt}")
    validate(cfg, environment=environment)
    return cfg, state, ckpt


def evaluation_run(cfg: DictConfig, state: dict, ckpt: Path, events) -> RunView:
    """The RunView (job_type "eval") of `ckpt`'s EMA weights, with what sampling and FID need built from `cfg`.
    ConfigError when the weights do not fit the model."""
    ranks = distributed.info()
    device, autocast_dtype, _ = prepare_device(cfg, ranks)
    data = build_data(cfg, device, ranks)
    schedule = build(cfg.schedule)
    ema = build_denoiser(cfg, device).eval().requires_grad_(False)
    try:
        ema.load_state_dict(state["ema"]["model"])
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"the weights in {ckpt} do not fit model={cfg.model.get('name')} "
                          f"({type(exc).__name__}: {reason}); evaluate a checkpoint with the model it was trained "
                          f"with") from None
    step, images_seen = int(state["step"]), int(state["images_seen"])
    return RunView(name=str(cfg.name), run_dir=run_dir_of_checkpoint(ckpt), job_type="eval",
                   config=recorded_config(cfg), events=events, data=data, ema=ema,
                   generate=ImageSampler(ema, schedule, data, device, autocast_dtype), device=device,
                   autocast_dtype=autocast_dtype, progress=lambda: (step, images_seen))


def evaluate_checkpoint(app: DictConfig, overrides: Sequence[str]) -> dict:
    """Evaluate `app.ckpt` (module docstring); returns the record the callbacks received."""
    cfg, state, ckpt = evaluation_config(app, overrides)
    events = Events(build_callbacks(cfg))            # built first: a bad callback stops us before any sampling
    run = evaluation_run(cfg, state, ckpt, events)
    try:
        record = {**evaluate(run, cfg.eval, cfg.dataset, source=SOURCE), "checkpoint": str(ckpt)}
        events.start(run)
        events.emit_eval(record)
    finally:
        run.data.close()
        events.close()
    return record
