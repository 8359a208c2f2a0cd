"""Progress of a run: a tqdm bar in a terminal, a log line per flush elsewhere (SLURM logs, pipes, files)."""
from __future__ import annotations

import contextlib
import logging
import sys

from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

log = logging.getLogger("diffrun")


class Progress(Callback):
    """`enabled` (`train.progress`): a bar when the bar's stream (stderr) is a terminal, with log lines printed above it;
    otherwise one log line per flush (step, loss, images/s, ETA), so that a log file (a SLURM job's output, a
    pipe) never gets the carriage returns a bar redraws itself with."""

    def __init__(self, enabled: bool, total_steps: int, batch_size: int, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps        # train.steps
        self.batch_size = batch_size          # train.batch_size: images per step
        self.stream = stream                  # None: sys.stderr when the run starts (tqdm's stream)
        self.bar = None
        self.redirect = contextlib.ExitStack()
        self.last_step = 0

    def on_start(self, run: RunView) -> None:
        self.last_step = run.step
        stream = self.stream or sys.stderr
        if self.enabled and stream.isatty():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total_steps, initial=run.step, desc=run.name,
                            unit="step", dynamic_ncols=True, file=stream)
            self.redirect.enter_context(logging_redirect_tqdm())   # console log lines above the bar, not through it

    def on_flush(self, run: RunView, record: dict, stats: dict) -> None:
        steps, total = record["step"], self.total_steps
        if self.bar is not None:
            self.bar.update(steps - self.last_step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}")
        elif self.enabled:
            rate = record["images_per_sec"] / self.batch_size
            eta = (total - steps) / rate if rate > 0 else float("nan")
            log.info("step %d/%d (%.0f%%)  loss %.4f  %.0f img/s  ETA %s", steps, total, 100 * steps / total,
                     record["loss"], record["images_per_sec"], duration(eta))
        self.last_step = steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.redirect.close()


def duration(seconds: float) -> str:
    """`1h05m`, `4m09s`, or `?` for an unknown (NaN or infinite) time."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
