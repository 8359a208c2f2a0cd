"""`<run>/status.json`: how far a run got, written by the trainer, read by the CLI, diffrun-status and diffrun-report.

    {"state": "running", "step": 1200, "total_steps": 5000, "fingerprint": "...", ...}

plus, by state: `error` (failed, halted), `reason`/`signal`/`checkpoint_step` (interrupted), the end-of-run summary
(finished: fid, kid_mean, ...). Written atomically and padded to STATUS_PADDING bytes, so that when the disk is full
or the folder not writable the file can still be rewritten in place (`diffrun.files.overwrite_in_place`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from diffrun.files import atomic_write, json_text, overwrite_in_place
from diffrun.run_folder import STATUS

log = logging.getLogger(__name__)
STATUS_PADDING = 2048          # bytes status.json is padded to

RUNNING = "running"
INTERRUPTED = "interrupted"    # stopped by a signal, checkpoint saved: rerun to resume
HALTED = "halted"              # stopped by a check (e.g. a loss that is not finite)
FAILED = "failed"
FINISHED = "finished"
STATES = (RUNNING, INTERRUPTED, HALTED, FAILED, FINISHED)


def read_status(run_dir: str | Path) -> Optional[dict]:
    """The run's status; None when there is none (never started, or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(run_dir: str | Path, state: str, step: int, total_steps: int, **extra) -> None:
    """Never raises: a status that cannot be written is logged (the exception in flight says why)."""
    run_dir = Path(run_dir)
    path = run_dir / STATUS
    text = json_text({"state": state, "step": step, "total_steps": total_steps, **extra}).rstrip("\n")
    text = text.ljust(STATUS_PADDING - 1) + "\n"   # padded: room to rewrite it in place later
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        if overwrite_in_place(path, text):
            return
        log.error("could not write %s (%s): it may still say %r", path, exc.strerror or exc,
                  (read_status(run_dir) or {}).get("state"))
