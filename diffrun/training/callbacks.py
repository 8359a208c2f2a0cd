"""Callbacks: everything a run does besides training, as objects the loop tells what happened.

The `callbacks` config group (conf/callbacks/default.yaml) names them, each with its own node: Hydra builds
the callback from it, so its constructor's arguments are its settings (`eval: ${eval}` keeps the keys a user
types). Drop one from the command line with `~callbacks.wandb` (its settings are then not checked), add your
own with `+callbacks.mine._target_=my_module.MyCallback +callbacks.mine.every=5` (a subclass of `Callback`;
docs/extending.md). A constructor checks its arguments: the run is refused before any work, in one line.

Events, in the order of a run. Each gets a RunView (diffrun/training/run_view.py), read-only: step,
images_seen, rank, run_dir, the EMA network, `generate`, the statistics, `events`, `job_type`.

    on_start(run)                     after setup and resume, before the first step
    on_step(run)                      after the steps where step % every_steps() == 0
    on_flush(run, record, stats)      every train.log_every steps: the metrics record and the
                                      per-log-SNR statistics of the window
    on_eval(run, record)              an evaluation result (FID, KID, ...) that any callback emitted
    on_sample(run, images, path)      a sample grid was written
    on_end(run) -> dict               after the final checkpoint; entries join the run summary
    close()                           always, also after a failure

A callback produces results for the others through `run.events` (`emit_eval`, `emit_sample`).
Every event runs with the training random streams saved and restored around it, so whatever a
callback samples or computes never changes what is trained.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from diffrun.building import build
from diffrun.errors import ConfigError
from diffrun.training.environment import isolated_rng
from diffrun.training.run_view import RunView

log = logging.getLogger(__name__)


class Callback:
    """Base class: override the events you need."""

    all_ranks = False   # False: only rank 0 runs it (files, W&B, evaluation)

    def every_steps(self) -> int:
        """`on_step` runs after every step divisible by this (0: never)."""
        return 0

    def on_start(self, run: RunView) -> None: ...
    def on_step(self, run: RunView) -> None: ...
    def on_flush(self, run: RunView, record: dict, stats: dict) -> None: ...
    def on_eval(self, run: RunView, record: dict) -> None: ...
    def on_sample(self, run: RunView, images, path: Path) -> None: ...
    def on_end(self, run: RunView) -> dict | None: ...
    def close(self) -> None: ...


class Events:
    """The callbacks of one run and the dispatch of their events to the run they were started with."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        self.last_eval: dict | None = None
        self.run: RunView | None = None
        self._intervals: list[tuple[Callback, int]] = []

    def start(self, run: RunView) -> None:
        self.run, self._intervals = run, []
        for cb in self.callbacks:
            with isolated_rng():
                cb.on_start(run)
            every = int(cb.every_steps() or 0)
            if every > 0:
                self._intervals.append((cb, every))

    def step(self) -> None:
        for cb, every in self._intervals:
            if self.run.step % every == 0:
                with isolated_rng():
                    cb.on_step(self.run)

    def flush(self, record: dict, stats: dict) -> None:
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_flush(self.run, record, stats)

    def emit_eval(self, record: dict) -> None:
        self.last_eval = record
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_eval(self.run, record)

    def emit_sample(self, images, path: Path) -> None:
        with isolated_rng():
            for cb in self.callbacks:
                cb.on_sample(self.run, images, path)

    def end(self) -> dict:
        summary: dict = {}
        for cb in self.callbacks:
            with isolated_rng():
                summary.update(cb.on_end(self.run) or {})
        return summary

    def close(self) -> None:
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as exc:  # noqa: BLE001 - one callback's cleanup must not skip the others'
                log.warning("closing %s failed: %s: %s", type(cb).__name__, type(exc).__name__, exc)


def build_callbacks(cfg: DictConfig, rank: int = 0) -> list[Callback]:
    """Instantiate `cfg.callbacks` (name → {_target_: ..., its settings}; a null entry is dropped), in config
    order. Each constructor checks its settings: building them is also the check of the `callbacks` group."""

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
