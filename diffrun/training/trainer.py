"""The training loop: resume, step, flush, checkpoint, tell the callbacks — then the final checkpoint and the
callbacks' end-of-run work (sample grid, FID). Where the rest is:

    the step                  diffrun/training/step.py            (train_step: no host sync, no config)
    the step as one graph     diffrun/training/capture.py         (train.capture=compile)
    building it all           diffrun/training/setup.py           (build_components)
    checkpoint state, resume  diffrun/training/run_state.py       (RunState; files: checkpoint.py)
    the run directory         diffrun/training/run_directory.py   (lock, identity.py; files: diffrun/run_folder/)
    everything else           diffrun/training/callbacks.py       (metrics file, statistics, W&B, samples, FID)
    what callbacks see        diffrun/training/run_view.py        (RunView: `view`, never the Trainer)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffrun import distributed
from diffrun.config import option
from diffrun.errors import DiffrunError
from diffrun.files import atomic_write, atomic_write_json
from diffrun.fingerprint import fingerprint
from diffrun.run_folder import status
from diffrun.sampling.generate import ImageSampler
from diffrun.training.callbacks import Callback, Events, build_callbacks
from diffrun.training.capture import step_function
from diffrun.training.environment import provenance
from diffrun.training.interrupt import GracefulInterrupt, StopRequested
from diffrun.training.logsnr_stats import LogSNRStats
from diffrun.training.nonfinite import nonfinite_hint
from diffrun.training.run_directory import RunDirectory
from diffrun.training.run_state import NonFiniteWeightsError, RunState
from diffrun.training.run_view import RunView, recorded_config
from diffrun.training.setup import build_components
from diffrun.training.step import StepCounters

log = logging.getLogger(__name__)


class NonFiniteLossError(DiffrunError):
    """Training stopped because losses, gradients or weights became NaN/Inf (nan_policy=halt, or too many skips)."""


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, callbacks: list[Callback] | None = None,
                 directory: RunDirectory | None = None, lock: bool = True):
        """`callbacks`: None builds the config's (`callbacks` group); `directory`: a RunDirectory the caller
        has already locked (rank 0), else the Trainer locks `run_dir` itself (`lock=False`: a read-only user
        of a run, such as diffrun-eval, which never trains it)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        ranks = distributed.info()   # DDP: set up by diffrun.cli.train; one rank otherwise
        self.rank, self.world_size = ranks.rank, ranks.world_size
        self.directory = directory
        if self.rank == 0 and directory is None and lock:
            self.directory = RunDirectory(self.run_dir)
            self.directory.lock()
        try:
            self.parts = build_components(cfg, ranks)
        except BaseException:
            self._release()
            raise
        self.events = Events(build_callbacks(cfg, self.rank) if callbacks is None else callbacks)
        self.interrupt = GracefulInterrupt()
        self.step_fn = step_function(option(cfg.train.capture), self.parts)
        self.counters = StepCounters(self.device)
        self.stats = LogSNRStats.from_config(cfg.stats, self.schedule, self.device)
        self.state = RunState(cfg, self.run_dir, self.parts, self.stats, self.rank, self.world_size, self.interrupt)
        self.sampler = ImageSampler(self.ema.model, self.schedule, self.data, self.device, self.autocast_dtype)
        self.view = RunView(name=str(cfg.name), run_dir=self.run_dir, job_type="train", config=recorded_config(cfg),
                            events=self.events, data=self.data, ema=self.ema.model, generate=self.generate,
                            device=self.device, autocast_dtype=self.autocast_dtype,
                            progress=lambda: (self.state.step, self.state.images_seen), stats=self.stats,
                            rank=self.rank, world_size=self.world_size)

    # what tools read (callbacks read `view`)
    device = property(lambda self: self.parts.device)
    data = property(lambda self: self.parts.data)
    schedule = property(lambda self: self.parts.schedule)
    denoiser = property(lambda self: self.parts.denoiser)
    ema = property(lambda self: self.parts.ema)
    strategy = property(lambda self: self.parts.strategy)
    optimizer = property(lambda self: self.parts.optimizer)
    autocast_dtype = property(lambda self: self.parts.autocast_dtype)
    images_seen = property(lambda self: self.state.images_seen)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:   # benchmarks swap strategies with their own step counts
        self.state.step = value

    # ------------------------------------------------------------------------------------------------
    # flush: metrics of the window, NaN policy
    # ------------------------------------------------------------------------------------------------
    def flush(self, window_steps: int, window_seconds: float) -> dict:
        window = self.counters.read(self.parts.comm)
        if self.world_size > 1:
            self.stats.reduce_(self.parts.comm.all_reduce_)   # per-bin sums over ranks
        state = self.state
        state.nonfinite_total += window["nonfinite"]
        state.overflow_total += window["overflow"]
        record = {"step": self.step, "images_seen": self.images_seen,
                  **{k: window[k] for k in ("loss", "weighted_loss", "grad_norm")},
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "images_per_sec": window_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
                  "nonfinite_steps": state.nonfinite_total, "ema_decay": self.ema.current_decay(), "time": time.time()}
        if self.parts.scaler.is_enabled():
            record.update(grad_scale=self.parts.scaler.get_scale(), overflow_steps=state.overflow_total)
        self.events.flush(record, self.stats.flush())
        if not state.weights_finite():
            raise NonFiniteLossError(
                f"the model weights became non-finite before step {self.step} although every applied step had a finite "
                f"loss and gradient: an update overflowed. The last good checkpoint is {state.newest_checkpoint()}. "
                + nonfinite_hint(self.cfg, reduced_precision=self.autocast_dtype is not None))
        if window["nonfinite"]:
            self._apply_nan_policy(window["nonfinite"], window["first_bad"])
        return record

    def _apply_nan_policy(self, nonfinite: int, first_bad: int) -> None:
        policy = option(self.cfg.train.nan_policy)
        total, limit = self.state.nonfinite_total, self.cfg.train.max_skipped_fraction
        if policy == "halt" or total > limit * max(1, self.step):
            path = self.save_checkpoint()    # every bad update was skipped: this state is the last good one
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {first_bad} ({total} of {self.step} steps"
                f"{'' if policy == 'halt' else f', more than train.max_skipped_fraction={limit}'}); those updates "
                f"were skipped and the last good state was saved to {path}. "
                + nonfinite_hint(self.cfg, reduced_precision=self.autocast_dtype is not None))
        log.warning("skipped %d non-finite step(s) (first at step %d); train.nan_policy=skip", nonfinite, first_bad)

    def save_checkpoint(self) -> Path:
        try:
            return self.state.save()
        except NonFiniteWeightsError as exc:
            raise NonFiniteLossError(f"{exc}: an applied update overflowed. Not saved; the last good checkpoint is "
                                     f"{self.state.newest_checkpoint()}.") from None

    # ------------------------------------------------------------------------------------------------
    # sampling (for callbacks: sample grids, FID)
    # ------------------------------------------------------------------------------------------------
    def generate(self, num_images: int, seed: int | range, settings, section: str,
                 class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """`ImageSampler.__call__` from the EMA model; a requested stop ends it between batches."""
        self.interrupt.check()
        return self.sampler(num_images, seed, settings, section, class_labels)

    # ------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------
    def write_status(self, state: str, **extra) -> None:
        if self.directory is not None:
            status.write_status(self.directory.path, state, self.step, self.cfg.train.steps, fingerprint=fingerprint(self.cfg),
                         **extra)

    def stop_requested(self) -> bool:
        """A signal arrived (on any rank: under DDP the ranks agree every dist.interrupt_check_every steps)."""
        if self.world_size == 1:
            return self.interrupt.requested
        if self.step % self.cfg.dist.interrupt_check_every:
            return False
        return distributed.any_rank(self.interrupt.requested, self.device)

    def _begin(self) -> None:
        if self.rank == 0:
            atomic_write(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
            atomic_write_json(self.run_dir / "provenance.json", provenance())
        resumed = self.state.resume()
        init_from = None if resumed else self.cfg.model.get("init_from")
        if init_from:
            self.state.init_from(init_from)
        log.info("run %s: %s on %s, %s, %d params, strategy %s, %s", self.cfg.name, self.cfg.dataset.name, self.device,
                 self.autocast_dtype or "fp32", sum(p.numel() for p in self.denoiser.parameters()),
                 self.strategy.describe(), f"resumed at step {self.step}" if resumed else
                 f"from the weights of {init_from}" if init_from else "from scratch")
        self.write_status(status.RUNNING)
        self.events.start(self.view)

    def _train(self) -> None:
        cfg, total, state = self.cfg, self.cfg.train.steps, self.state
        self.denoiser.train()
        window_start, window_steps = time.perf_counter(), 0
        while state.step < total:
            x0, labels = self.data.batch(self.parts.local_batch_size)
            self.step_fn(self.parts, x0, state.step, self.counters, self.stats, labels)
            state.step += 1
            state.images_seen += cfg.train.batch_size
            window_steps += 1
            if state.step % cfg.train.log_every == 0 or state.step == total:
                self.flush(window_steps, time.perf_counter() - window_start)
                window_start, window_steps = time.perf_counter(), 0
            if state.step == total:
                break
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            self.events.step()
            if self.stop_requested():
                raise StopRequested("a signal asked the run to stop")

    def fit(self) -> dict:
        """Train to `train.steps`, then the end-of-run work; returns the summary written to status.json."""
        try:
            with self.interrupt:
                try:
                    self._begin()
                    self._train()
                    if self.state.checkpointed_step != self.step:
                        self.save_checkpoint()
                    summary = {"step": self.step, **self.events.end()}
                    self.write_status(status.FINISHED, **{k: v for k, v in summary.items() if k != "step"})
                    return summary
                except StopRequested:
                    return self._stop_after_signal()
        except NonFiniteLossError as exc:
            self.write_status(status.HALTED, error=str(exc))
            raise
        except SystemExit:   # resume_default: the signal went on to submitit (requeue) or exits the process
            raise
        except KeyboardInterrupt:
            self.write_status(status.INTERRUPTED, reason="second interrupt (stopped at once)",
                              checkpoint_step=max(self.state.checkpointed_step, 0))
            raise
        except BaseException as exc:
            self.write_status(status.FAILED, error=f"{type(exc).__name__}: {exc}",
                              checkpoint_step=max(self.state.checkpointed_step, 0))
            raise
        finally:
            self.events.close()
            self._release()

    def _stop_after_signal(self) -> dict:
        if self.state.checkpointed_step != self.step:
            self.save_checkpoint()
        self.write_status(status.INTERRUPTED, signal=self.interrupt.signum, checkpoint_step=self.state.checkpointed_step)
        distributed.barrier()
        self.events.close()
        self._release()
        self.interrupt.resume_default()  # chains to submitit (requeue) or exits; returns on a rank that got no signal
        return {"step": self.step, "interrupted": True}

    def _release(self) -> None:
        if getattr(self, "parts", None) is not None:   # not when building the components failed
            self.parts.data.close()                      # stream workers
        if self.directory is not None:
            self.directory.unlock()
