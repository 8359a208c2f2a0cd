"""`<sweep>/index.jsonl`: one line each time a job of a multirun starts (what a line holds:
diffrun.launching.sweep.job_entry).

Jobs of a SLURM array start concurrently (on several nodes), so the file is append-only: each start appends one
line with a single `write` under an exclusive `flock`, and nothing ever rewrites it. A requeued or rerun job
appends another line for the same folder; readers keep the lines per folder in the order written.
"""
from __future__ import annotations

import json
from pathlib import Path

from diffrun.files import append_locked
from diffrun.run_folder import INDEX
from diffrun.run_folder.jsonl import read_jsonl


def append_entry(sweep_dir: str | Path, entry: dict) -> Path:
    """Append one line to `<sweep_dir>/index.jsonl` (safe with concurrent writers, also on NFS)."""
    path = Path(sweep_dir) / INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    append_locked(path, (json.dumps(entry, default=str) + "\n").encode())
    return path


def read_entries(sweep_dir: str | Path) -> list[dict]:
    """Every line of `<sweep_dir>/index.jsonl`, in the order written (a torn last line is skipped)."""
    path = Path(sweep_dir) / INDEX
    return read_jsonl(path) if path.exists() else []


def starts_by_folder(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """Job folder name → its index lines, oldest first (the last says how it was started most recently)."""
    starts: dict[str, list[dict]] = {}
    for entry in read_entries(sweep_dir):
        if entry.get("dir"):
            starts.setdefault(Path(str(entry["dir"])).name, []).append(entry)
    return starts
