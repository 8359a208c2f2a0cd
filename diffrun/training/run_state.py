"""How far a run got, as checkpoints hold it: the state of everything the step changes, saved and resumed.

A checkpoint holds the model, EMA, optimizer, LR schedule, GradScaler, strategy state, the unflushed
per-log-SNR sums, the progress counters, every RNG stream (per rank under DDP) and the run's config
and fingerprint. Weights that are not finite are never saved: the newest file stays the last good one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffrun import distributed
from diffrun.fingerprint import fingerprint_of, trained_config
from diffrun.training import checkpoint as ckpt
from diffrun.training.environment import rng_state, seed_everything, set_rng_state
from diffrun.training.export import load_into
from diffrun.training.identity import check_checkpoint
from diffrun.training.interrupt import GracefulInterrupt
from diffrun.training.logsnr_stats import LogSNRStats
from diffrun.training.setup import Components

log = logging.getLogger(__name__)


class NonFiniteWeightsError(Exception):
    """The weights in memory are not finite (turned into the trainer's NonFiniteLossError)."""


class RunState:
    def __init__(self, cfg: DictConfig, run_dir: Path, parts: Components, stats: LogSNRStats, rank: int,
                 world_size: int, interrupt: GracefulInterrupt):
        self.cfg, self.parts, self.stats = cfg, parts, stats
        self.rank, self.world_size, self.interrupt = rank, world_size, interrupt
        self.checkpoints = ckpt.CheckpointManager(Path(run_dir) / "checkpoints", cfg.checkpoint.keep,
                                                  bool(cfg.checkpoint.get("allow_unverified", False)),
                                                  bool(cfg.checkpoint.get("allow_pickle", False)))
        self.step = 0
        self.images_seen = 0
        self.nonfinite_total = 0             # steps skipped as non-finite (loss or gradient)
        self.overflow_total = 0              # fp16 GradScaler skips
        self.checkpointed_step = -1          # the step of the checkpoint on disk that matches the state in memory

    # --- the state ----------------------------------------------------------------------------------
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
            "data": p.data.state_dict(),                           # where the data stream is
            "stats_sums": p.comm.summed(self.stats.sums).cpu(),   # unflushed window, summed over ranks
            "nonfinite_total": self.nonfinite_total,
            "overflow_total": self.overflow_total,
            "rng": rng_state(),
            "rng_per_rank": distributed.gather_objects(rng_state()) if self.world_size > 1 else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            "trained_config": (trained := trained_config(self.cfg)),
            "fingerprint": fingerprint_of(trained),
        }

    def load_state_dict(self, state: dict) -> None:
        p = self.parts
        p.denoiser.load_state_dict(state["model"])
        p.ema.load_state_dict(state["ema"])
        p.optimizer.load_state_dict(state["optimizer"])      # moves its state to the parameters' device
        p.lr_schedule.load_state_dict(state["lr_schedule"])
        p.scaler.load_state_dict(state["scaler"])
        p.strategy.load_state_dict(state["strategy"])
        p.data.load_state_dict(state.get("data", {"order": "iid"}))
        self.stats.sums.copy_(state["stats_sums"].to(p.device))
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

    def init_from(self, path: str) -> None:
        """Start from the weights of a diffrun-export file (`model.init_from`): the model and its EMA."""
    
        load_into(self.parts.denoiser, path)
        self.parts.ema.model.load_state_dict(self.parts.denoiser.state_dict())

    def weights_finite(self) -> bool:
        """Model and EMA weights are finite (a host sync: called at flushes and before saving)."""
        tensors = [t for m in (self.parts.denoiser, self.parts.ema.model) for t in m.parameters()]
        return bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all())

    # --- checkpoints ---------------------------------------------------------------------------------
    def newest_checkpoint(self) -> str:
        found = self.checkpoints.list()
        return str(found[-1]) if found else "none (no checkpoint was written)"

    def save(self) -> Path:
        """Save the state (a collective under DDP: every rank calls it at the same step)."""
        if not self.weights_finite():
            raise NonFiniteWeightsError(f"the model weights are not finite at step {self.step}")
        state = self.state_dict()
        path = self.checkpoints.path_for(self.step)
        if self.rank == 0:
            with self.interrupt.critical():   # a second Ctrl-C waits for the file to be whole
                path = self.checkpoints.save(state, self.step)
                self.checkpointed_step = self.step
                log.info("saved checkpoint %s", path)
        self.checkpointed_step = self.step
        return path

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
            state = ckpt.load(path, self.checkpoints.allow_unverified, self.checkpoints.allow_pickle)
        check_checkpoint(state, path, self.cfg, force=resume == "force")
        self.load_state_dict(state)
        if path.parent == self.checkpoints.directory:
            self.checkpointed_step = self.step
        log.info("resumed from %s at step %d", path, self.step)
        return True
