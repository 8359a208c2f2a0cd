"""Checkpoints that survive crashes, full disks and truncation.

Each checkpoint is written to a temporary file, fsynced and renamed into place (atomic on POSIX),
with its SHA-256 beside it; `latest.json` points at the newest one (k-diffusion's `{name}_state.json`
idea) so a requeued job resumes without searching. Loading verifies the hash and falls back to the
previous good checkpoint with a warning. Only the last `keep` checkpoints are kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from diffrun.errors import CheckpointError

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def list(self) -> list[Path]:
        """Checkpoints on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if CKPT_RE.match(p.name))

    def save(self, state: dict, step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        path = self.directory / f"ckpt_{step:08d}.pt"
        try:
            atomic_write_bytes(path, data)
            atomic_write_bytes(path.with_suffix(".pt.sha256"), hashlib.sha256(data).hexdigest().encode())
            atomic_write_json(self.directory / "latest.json", {"path": path.name, "step": step})
        except OSError as exc:
            raise CheckpointError(
                f"could not write checkpoint {path} ({exc.strerror or exc}); earlier checkpoints in "
                f"{self.directory} are untouched. Free disk space or set hydra.run.dir to a writable place."
            ) from exc
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt.sha256").unlink(missing_ok=True)

    @staticmethod
    def verify_and_load(path: Path, map_location: str | torch.device = "cpu") -> dict:
        """Load a checkpoint after checking its SHA-256 (when recorded). Raises CheckpointError."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        digest_file = path.with_suffix(".pt.sha256")
        if digest_file.exists():
            expected = digest_file.read_text().strip()
            actual = hashlib.sha256(data).hexdigest()
            if expected != actual:
                raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 {actual[:12]}… ≠ recorded {expected[:12]}…")
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc}); it may be truncated") from exc

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
        """Newest checkpoint that verifies; warns about and skips corrupt ones. None if there is none."""
        for path in reversed(self.list()):
            try:
                return self.verify_and_load(path, map_location), path
            except CheckpointError as exc:
                log.warning("%s — falling back to the previous checkpoint", exc)
        return None
