"""What a run directory holds between processes: who owns it, which run it is, how far it got.

* **Identity.** A run is its resolved config minus what does not change what is trained (budget,
  evaluation, logging, where it runs: `NOT_TRAINED`). Its SHA-256 — the fingerprint — is written into
  every checkpoint and into `status.json`. A directory is skipped or resumed only by the same run; a
  different one stops before any work and lists the keys that differ (`resume=force` continues anyway).
* **Ownership.** `.lock` holds an exclusive `flock` for the life of the process (released by the kernel
  if the process dies, so a stale lock is simply taken over); a second process on the same run stops
  at once naming the holder.
* **Progress.** `status.json`: running / interrupted / halted / failed / finished, the step, the reason.
  Written atomically; when the disk is full or the directory not writable, the existing file is
  rewritten in place (it is padded when created, so that needs no new blocks).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffrun.errors import CheckpointError, DiffrunError
from diffrun.files import atomic_write, json_text, overwrite_in_place, remove_stale_temporaries

log = logging.getLogger(__name__)

# Keys that change how long, how visibly or where a run trains, not what it trains.
NOT_TRAINED = (
    "name", "sweep_name", "experiment", "resume", "device", "deterministic", "callbacks", "hydra",
    "train.steps", "train.log_every", "train.progress", "train.compile", "train.capture", "train.channels_last",
    "train.nan_policy", "train.max_skipped_fraction",
    "sample", "checkpoint", "eval", "stats", "wandb", "report", "dist",
    "dataset.loader.root", "dataset.loader.download", "dataset.root",
)
DESCRIPTIVE = ("citation", "paper", "notes")          # prose in group configs
STATUS_PADDING = 2048                                  # bytes status.json is padded to (see overwrite_in_place)


class RunLockedError(DiffrunError):
    """Another process is training this run."""


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


# ----------------------------------------------------------------------------------------------------
# the directory
# ----------------------------------------------------------------------------------------------------
class RunDirectory:
    """Lock, status and identity checks of one run directory (rank 0 only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.status_path = self.path / "status.json"
        self._lock_fd: int | None = None

    # --- ownership ------------------------------------------------------------------------------------
    def lock(self) -> None:
        lock_path = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DiffrunError(
                f"run directory {self.path} is not writable ({exc.strerror or exc}); set hydra.run.dir (or "
                f"hydra.sweep.dir) to a writable location with free space") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path} is in use by PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(started {holder.get('started', '?')}); two processes must not train the same run. Wait for it to "
                f"finish, stop it, or give this run another name=...") from None
        previous = self._read_holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("taking over %s from PID %s on %s, which no longer holds it", lock_path, previous["pid"], previous.get("host"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd
        for path in remove_stale_temporaries(self.path, self.path / "checkpoints"):
            log.info("removed %s, left by a process killed while writing it", path)

    @staticmethod
    def _read_holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    # --- progress --------------------------------------------------------------------------------------
    def read_status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, state: str, step: int, total_steps: int, **extra) -> None:
        """Never raises: a status that cannot be written is logged (the exception in flight says why)."""
        text = json_text({"state": state, "step": step, "total_steps": total_steps, **extra}).rstrip("\n")
        text = text.ljust(STATUS_PADDING - 1) + "\n"   # padded: room to rewrite it in place later
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.status_path, text)
        except OSError as exc:
            if overwrite_in_place(self.status_path, text):
                return
            log.error("could not write %s (%s): it may still say %r", self.status_path, exc.strerror or exc,
                      self.read_status().get("state"))

    # --- identity --------------------------------------------------------------------------------------
    def check_identity(self, cfg: DictConfig, force: bool) -> dict:
        """The previous status, after checking it was written by this run (RunMismatchError otherwise). The
        differing keys come from the previous run's config.yaml."""
        status = self.read_status()
        recorded = status.get("fingerprint")
        if recorded is None or recorded == fingerprint(cfg):
            return status
        try:
            previous = trained_config(OmegaConf.load(self.path / "config.yaml"))
        except Exception:  # noqa: BLE001 - no readable config.yaml: say only that the fingerprints differ
            previous = None
        if previous is not None and fingerprint_of(previous) == recorded:
            check_same_run(previous, cfg, f"run directory {self.path}", force)   # lists the keys that differ
        else:
            _mismatch_without_config(self.path, recorded, cfg, force)
        return status


def _mismatch_without_config(path: Path, recorded: str, cfg: DictConfig, force: bool) -> None:
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
