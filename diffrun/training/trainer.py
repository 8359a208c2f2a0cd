"""The training loop: resume, step, flush, checkpoint, tell the callbacks — then the final checkpoint and the
callbacks' end-of-run work (sample grid, FID). Where things are:

    the step                  diffrun/training/step.py         (train_step: no host sync, no config)
    the step as one graph     diffrun/training/capture.py      (train.capture=compile)
    building it all           diffrun/training/setup.py        (build_components)
    the run directory         diffrun/training/run_state.py    (lock, identity, status.json)
    checkpoint files          diffrun/training/checkpoint.py
    everything else           diffrun/training/callbacks.py    (metrics file, statistics, W&B, samples, FID)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffrun.config import validate
from diffrun.errors import CheckpointError, DiffrunError
from diffrun.files import atomic_write, atomic_write_json
from diffrun.launching import distributed
from diffrun.monitoring.logsnr_stats import LogSNRStats
from diffrun.sampling import SamplerOptions, autocast_dtype, run_sampler, to_uint8
from diffrun.training import checkpoint as ckpt
from diffrun.training.callbacks import Callback, Events, build_callbacks
from diffrun.training.capture import step_function
from diffrun.training.environment import provenance, rng_state, seed_everything, set_rng_state
from diffrun.training.interrupt import GracefulInterrupt, StopRequested
from diffrun.training.nonfinite import nonfinite_hint
from diffrun.training.run_state import RunDirectory, check_checkpoint, fingerprint, trained_config
from diffrun.training.setup import build_components
from diffrun.training.step import StepCounters

log = logging.getLogger(__name__)


class NonFiniteLossError(DiffrunError):
    """Training stopped because losses or gradients became NaN/Inf (nan_policy=halt, or too many skips)."""


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, callbacks: list[Callback] | None = None,
                 directory: RunDirectory | None = None, lock: bool = True):
        """`callbacks`: None builds the config's (`callbacks` group); `directory`: a RunDirectory the caller
        has already locked (rank 0), else the Trainer locks `run_dir` itself (`lock=False`: a read-only user
        of a run, such as diffrun-eval, which never trains it)."""
        validate(cfg)
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
        self.step = 0
        self.images_seen = 0
        self.checkpointed_step = -1          # the step of the checkpoint on disk that matches the state in memory
        self.nonfinite_total = 0
        self.overflow_total = 0
        self.step_fn = step_function(str(getattr(cfg.train.capture, "value", cfg.train.capture)), self.parts)
        self.counters = StepCounters(self.device)
        self.stats = LogSNRStats.from_config(cfg.stats, self.schedule, self.device)
        self.checkpoints = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                                  bool(cfg.checkpoint.get("allow_unverified", False)))
        self.interrupt = GracefulInterrupt()

    # what callbacks and tools read
    device = property(lambda self: self.parts.device)
    data = property(lambda self: self.parts.data)
    schedule = property(lambda self: self.parts.schedule)
    denoiser = property(lambda self: self.parts.denoiser)
    ema = property(lambda self: self.parts.ema)
    strategy = property(lambda self: self.parts.strategy)
    optimizer = property(lambda self: self.parts.optimizer)
    autocast_dtype = property(lambda self: self.parts.autocast_dtype)

    # ------------------------------------------------------------------------------------------------
    # checkpoint / resume
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        p = self.parts
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "model": p.denoiser.state_dict(),
            "ema": p.ema.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "lr_schedule": p.lr_schedule.state_dict(),
            "scaler": p.scaler.state_dict(),
            "strategy": p.strategy.state_dict(),
            "stats_sums": p.comm.summed(self.stats.sums).cpu(),   # unflushed window, summed over ranks
            "nonfinite_total": self.nonfinite_total,
            "overflow_total": self.overflow_total,
            "rng": rng_state(),
            "rng_per_rank": distributed.gather_objects(rng_state()) if self.world_size > 1 else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            "trained_config": trained_config(self.cfg),
            "fingerprint": fingerprint(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        p, device = self.parts, self.device
        p.denoiser.load_state_dict(state["model"])
        p.ema.load_state_dict(state["ema"])
        p.optimizer.load_state_dict(state["optimizer"])      # moves its state to the parameters' device
        p.lr_schedule.load_state_dict(state["lr_schedule"])
        p.scaler.load_state_dict(state["scaler"])
        p.strategy.load_state_dict(state["strategy"])
        self.stats.sums.copy_(state["stats_sums"].to(device))
        if self.rank != 0:
            self.stats.sums.zero_()                             # saved already summed over ranks: count them once
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.overflow_total = state.get("overflow_total", 0)
        per_rank = state.get("rng_per_rank")
        if self.world_size == 1:
            set_rng_state(state["rng"])
        elif per_rank is not None and len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:  # world size changed since the checkpoint: fresh, distinct streams per rank
            seed_everything(self.cfg.seed + self.rank + 1_000_003 * self.step)

    def weights_finite(self) -> bool:
        """Model and EMA weights are finite (a host sync: called at flushes and before saving)."""
        tensors = [t for m in (self.denoiser, self.ema.model) for t in m.parameters()]
        return bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all())

    def save_checkpoint(self) -> Path:
        """Save the state (a collective under DDP: every rank calls it at the same step). Refuses a state whose
        weights are not finite: the newest checkpoint on disk then stays the last good one."""
        if not self.weights_finite():
            raise NonFiniteLossError(
                f"the model weights are not finite at step {self.step}: an applied update overflowed (the learning "
                f"rate, a loss weight or the schedule is too large). Not saved; the last good checkpoint is "
                f"{self._newest_checkpoint()}.")
        state = self.state_dict()
        path = self.checkpoints.path_for(self.step)
        if self.rank == 0:
            with self.interrupt.critical():   # a second Ctrl-C waits for the file to be whole
                path = self.checkpoints.save(state, self.step)
                self.checkpointed_step = self.step
                log.info("saved checkpoint %s", path)
        self.checkpointed_step = self.step
        return path

    def _newest_checkpoint(self) -> str:
        found = self.checkpoints.list()
        return str(found[-1]) if found else "none (no checkpoint was written)"

    def resume(self) -> bool:
        """Load the state to continue from (resume=auto|force: the newest good checkpoint; a path: that file).
        A checkpoint of another run stops the run (RunMismatchError) unless resume=force."""
        resume = str(self.cfg.resume)
        if resume == "never":
            if self.checkpoints.list():
                log.warning("resume=never: ignoring the checkpoints in %s (they will be replaced)", self.checkpoints.directory)
            return False
        if resume in ("auto", "force"):
            found = self.checkpoints.load_latest()
            if found is None:
                return False
            state, path = found
        else:
            path = Path(resume).expanduser()
            state = ckpt.load(path, self.checkpoints.allow_unverified)
        check_checkpoint(state, path, self.cfg, force=resume == "force")
        self.load_state_dict(state)
        if path.parent == self.checkpoints.directory:
            self.checkpointed_step = self.step
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------------
    # flush: metrics of the window, NaN policy
    # ------------------------------------------------------------------------------------------------
    def flush(self, window_steps: int, window_seconds: float) -> dict:
        c = self.counters
        if self.world_size > 1:  # rank means of the loss sums; counts summed or maxed; per-bin statistics summed
            comm = self.parts.comm
            comm.all_reduce_(c.sums).div_(self.world_size)
            for tensor in (c.good, c.nonfinite, c.overflow, c.first_bad):
                comm.all_reduce_(tensor, "max")
            self.stats.reduce_(comm.all_reduce_)
        good = int(c.good)
        sums = (c.sums / max(1, good)).tolist()
        nonfinite, overflow, first_bad = int(c.nonfinite), int(c.overflow), int(c.first_bad)
        c.reset()
        self.nonfinite_total += nonfinite
        self.overflow_total += overflow
        record = {
            "step": self.step,
            "images_seen": self.images_seen,
            "loss": sums[0] if good else float("nan"),
            "weighted_loss": sums[1] if good else float("nan"),
            "grad_norm": sums[2] if good else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": window_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
            "nonfinite_steps": self.nonfinite_total,
            "ema_decay": self.ema.current_decay(),
            "time": time.time(),
        }
        if self.parts.scaler.is_enabled():
            record["grad_scale"] = self.parts.scaler.get_scale()
            record["overflow_steps"] = self.overflow_total
        self.events.flush(self, record, self.stats.flush())
        if not self.weights_finite():
            raise NonFiniteLossError(
                f"the model weights became non-finite before step {self.step} although every applied step had a finite "
                f"loss and gradient: an update overflowed (learning rate, loss weight or schedule too large). The last "
                f"good checkpoint is {self._newest_checkpoint()}.")
        if nonfinite:
            self._apply_nan_policy(nonfinite, first_bad)
        return record

    def _apply_nan_policy(self, nonfinite: int, first_bad: int) -> None:
        policy = str(getattr(self.cfg.train.nan_policy, "value", self.cfg.train.nan_policy))
        too_many = self.nonfinite_total > self.cfg.train.max_skipped_fraction * max(1, self.step)
        if policy == "halt" or too_many:
            path = self.save_checkpoint()    # every bad update was skipped: this state is the last good one
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {first_bad} ({self.nonfinite_total} of {self.step} steps"
                f"{'' if policy == 'halt' else f', more than train.max_skipped_fraction={self.cfg.train.max_skipped_fraction}'}); "
                f"those updates were skipped and the last good state was saved to {path}. "
                + nonfinite_hint(self.cfg, reduced_precision=self.autocast_dtype is not None))
        log.warning("skipped %d non-finite step(s) (first at step %d); train.nan_policy=skip", nonfinite, first_bad)

    # ------------------------------------------------------------------------------------------------
    # sampling (for callbacks: sample grids, FID)
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num_images: int, seed: int, section: str = "sample") -> tuple[torch.Tensor, int]:
        """(uint8 images, network evaluations per image) from the EMA model, with the sampler options of
        `sample.*` or `eval.*` and a generator of their own (a fixed seed: comparable across runs and steps)."""
        self.interrupt.check()
        settings = self.cfg[section]
        options = SamplerOptions.from_config(settings, section)
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (num_images, self.data.channels, self.data.image_size, self.data.image_size)
        result = run_sampler(self.ema.model, self.schedule, shape, options, generator=generator, device=self.device,
                             autocast_dtype=autocast_dtype(settings.precision, self.autocast_dtype, section))
        return to_uint8(result.images), result.nfe

    # ------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------
    def write_status(self, state: str, **extra) -> None:
        if self.directory is not None:
            self.directory.write_status(state, self.step, self.cfg.train.steps, fingerprint=fingerprint(self.cfg), **extra)

    def stop_requested(self) -> bool:
        """A signal arrived (on any rank: under DDP the ranks agree every dist.interrupt_check_every steps)."""
        if self.world_size == 1:
            return self.interrupt.requested
        if self.step % self.cfg.dist.interrupt_check_every:
            return False
        return distributed.any_rank(self.interrupt.requested, self.device)

    def _begin(self) -> bool:
        if self.rank == 0:
            atomic_write(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
            atomic_write_json(self.run_dir / "provenance.json", provenance())
        resumed = self.resume()
        log.info("run %s: %s on %s, %s, %d params, strategy %s, %s", self.cfg.name, self.cfg.dataset.name, self.device,
                 self.autocast_dtype or "fp32", sum(p.numel() for p in self.denoiser.parameters()),
                 self.strategy.describe(), f"resumed at step {self.step}" if resumed else "from scratch")
        self.write_status("running")
        self.events.start(self)
        return resumed

    def _train(self) -> None:
        cfg, total = self.cfg, self.cfg.train.steps
        self.denoiser.train()
        window_start, window_steps = time.perf_counter(), 0
        while self.step < total:
            self.step_fn(self.parts, self.data.batch(self.parts.local_batch_size), self.step, self.counters, self.stats)
            self.step += 1
            self.images_seen += cfg.train.batch_size
            window_steps += 1
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.flush(window_steps, time.perf_counter() - window_start)
                window_start, window_steps = time.perf_counter(), 0
            if self.step == total:
                break
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            self.events.step(self)
            if self.stop_requested():
                raise StopRequested("a signal asked the run to stop")

    def fit(self) -> dict:
        """Train to `train.steps`, then the end-of-run work; returns the summary written to status.json."""
        try:
            with self.interrupt:
                try:
                    self._begin()
                    self._train()
                    if self.checkpointed_step != self.step:
                        self.save_checkpoint()
                    summary = {"step": self.step, **self.events.end(self)}
                    self.write_status("finished", **{k: v for k, v in summary.items() if k != "step"})
                    return summary
                except StopRequested:
                    return self._stop_after_signal()
        except NonFiniteLossError as exc:
            self.write_status("halted", error=str(exc))
            raise
        except SystemExit:   # resume_default: the signal went on to submitit (requeue) or exits the process
            raise
        except KeyboardInterrupt:
            self.write_status("interrupted", reason="second interrupt (stopped at once)",
                              checkpoint_step=max(self.checkpointed_step, 0))
            raise
        except BaseException as exc:
            self.write_status("failed", error=f"{type(exc).__name__}: {exc}", checkpoint_step=max(self.checkpointed_step, 0))
            raise
        finally:
            self.events.close()
            self._release()

    def _stop_after_signal(self) -> dict:
        if self.checkpointed_step != self.step:
            self.save_checkpoint()
        signum = self.interrupt.signum
        self.write_status("interrupted", signal=signum, checkpoint_step=self.checkpointed_step)
        distributed.barrier()
        self.events.close()
        self._release()
        self.interrupt.resume_default()  # chains to submitit (requeue) or exits; returns on a rank that got no signal
        return {"step": self.step, "interrupted": True}

    def _release(self) -> None:
        if self.directory is not None:
            self.directory.unlock()


__all__ = ["Trainer", "NonFiniteLossError", "CheckpointError"]
