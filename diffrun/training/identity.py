"""The check that a directory or checkpoint holds the same run as the config (diffrun/fingerprint.py says
what a run is). A directory is skipped or resumed only by the same run; a different one stops before any work
and lists the keys that differ (`resume=force` continues anyway).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from diffrun.errors import CheckpointError, DiffrunError
from diffrun.fingerprint import differences, fingerprint, fingerprint_of, trained_config

log = logging.getLogger(__name__)


class RunMismatchError(DiffrunError):
    """The directory holds a different run."""


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
