"""Local metrics: the callback that writes `metrics.jsonl` (the format: diffrun.run_folder.metrics)."""
from __future__ import annotations

from pathlib import Path

from diffrun.run_folder import METRICS as FILENAME
from diffrun.run_folder.jsonl import read_jsonl
from diffrun.run_folder.metrics import open_metrics, record_line
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

__all__ = ["FILENAME", "MetricsFile", "read_jsonl"]   # FILENAME, read_jsonl: for callers that import them from here


class MetricsFile(Callback):
    """`<run>/metrics.jsonl`: every flush record (train metrics) and every evaluation record (FID, KID, ...).

    On a resume, lines written after the checkpoint the run continues from (step > that step) are dropped
    first, so no step appears twice."""

    def __init__(self):
        self._fh = None

    def on_start(self, run: RunView) -> None:
        training = run.job_type == "train"   # an evaluation only appends
        self._fh = open_metrics(Path(run.run_dir), run.step if training else None)

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(record_line(record))

    def on_flush(self, run: RunView, record: dict, stats: dict) -> None:
        self.write(record)

    def on_eval(self, run: RunView, record: dict) -> None:
        self.write(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
