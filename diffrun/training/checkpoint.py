"""Checkpoints that survive crashes, full disks, truncation and flipped bits.

A checkpoint file is `torch.save(state)` followed by a 72-byte trailer, `DRSHA256` + the hex SHA-256 of
everything before it, so its integrity travels inside the file (no side file to lose). Files are
written atomically (`diffrun.files`); `latest.json` points at the newest one (k-diffusion's
`{name}_state.json`) and resume reads it first when the file it names exists. A file that fails its check
is skipped with a warning for the previous one; when none verifies, loading stops and says so. Files are
always loaded to the CPU (the caller moves tensors), so RNG states stay CPU tensors and a checkpoint
written on one GPU loads on another or on none.

A checkpoint is data, never code: tensors, numbers, strings, lists and dicts (RNG states as tensors), read
with `torch.load(weights_only=True)`, whose unpickler builds no other object and calls no function. A file
of pickled objects (diffrun's format before data-only checkpoints, or one crafted to run code: its SHA-256
proves it intact, not who wrote it) is refused (PickledCheckpointError) unless `allow_pickle`, for one's own
files, which loads it as before with a warning; `diffrun-convert` rewrites such a file as data once
(docs/checkpoints.md).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import torch

from diffrun.checks import show
from diffrun.errors import CheckpointError, ConfigError
from diffrun.files import atomic_write, atomic_write_json, is_no_space
from diffrun.training.environment import rng_as_data

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


def decode(data: bytes, source: Path, allow_unverified: bool = False, allow_pickle: bool = False) -> dict:
    """The state inside a checkpoint file's bytes, after checking its SHA-256 trailer (module docstring)."""
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
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if unsupported_global(exc) is None:          # damaged bytes rather than an object to rebuild
            raise CheckpointError(f"checkpoint {source} cannot be loaded (it is damaged: {unpickler_reason(exc)})") from None
        if not allow_pickle:
            raise PickledCheckpointError(source, exc) from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {source} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    log.warning("loading %s with pickle (checkpoint.allow_pickle=true, or diffrun-convert), which runs any code "
                "the file holds", source)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {source} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    return as_data(state, source)


def unsupported_global(exc: Exception) -> str | None:
    """The class or function torch's weights-only unpickler refused to import ("posix.system"), if any."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return found.group(1) if found else None


def unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that says what it met ("Unsupported operand 0", ...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith(("Unsupported", "Trying to load"))), lines[-1] if lines else "")


class PickledCheckpointError(CheckpointError):
    """The file holds pickled objects, which only code can rebuild: it is not loaded."""

    def __init__(self, source: Path, cause: Exception):
        self.global_name = unsupported_global(cause)
        super().__init__(
            f"checkpoint {source} holds pickled Python objects ({self.global_name}), not "
            f"only data: loading it could run any code in it, and its SHA-256 proves it intact, not who wrote it. "
            f"It is diffrun's format before data-only checkpoints, or a file crafted to run code. If you wrote it "
            f"yourself: rewrite it as data once with `diffrun-convert {source}`, or load it as before with "
            f"checkpoint.allow_pickle=true")


def as_data(state: dict, source: Path) -> dict:
    """A state unpickled from the earlier format as data only (its RNG states as tensors), checked to load with
    `weights_only=True`. Raises CheckpointError when it holds other objects."""

    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(state).__name__}, not a diffrun checkpoint's dict")
    state = dict(state)
    if isinstance(state.get("rng"), dict):
        state["rng"] = rng_as_data(state["rng"])
    if state.get("rng_per_rank"):
        state["rng_per_rank"] = [rng_as_data(r) for r in state["rng_per_rank"]]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {source} holds objects that are not data ({unsupported_global(exc)}); "
                              f"it cannot be rewritten as data") from None
    return state


def load(path: str | Path, allow_unverified: bool = False, allow_pickle: bool = False) -> dict:
    """Read and verify one checkpoint file (to the CPU). Raises CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    return decode(data, path, allow_unverified, allow_pickle)


def step_of(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 3, allow_unverified: bool = False,
                 allow_pickle: bool = False):
        self.directory = Path(directory)
        self.keep = keep
        self.allow_unverified = allow_unverified
        self.allow_pickle = allow_pickle

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
            # The pointer goes first: a kill between the two writes then leaves it naming a file that is not
            # there, and resume takes the newest file, which is complete (atomic). The other order would send
            # resume back to the previous checkpoint and lose the steps since.
            atomic_write_json(self.directory / POINTER, {"path": path.name, "step": step})
            atomic_write(path, encode(state))
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
                return load(path, self.allow_unverified, self.allow_pickle), path
            except PickledCheckpointError:
                raise                                # not damage: an older one is no better
            except CheckpointError as exc:
                problems.append(str(exc))
                log.warning("%s — trying the previous checkpoint", exc)
        if not problems:
            return None
        raise CheckpointError(
            f"none of the {len(problems)} checkpoint(s) in {self.directory} can be used:\n  " + "\n  ".join(problems)
            + "\nRestore a good copy, or start the run over with resume=never (this replaces them).")


def check_resume_file(resume: str, allow_unverified: bool, allow_pickle: bool) -> None:
    """`resume=<path>` is a checkpoint diffrun wrote: read and verified here, before any folder is made."""
    allowed = "allowed auto, never, force, or a checkpoint written by diffrun (<run>/checkpoints/ckpt_<step>.pt)"
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={show(resume)}: no such checkpoint; {allowed}")
    try:
        state = load(path, allow_unverified, allow_pickle)
    except CheckpointError as exc:
        raise ConfigError(f"resume={show(resume)}: {exc}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise ConfigError(f"resume={show(resume)}: not a diffrun training checkpoint (it holds no model, optimizer "
                          f"and step); {allowed}")


# ---------------------------------------------------------------------------------------------------
# diffrun-convert: an earlier checkpoint of one's own, rewritten as data
# ---------------------------------------------------------------------------------------------------
def convert(path: Path, allow_unverified: bool = False) -> Path | None:
    """Rewrite the pickled-object checkpoint `path` as data, in place (atomically, with a new SHA-256), the
    original kept beside it as `<name>.pickled`. None when it is data already. Raises CheckpointError."""
    try:
        load(path, allow_unverified)
        return None
    except PickledCheckpointError:
        pass
    state = load(path, allow_unverified, allow_pickle=True)
    original = path.with_name(path.name + ".pickled")
    try:
        original.write_bytes(path.read_bytes())
        atomic_write(path, encode(state))
    except OSError as exc:
        raise CheckpointError(f"could not rewrite {path}: {exc.strerror or exc}") from exc
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffrun-convert",
        description="Rewrite checkpoints of diffrun's earlier format (pickled objects) as data, which loads with "
                    "torch.load(weights_only=True). Loading the old file runs any code it holds: convert only "
                    "your own files. Each file is rewritten in place; the original stays as <name>.pickled.")
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoint files, checkpoints/ folders or run folders")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="also convert files without diffrun's SHA-256 trailer")
    args = parser.parse_args(argv)
    files = []
    for path in args.paths:
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        files += CheckpointManager(folder).list() if folder.is_dir() else [path]
    if not files:
        parser.error(f"no checkpoint (ckpt_<step>.pt) in {' '.join(map(str, args.paths))}")
    try:
        for path in files:
            original = convert(path, args.allow_unverified)
            print(f"{path}: already data" if original is None else f"{path}: rewritten as data (original: {original})")
    except CheckpointError as exc:
        print(f"diffrun-convert: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
