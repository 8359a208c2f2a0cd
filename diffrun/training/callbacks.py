"""Callbacks: everything a run does besides training, as objects the loop tells what happened.

The `callbacks` config group (conf/callbacks/default.yaml) names them; drop one from the command line
with `~callbacks.wandb`, add your own with `+callbacks.mine._target_=my_module.MyCallback` (a subclass of
`Callback` with a constructor that takes no arguments; it reads its settings from `trainer.cfg`).

Events, in the order of a run (the trainer is passed read-only: a callback never writes into it):

    on_start(trainer)                     after setup and resume, before the first step
    on_step(trainer)                      after the steps where step % every_steps() == 0
    on_flush(trainer, record, stats)      every train.log_every steps: the metrics record and the
                                          per-log-SNR statistics of the window
    on_eval(trainer, record)              an evaluation result (FID, KID, ...) that any callback emitted
    on_sample(trainer, images, path)      a sample grid was written
    on_end(trainer) -> dict               after the final checkpoint; entries join the run summary
    close()                               always, also after a failure

A callback produces results for the others through `trainer.events` (`emit_eval`, `emit_sample`).
Every event runs with the training random streams saved and restored around it, so whatever a
callback samples or computes never changes what is trained.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from diffrun.errors import ConfigError
from diffrun.training.environment import isolated_rng

log = logging.getLogger(__name__)


class Callback:
    """Base class: override the events you need."""

    all_ranks = False   # False: only rank 0 runs it (files, W&B, evaluation)

    def every_steps(self, trainer) -> int:
        """`on_step` runs after every step divisible by this (0: never)."""
        return 0

    def on_start(self, trainer) -> None: ...
    def on_step(self, trainer) -> None: ...
    def on_flush(self, trainer, record: dict, stats: dict) -> None: ...
    def on_eval(self, trainer, record: dict) -> None: ...
    def on_sample(self, trainer, images, path: Path) -> None: ...
    def on_end(self, trainer) -> dict | None: ...
    def close(self) -> None: ...


class Events:
    """The callbacks of one run and the dispatch of their events."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        self.last_eval: dict | None = None
        self._intervals: list[tuple[Callback, int]] = []

    def start(self, trainer) -> None:
        self._intervals = []
        for cb in self.callbacks:
            with isolated_rng():
                cb.on_start(trainer)
            every = int(cb.every_steps(trainer) or 0)
            if every > 0:
                self._intervals.append((cb, every))

    def step(self, trainer) -> None:
        for cb, every in self._intervals:
            if trainer.step % every == 0:
                with isolated_rng():
                    cb.on_step(trainer)

    def flush(self, trainer, record: dict, stats: dict) -> None:
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_flush(trainer, record, stats)

    def emit_eval(self, trainer, record: dict) -> None:
        self.last_eval = record
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_eval(trainer, record)

    def emit_sample(self, trainer, images, path: Path) -> None:
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_sample(trainer, images, path)

    def end(self, trainer) -> dict:
        summary: dict = {}
        for cb in self.callbacks:
            with isolated_rng():
                summary.update(cb.on_end(trainer) or {})
        return summary

    def close(self) -> None:
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as exc:  # noqa: BLE001 - one callback's cleanup must not skip the others'
                log.warning("closing %s failed: %s: %s", type(cb).__name__, type(exc).__name__, exc)


def build_callbacks(cfg: DictConfig, rank: int = 0) -> list[Callback]:
    """Instantiate `cfg.callbacks` (name → {_target_: ...}; a null entry is dropped), in config order."""
    from diffrun.building import build

    callbacks = []
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None:
            continue
        if "_target_" not in spec:
            raise ConfigError(f"callbacks.{name} has no _target_: give the class, e.g. "
                              f"+callbacks.{name}._target_=my_module.MyCallback")
        callback = build(spec)
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name}: {spec._target_} is not a diffrun.training.callbacks.Callback")
        if rank == 0 or callback.all_ranks:
            callbacks.append(callback)
    return callbacks
