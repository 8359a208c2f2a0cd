"""Checkpoints that survive crashes, full disks, truncation and flipped bits.

A checkpoint file is `torch.save(state)` followed by a 72-byte trailer, `DRSHA256` + the hex SHA-256 of
everything before it, so its integrity travels inside the file (no side file to lose). Files are
written atomically (`diffrun.files`); `latest.json` points at the newest one (k-diffusion's
`{name}_state.json`) and resume reads it first. A file that fails its check is skipped with a warning
for the previous one; when none verifies, loading stops and says so. Files are always loaded to the
CPU (the caller moves tensors), so RNG states stay CPU tensors and a checkpoint written on one GPU
loads on another or on none.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path

import torch

from diffrun.errors import CheckpointError
from diffrun.files import atomic_write, atomic_write_json, is_no_space

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")
MAGIC = b"DRSHA256"
TRAILER = len(MAGIC) + 64
POINTER = "latest.json"


def encode(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return payload + MAGIC + hashlib.sha256(payload).hexdigest().encode()


def decode(data: bytes, source: Path, allow_unverified: bool = False) -> dict:
    """The state inside a checkpoint file's bytes, after checking its SHA-256 trailer."""
    if data[-TRAILER:-64] == MAGIC:
        payload, recorded = data[:-TRAILER], data[-64:].decode(errors="replace")
        actual = hashlib.sha256(payload).hexdigest()
        if actual != recorded:
            raise CheckpointError(f"checkpoint {source} is corrupt: SHA-256 {actual[:12]}… ≠ recorded {recorded[:12]}…")
    elif allow_unverified:
        payload = data
    else:
        raise CheckpointError(
            f"checkpoint {source} carries no SHA-256 (written by another program, an older diffrun, or truncated); "
            f"set checkpoint.allow_unverified=true to load it without the integrity check")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {source} cannot be loaded ({type(exc).__name__}: {exc})") from exc


def load(path: str | Path, allow_unverified: bool = False) -> dict:
    """Read and verify one checkpoint file (to the CPU). Raises CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    return decode(data, path, allow_unverified)


def step_of(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 3, allow_unverified: bool = False):
        self.directory = Path(directory)
        self.keep = keep
        self.allow_unverified = allow_unverified

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt_{step:08d}.pt"

    def list(self) -> list[Path]:
        """Checkpoints on disk, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if CKPT_RE.match(p.name))

    def save(self, state: dict, step: int) -> Path:
        path = self.path_for(step)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(path, encode(state))
            atomic_write_json(self.directory / POINTER, {"path": path.name, "step": step})
        except OSError as exc:
            why = "the disk is full" if is_no_space(exc) else (exc.strerror or str(exc))
            raise CheckpointError(
                f"could not write checkpoint {path} ({why}); the earlier checkpoints in {self.directory} are "
                f"untouched and the run resumes from the newest of them. Free disk space or set hydra.run.dir "
                f"to a writable place."
            ) from exc
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)

    def _candidates(self) -> list[Path]:
        """Newest first, the file `latest.json` names at the front (when it exists)."""
        paths = list(reversed(self.list()))
        try:
            named = self.directory / json.loads((self.directory / POINTER).read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return paths
        return [named, *(p for p in paths if p != named)] if named in paths else paths

    def latest_path(self) -> Path | None:
        """The checkpoint `load_latest` tries first (the one `latest.json` names, else the newest); None if none."""
        candidates = self._candidates()
        return candidates[0] if candidates else None

    def load_latest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that verifies, falling back past corrupt ones with a warning. None if the
        directory holds no checkpoint; CheckpointError if it holds some and none verifies."""
        candidates = self._candidates()
        problems = []
        for path in candidates:
            try:
                return load(path, self.allow_unverified), path
            except CheckpointError as exc:
                problems.append(str(exc))
                log.warning("%s — trying the previous checkpoint", exc)
        if not problems:
            return None
        raise CheckpointError(
            f"none of the {len(problems)} checkpoint(s) in {self.directory} can be used:\n  " + "\n  ".join(problems)
            + "\nRestore a good copy, or start the run over with resume=never (this replaces them).")
