"""Progress of a run: a tqdm bar in a terminal, a log line per flush elsewhere (SLURM logs, pipes, files)."""
from __future__ import annotations

import contextlib
import logging
import sys

from diffrun.training.callbacks import Callback

log = logging.getLogger("diffrun")


class Progress(Callback):
    """`train.progress`: a bar when the bar's stream (stderr) is a terminal, with log lines printed above it;
    otherwise one log line per flush (step, loss, images/s, ETA), so that a log file (a SLURM job's output, a
    pipe) never gets the carriage returns a bar redraws itself with."""

    def __init__(self, stream=None):
        self.stream = stream          # None: sys.stderr when the run starts (tqdm's stream)
        self.bar = None
        self.redirect = contextlib.ExitStack()
        self.last_step = 0

    def on_start(self, trainer) -> None:
        self.last_step = trainer.step
        stream = self.stream or sys.stderr
        if trainer.cfg.train.progress and stream.isatty():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, desc=str(trainer.cfg.name),
                            unit="step", dynamic_ncols=True, file=stream)
            self.redirect.enter_context(logging_redirect_tqdm())   # console log lines above the bar, not through it

    def on_flush(self, trainer, record: dict, stats: dict) -> None:
        steps, total = record["step"], trainer.cfg.train.steps
        if self.bar is not None:
            self.bar.update(steps - self.last_step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}")
        elif trainer.cfg.train.progress:
            rate = record["images_per_sec"] / trainer.cfg.train.batch_size
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
