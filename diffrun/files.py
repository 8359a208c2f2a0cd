"""Files a reader never sees half-written: the one atomic-write helper every writer uses; and the one
exclusive file lock (`try_lock`) of a process that owns something on disk (a run, its W&B id).

A file is written to `.<name>.tmp.<pid>` in its own directory, flushed and fsynced, then renamed over
the target (atomic on POSIX). On any failure the temporary file is removed and the old file is left
as it was. A temporary file left by a killed process (SIGKILL mid-write) is removed by
`remove_stale_temporaries` when the run starts again, under the run's lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMPORARY = re.compile(r"^\..+\.tmp\.\d+$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """`with atomic_path(path) as tmp:` write `tmp` by any means (a library that takes a path, a memory map);
    it is fsynced and renamed over `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """`with atomic_open(path) as fh: fh.write(...)`: the file appears whole when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write bytes, text (UTF-8) or whatever `data(fh)` writes, atomically."""
    with atomic_open(path) as fh:
        if callable(data):
            data(fh)
        else:
            fh.write(data.encode() if isinstance(data, str) else data)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json_text(obj))


def overwrite_in_place(path: str | Path, text: str) -> bool:
    """Last resort when `atomic_write` cannot allocate (disk full) or rename (directory not writable):
    rewrite the existing file's bytes in place, padded with spaces to its old length, which needs no
    new blocks. Returns False if the file is missing, too short or not writable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        data = text.encode()
        if len(data) > size:
            return False
        with open(path, "r+b") as fh:
            fh.write(data + b" " * (size - len(data)))
            fh.flush()
            os.fsync(fh.fileno())
        return True
    except OSError:
        return False


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def remove_stale_temporaries(*directories: str | Path) -> list[Path]:
    """Delete `.<name>.tmp.<pid>` files (left by a process killed mid-write) in `directories`.
    Call only while holding the run's lock, so no live writer owns them."""
    removed = []
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if TEMPORARY.match(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def try_lock(path: str | Path) -> int | None:
    """Take the exclusive `flock` of `path` (created if missing) without waiting: the descriptor that holds it
    until `unlock` (the kernel releases it when the process dies, so a stale lock is simply taken over), or None
    while another process holds it. OSError when `path` cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def append_locked(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` (created if missing) in one `write` under an exclusive `flock`, waiting for it:
    concurrent writers on several nodes each add whole lines (NFS included)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)  # releases the lock


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
