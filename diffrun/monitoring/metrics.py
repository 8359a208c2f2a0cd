"""Local metrics: one JSON object per line in `metrics.jsonl`, so results never depend on W&B."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffrun.files import atomic_write
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

FILENAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a metrics file; a torn last line (killed mid-write) is ignored."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsFile(Callback):
    """`<run>/metrics.jsonl`: every flush record (train metrics) and every evaluation record (FID, KID, ...).

    On a resume, lines written after the checkpoint the run continues from (step > that step) are dropped
    first, so no step appears twice."""

    def __init__(self):
        self._fh = None

    def on_start(self, run: RunView) -> None:
        path = Path(run.run_dir) / FILENAME
        if path.exists() and run.job_type == "train":   # an evaluation only appends
            kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= run.step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def on_flush(self, run: RunView, record: dict, stats: dict) -> None:
        self.write(record)

    def on_eval(self, run: RunView, record: dict) -> None:
        self.write(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
