"""JSON Lines as diffrun's append-only files use them: a torn last line (a writer killed mid-line) is skipped."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSON Lines file, in the order written; lines that are not a whole object are skipped.
    Raises OSError when the file cannot be opened."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
