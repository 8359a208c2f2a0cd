"""Progress of a run: a tqdm bar in a terminal, a log line per flush elsewhere (SLURM logs, pipes)."""
from __future__ import annotations

import logging
import sys

from diffrun.training.callbacks import Callback

log = logging.getLogger("diffrun")


class Progress(Callback):
    """`train.progress`: a bar when stdout is a terminal; otherwise one line per flush (step, loss, images/s,
    ETA), so that a log file gets no carriage returns."""

    def __init__(self):
        self.bar = None
        self.last_step = 0

    def on_start(self, trainer) -> None:
        self.last_step = trainer.step
        if trainer.cfg.train.progress and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.step, desc=str(trainer.cfg.name),
                            unit="step", dynamic_ncols=True)

    def on_flush(self, trainer, record: dict, stats: dict) -> None:
        steps, total = record["step"], trainer.cfg.train.steps
        if self.bar is not None:
            self.bar.update(steps - self.last_step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.0f}")
        elif trainer.cfg.train.progress:
            rate = record["images_per_sec"] / trainer.cfg.train.batch_size
            eta = (total - steps) / rate if rate > 0 else float("nan")
            log.info("step %d/%d (%.0f%%)  loss %.4f  %.0f img/s  ETA %s", steps, total, 100 * steps / total,
                     record["loss"], record["images_per_sec"], _duration(eta))
        self.last_step = steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
