"""`<run>/metrics.jsonl`: one JSON object per line, so results never depend on W&B.

Two kinds of record share the file, both with `step`: training records (`loss`, `images_per_sec`, ..., one per
flush) and evaluation records (`fid`, `kid_mean`, `fid_protocol`, ..., written during training or appended later
by diffrun-eval). JSON has no NaN or Inf: such floats are written as the strings "nan", "inf", "-inf".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any, Optional

from diffrun.files import atomic_write
from diffrun.run_folder import METRICS
from diffrun.run_folder.jsonl import read_jsonl


def is_evaluation(record: dict) -> bool:
    return "step" in record and "fid" in record


def is_training(record: dict) -> bool:
    return "step" in record and "loss" in record and "fid" not in record


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep them visible as strings
    return value


def record_line(record: dict) -> str:
    return json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"


def open_metrics(run_dir: str | Path, resumed_at: Optional[int] = None) -> IO[str]:
    """The metrics file, line-buffered, for appending. With `resumed_at` (a training run continuing from the
    checkpoint of that step), the lines written after that step are dropped first, so no step appears twice."""
    path = Path(run_dir) / METRICS
    if resumed_at is not None and path.exists():
        kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= resumed_at]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a", buffering=1)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of the run, in the order written ([] when there is no file); a torn last line is skipped."""
    path = Path(run_dir) / METRICS
    return read_jsonl(path) if path.exists() else []


def tail_metrics(run_dir: str | Path, train: int = 3, block: int = 1 << 16) -> tuple[list[dict], Optional[dict]]:
    """The last `train` training records (oldest first) and the last evaluation record, read backwards from the
    file's end: a long run's file is not read whole at every refresh. A torn line is skipped."""
    found: list[dict] = []
    evaluation = None
    try:
        fh = open(Path(run_dir) / METRICS, "rb")
    except OSError:
        return [], None
    with fh:
        position = fh.seek(0, os.SEEK_END)
        carry = b""
        while position > 0 and (len(found) < train or evaluation is None):
            size = min(block, position)
            position -= size
            fh.seek(position)
            parts = (fh.read(size) + carry).split(b"\n")
            carry, complete = (parts[0], parts[1:]) if position > 0 else (b"", parts)
            for line in reversed(complete):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                if is_evaluation(record):
                    evaluation = evaluation or record
                elif is_training(record) and len(found) < train:
                    found.append(record)
    return found[::-1], evaluation
