"""Which run a run is: its fingerprint, and the check that a directory or checkpoint holds the same run.

A run is its resolved config minus what does not change what is trained (budget, evaluation, logging,
where it runs: `NOT_TRAINED`). Its SHA-256 — the fingerprint — is written into every checkpoint and into
`status.json`. A directory is skipped or resumed only by the same run; a different one stops before any
work and lists the keys that differ (`resume=force` continues anyway). Default run names get a short
suffix of the fingerprint when the command line changed what the name does not say (`name_suffix`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffrun.errors import CheckpointError, DiffrunError

log = logging.getLogger(__name__)

# Keys that change how long, how visibly or where a run trains, not what it trains.
NOT_TRAINED = (
    "name", "sweep_name", "experiment", "resume", "device", "deterministic", "callbacks", "hydra",
    "train.steps", "train.kimg", "train.log_every", "train.progress", "train.compile", "train.capture",
    "train.channels_last",
    "train.nan_policy", "train.max_skipped_fraction",
    "sample", "checkpoint", "eval", "stats", "wandb", "report", "dist",
    "dataset.loader.root", "dataset.loader.download", "dataset.root",
    "dataset.workers", "dataset.loader.vae", "dataset.loader.reference_root",   # how data is read, decoded, scored
)
DESCRIPTIVE = ("citation", "paper", "notes")          # prose in group configs


class RunMismatchError(DiffrunError):
    """The directory holds a different run."""


# ----------------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------------
def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree, dict) else None
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def trained_config(cfg: DictConfig | dict) -> dict:
    """The part of the resolved config that decides what is trained. `train.steps` counts when the learning
    rate schedule depends on it (a decay over the run's length)."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg, default=str))
    steps_matter = (tree.get("optimizer") or {}).get("decay", "constant") != "constant"
    steps = (tree.get("train") or {}).get("steps")
    for key in NOT_TRAINED:
        _drop(tree, key)
    for group in tree.values():
        if isinstance(group, dict):
            for key in DESCRIPTIVE:
                group.pop(key, None)
    if steps_matter:
        tree.setdefault("train", {})["steps"] = steps
    return tree


def fingerprint_of(trained: dict) -> str:
    return hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(cfg: DictConfig | dict) -> str:
    return fingerprint_of(trained_config(cfg))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict, limit: int = 12) -> list[str]:
    """`key: old → new` for every leaf that differs between two trained configs."""
    a, b = _flatten(old), _flatten(new)
    lines = [f"{key}: {a.get(key, '<absent>')!r} → {b.get(key, '<absent>')!r}"
             for key in sorted(set(a) | set(b)) if a.get(key, "<absent>") != b.get(key, "<absent>")]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def check_same_run(recorded: dict | None, cfg: DictConfig, where: str, force: bool) -> None:
    """Stop if `recorded` (a trained config read from a checkpoint or status file) is another run than `cfg`."""
    if recorded is None:
        return
    current = trained_config(cfg)
    if fingerprint_of(recorded) == fingerprint_of(current):
        return
    diff = differences(recorded, current)
    if force:
        log.warning("%s was trained with another config; resume=force continues it anyway:\n  %s", where, "\n  ".join(diff))
        return
    raise RunMismatchError(
        f"{where} belongs to a different run; the keys that differ (recorded → now):\n  " + "\n  ".join(diff)
        + "\nUse another name=... (or hydra.run.dir) for a new run, resume=never to train this one again "
          "from scratch, or resume=force to continue the recorded run under the new config.")


def name_suffix(root: DictConfig) -> str:
    """`_<6 hex>` of the fingerprint when the command line changed something the default run name does not
    say (anything but dataset, model, weighting, seed and the preset), else ''. Outside a Hydra app: ''."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):
        return ""
    named = {"dataset", "model", "weighting", "seed", "experiment", "name"}
    relevant = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        if key in named or key.startswith("hydra") or any(key == k or key.startswith(k + ".") for k in NOT_TRAINED):
            continue
        relevant.append(override)
    if not relevant:
        return ""
    tree = OmegaConf.to_container(root, resolve=False)
    tree.pop("name", None)
    tree.pop("hydra", None)
    return "_" + fingerprint(OmegaConf.create(tree))[:6]


def mismatch_without_config(path: Path, recorded: str, cfg: DictConfig, force: bool) -> None:
    message = (f"run directory {path} belongs to a different run (fingerprint {recorded[:12]} ≠ {fingerprint(cfg)[:12]}; "
               f"its config.yaml is missing). Use another name=..., resume=never, or resume=force.")
    if force:
        log.warning("%s Continuing: resume=force.", message)
        return
    raise RunMismatchError(message)


def check_checkpoint(state: dict, path: Path, cfg: DictConfig, force: bool) -> None:
    """A checkpoint must be of this run (its recorded trained config, or for older files the full config)."""
    recorded = state.get("trained_config")
    if recorded is None and "config" in state:
        recorded = trained_config(state["config"])
    try:
        check_same_run(recorded, cfg, f"checkpoint {path}", force)
    except RunMismatchError:
        raise
    except Exception as exc:  # an unreadable record is a damaged checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot read its recorded config ({exc})") from exc
