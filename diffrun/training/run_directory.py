"""A run directory between processes: who owns it (`.lock`) and which run it holds (its identity).

* **Ownership.** `.lock` holds an exclusive `flock` for the life of the process (released by the kernel
  if the process dies, so a stale lock is simply taken over); a second process on the same run stops
  at once naming the holder.
* **Identity.** The fingerprint in `status.json` (written and read by diffrun.run_folder.status) says which
  run the directory holds; a different run stops before any work.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffrun.errors import DiffrunError
from diffrun.files import remove_stale_temporaries, try_lock, unlock
from diffrun.fingerprint import fingerprint, fingerprint_of, trained_config
from diffrun.run_folder import CHECKPOINTS, CONFIG, LOCK
from diffrun.run_folder.status import read_status
from diffrun.training.identity import check_same_run, mismatch_without_config

log = logging.getLogger(__name__)


class RunLockedError(DiffrunError):
    """Another process is training this run."""


class RunDirectory:
    """Lock and identity checks of one run directory (rank 0 only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # --- ownership ------------------------------------------------------------------------------------
    def lock(self) -> None:
        lock_path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = try_lock(lock_path)
        except OSError as exc:
            raise DiffrunError(
                f"run directory {self.path} is not writable ({exc.strerror or exc}); set hydra.run.dir (or "
                f"hydra.sweep.dir) to a writable location with free space") from None
        if fd is None:
            holder = self._read_holder(lock_path)
            raise RunLockedError(
                f"run directory {self.path} is in use by PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(started {holder.get('started', '?')}); two processes must not train the same run. Wait for it to "
                f"finish, stop it, or give this run another name=...") from None
        previous = self._read_holder(lock_path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("taking over %s from PID %s on %s, which no longer holds it", lock_path, previous["pid"], previous.get("host"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd
        for path in remove_stale_temporaries(self.path, self.path / CHECKPOINTS):
            log.info("removed %s, left by a process killed while writing it", path)

    @staticmethod
    def _read_holder(lock_path: Path) -> dict:
        try:
            return json.loads(lock_path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def unlock(self) -> None:
        if self._lock_fd is not None:
            unlock(self._lock_fd)
            self._lock_fd = None

    # --- identity --------------------------------------------------------------------------------------
    def check_identity(self, cfg: DictConfig, force: bool) -> dict:
        """The previous status, after checking it was written by this run (RunMismatchError otherwise). The
        differing keys come from the previous run's config.yaml."""
        status = read_status(self.path) or {}
        recorded = status.get("fingerprint")
        if recorded is None or recorded == fingerprint(cfg):
            return status
        try:
            previous = trained_config(OmegaConf.load(self.path / CONFIG))
        except Exception:  # noqa: BLE001 - no readable config.yaml: say only that the fingerprints differ
            previous = None
        if previous is not None and fingerprint_of(previous) == recorded:
            check_same_run(previous, cfg, f"run directory {self.path}", force)   # lists the keys that differ
        else:
            mismatch_without_config(self.path, recorded, cfg, force)
        return status


