"""The training loop: setup, model, EMA, data, loop, checkpoint — readable top to bottom (DiT style).

Hot-loop rule: nothing in `train_step` reads a tensor back to the host. Loss sums, the non-finite
step counter and the per-log-SNR statistics stay on the device and are read every `log_every` steps.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffrun.config import build, validate
from diffrun.data import InMemoryImages
from diffrun.errors import ConfigError, DiffrunError
from diffrun.launching import distributed
from diffrun.models.parameterization import Denoiser
from diffrun.monitoring.logsnr_stats import LogSNRStats
from diffrun.monitoring.metrics import JsonlWriter
from diffrun.sampling import sample, save_grid, to_uint8
from diffrun.schedules import alpha_sigma
from diffrun.strategies import NoiseDraw, Strategy
from diffrun.training.checkpoint import CheckpointManager, atomic_write_json
from diffrun.training.ema import EMA
from diffrun.training.environment import (
    provenance, resolve_device, resolve_precision, rng_state, seed_everything, set_rng_state,
)
from diffrun.training.interrupt import GracefulInterrupt
from diffrun.training.optim import build_lr_schedule, build_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(DiffrunError):
    """Training stopped because losses or gradients became NaN/Inf (nan_policy=halt)."""


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        ranks = distributed.info()  # DDP: set up by diffrun.cli.train (launching/distributed.py); one rank otherwise
        self.rank, self.world_size = ranks.rank, ranks.world_size
        try:
            if self.rank == 0:  # only rank 0 writes files
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write_test"
                probe.write_text("ok")
                probe.unlink()
        except OSError as exc:
            raise DiffrunError(
                f"run directory {self.run_dir} is not writable ({exc.strerror or exc}); "
                f"set hydra.run.dir (or hydra.sweep.dir) to a writable location with free space"
            ) from exc
        if cfg.train.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by the "
                              f"{self.world_size} ranks (each draws batch_size / world_size)")
        self.local_batch_size = cfg.train.batch_size // self.world_size
        # plain Python copies of the keys train_step reads: OmegaConf lookups cost microseconds each, every step
        self.channels_last = cfg.train.channels_last
        self.grad_clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")  # 0 disables clipping
        self.device = distributed.rank_device(resolve_device(cfg.device), ranks)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed, cfg.deterministic)   # the same model init on every rank
        if self.device.type == "cuda" and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True   # fixed shapes: cuDNN times its conv algorithms once, keeps the fastest

        # --- data ----------------------------------------------------------------------------------
        self.data: InMemoryImages = build(cfg.dataset.loader)
        if (self.data.channels, self.data.image_size) != (cfg.dataset.channels, cfg.dataset.image_size):
            raise ConfigError(
                f"dataset {cfg.dataset.name}: images are {self.data.channels}x{self.data.image_size}px but the config says "
                f"dataset.channels={cfg.dataset.channels}, dataset.image_size={cfg.dataset.image_size}"
            )
        self.data.check_batch_size(cfg.train.batch_size)
        self.data.to(self.device)

        # --- schedule, model, EMA, strategy ----------------------------------------------------------
        self.schedule = build(cfg.schedule)
        net = build(cfg.model.net)
        self.denoiser = Denoiser(net, cfg.model.prediction, cfg.model.sigma_data).to(self.device)
        if cfg.train.channels_last:
            self.denoiser = self.denoiser.to(memory_format=torch.channels_last)
        self.ema = EMA(self.denoiser, cfg.ema.decay, cfg.ema.warmup)
        self.model = self.denoiser
        if self.world_size > 1:  # gradients averaged over ranks; DDP also broadcasts rank 0's weights
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.denoiser, device_ids=[self.device] if self.device.type == "cuda" else None)
            seed_everything(cfg.seed + self.rank)         # data and noise: a different stream per rank
        self.model = torch.compile(self.model) if cfg.train.compile else self.model
        self.strategy = build(cfg.weighting, _keep_meta=("name", "citation"))
        self.strategy.bind(self.schedule, cfg.model.prediction, cfg.model.sigma_data).to(self.device)
        distributed.broadcast_module_(self.strategy)   # DDP: one strategy state (e.g. the policy's init) on all ranks
        self._strategy_observes = type(self.strategy).observe is not Strategy.observe  # stateless: no feedback to gather

        # --- optimizer -----------------------------------------------------------------------------
        self.optimizer = build_optimizer(cfg.optimizer, self.denoiser.parameters(), self.device)
        self.fused = bool(self.optimizer.defaults.get("fused"))
        self.lr_schedule = build_lr_schedule(cfg.optimizer, self.optimizer, cfg.train.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

        # --- bookkeeping ---------------------------------------------------------------------------
        self.step = 0
        self.images_seen = 0
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.stats = LogSNRStats.from_config(cfg.stats, self.schedule, self.device)
        self._acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # Σloss, Σweighted loss, Σgrad-norm
        self._nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.nonfinite_total = 0
        self.metrics: JsonlWriter | None = None
        self.callbacks: list = []  # objects with optional on_flush(trainer, record, stats) / on_sample / close

    # ------------------------------------------------------------------------------------------------
    # checkpoint / resume
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "model": self.denoiser.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "stats_sums": distributed.summed(self.stats.sums).cpu(),  # unflushed window, summed over ranks
            "nonfinite_total": self.nonfinite_total + int(self._nonfinite),
            "rng": rng_state(),
            "rng_per_rank": distributed.gather_objects(rng_state()) if self.world_size > 1 else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict) -> None:
        self.denoiser.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.stats.sums.copy_(state["stats_sums"].to(self.device))
        if self.rank != 0:
            self.stats.sums.zero_()  # saved already summed over ranks: count them once
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        per_rank = state.get("rng_per_rank")
        if self.world_size == 1:
            set_rng_state(state["rng"])
        elif per_rank is not None and len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:  # world size changed since the checkpoint: fresh, distinct streams per rank
            seed_everything(self.cfg.seed + self.rank + 1_000_003 * self.step)

    def save_checkpoint(self) -> Path:
        state = self.state_dict()  # under DDP a collective: every rank calls this at the same step
        if self.rank != 0:
            return self.checkpoints.directory / f"ckpt_{self.step:08d}.pt"
        path = self.checkpoints.save(state, self.step)
        log.info("saved checkpoint %s", path)
        return path

    def maybe_resume(self) -> bool:
        resume = self.cfg.resume
        if resume == "never":
            if self.checkpoints.list():
                log.warning("resume=never: ignoring existing checkpoints in %s (they will be replaced)", self.checkpoints.directory)
            return False
        if resume == "auto":
            found = self.checkpoints.load_latest(self.device)
            if found is None:
                return False
            state, path = found
        else:
            path = Path(resume)
            state = CheckpointManager.verify_and_load(path, self.device)
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        x0 = self.data.batch(self.local_batch_size)    # batch_size is global: batch_size / world_size per rank
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        draw = self.strategy.sample(x0)
        eps = torch.randn_like(x0)
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in alpha_sigma(draw.logsnr))
        z = alpha * x0 + sigma * eps

        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.model(z, draw.logsnr)
        target = self.denoiser.target(x0, eps, z, draw.logsnr)
        loss = (out.float() - target).square().mean(dim=(1, 2, 3))          # (B,) unweighted, target space
        weight = self.strategy.loss_weights(draw, loss.detach())
        total = (weight * loss).mean()
        extra = self.strategy.extra_loss()
        if extra is not None:
            total = total + extra

        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.on_before_update(self.denoiser, x0, self.step)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.grad_clip)
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(total))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)   # fp16: the scaler skips inf/NaN steps itself
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf, self.optimizer.grad_scale = bad.float(), None  # skip on the device
            self.optimizer.step()
            del self.optimizer.found_inf, self.optimizer.grad_scale
        else:
            if not bad:                        # host sync; only for optimizers without fused kernels
                self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.denoiser)
        self.strategy.on_after_update(self.denoiser, x0, self.step)
        if self._strategy_observes:
            self.strategy.observe(*self._global_feedback(draw, loss.detach()))

        # device-side bookkeeping, read back at flush
        good = (~bad).double()
        self._acc += torch.stack([loss.detach().mean().double(), total.detach().double(),
                                  grad_norm.detach().double()]).nan_to_num(0.0) * good
        self._nonfinite += bad.long()
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), self.step + 1, self._first_bad_step)
        self.stats.update(draw.logsnr, loss.detach().nan_to_num(0.0), weight.detach())

    def _global_feedback(self, draw: NoiseDraw, loss: torch.Tensor) -> tuple[NoiseDraw, torch.Tensor]:
        """Under DDP the strategy learns from the global batch (every rank's draws and losses, in rank
        order), so adaptive state stays identical on all ranks and a resumed run continues it exactly."""
        if self.world_size == 1:
            return draw, loss
        logsnr, weight, t, index, loss = distributed.all_gather_cat(draw.logsnr, draw.proposal_weight, draw.t,
                                                                    draw.index, loss)
        return NoiseDraw(logsnr=logsnr, proposal_weight=weight, t=t, index=index), loss

    # ------------------------------------------------------------------------------------------------
    # logging, sampling
    # ------------------------------------------------------------------------------------------------
    def flush(self, window_steps: int, window_seconds: float) -> dict:
        if self.world_size > 1:  # rank means of the loss sums; per-bin statistics and skip counts summed/maxed
            distributed.all_reduce_(self._acc).div_(self.world_size)
            distributed.all_reduce_(self._nonfinite, "max")
            distributed.all_reduce_(self._first_bad_step, "max")
            self.stats.reduce_(distributed.all_reduce_)
        acc = (self._acc / max(1, window_steps)).tolist()
        self._acc.zero_()
        nonfinite = int(self._nonfinite)
        self.nonfinite_total += nonfinite
        self._nonfinite.zero_()
        record = {
            "step": self.step,
            "images_seen": self.images_seen,
            "loss": acc[0],
            "weighted_loss": acc[1],
            "grad_norm": acc[2],
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": window_steps * self.cfg.train.batch_size / max(window_seconds, 1e-9),
            "nonfinite_steps": self.nonfinite_total,
            "ema_decay": self.ema.current_decay(),
            "time": time.time(),
        }
        if self.scaler.is_enabled():
            record["grad_scale"] = self.scaler.get_scale()
        stats = self.stats.flush()
        if self.metrics is not None:
            self.metrics.write(record)
        for cb in self.callbacks:
            if hasattr(cb, "on_flush"):
                cb.on_flush(self, record, stats)
        if nonfinite:
            first = int(self._first_bad_step)
            policy = str(getattr(self.cfg.train.nan_policy, "value", self.cfg.train.nan_policy))
            too_many = self.nonfinite_total > self.cfg.train.max_skipped_fraction * max(1, self.step)
            if policy == "halt" or too_many:
                path = self.save_checkpoint()
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {first} ({self.nonfinite_total} of {self.step} steps); "
                    f"those updates were skipped and the last good state was saved to {path}. "
                    f"Lower optimizer.optim.lr, enable train.grad_clip, or use precision=fp32."
                )
            log.warning("skipped %d non-finite step(s) (first at step %d); nan_policy=skip", nonfinite, first)
        return record

    @torch.no_grad()
    def generate(self, num_images: int, steps: int, sampler: str, seed: int, eta: float = 0.0) -> torch.Tensor:
        """uint8 samples from the EMA model (fixed seed: grids comparable across runs and steps)."""
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (num_images, self.data.channels, self.data.image_size, self.data.image_size)
        x = sample(self.ema.model, self.schedule, shape, steps=steps, sampler=sampler, eta=eta,
                   clip_x0=self.cfg.sample.clip_x0, generator=generator, device=self.device,
                   autocast_dtype=self.autocast_dtype)
        return to_uint8(x)

    def sample_grid(self) -> Path | None:
        cfg = self.cfg.sample
        if cfg.num_images <= 0 or self.rank != 0:
            return None
        images = self.generate(cfg.num_images, cfg.steps, cfg.sampler, cfg.seed, cfg.eta)
        path = save_grid(images, self.run_dir / "samples" / f"step_{self.step:08d}.png")
        for cb in self.callbacks:
            if hasattr(cb, "on_sample"):
                cb.on_sample(self, images, path)
        return path

    # ------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------
    def write_status(self, state: str, **extra) -> None:
        if self.rank != 0:
            return
        atomic_write_json(self.run_dir / "status.json", {"state": state, "step": self.step,
                                                         "total_steps": self.cfg.train.steps, **extra})

    def stop_requested(self, interrupt: GracefulInterrupt) -> bool:
        """A signal arrived (on any rank: under DDP the ranks agree every dist.interrupt_check_every steps)."""
        if self.world_size == 1:
            return interrupt.requested
        if self.step % self.cfg.dist.interrupt_check_every:
            return False
        return distributed.any_rank(interrupt.requested, self.device)

    def fit(self) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            atomic_write_json(self.run_dir / "provenance.json", provenance())
        resumed = self.maybe_resume()
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl") if self.rank == 0 else None
        log.info("run %s: %s on %s, %s, %d params, strategy %s, %s",
                 cfg.name, cfg.dataset.name, self.device, self.autocast_dtype or "fp32",
                 sum(p.numel() for p in self.denoiser.parameters()), self.strategy.describe(),
                 f"resumed at step {self.step}" if resumed else "from scratch")
        self.write_status("running")
        self.denoiser.train()
        progress = None
        if cfg.train.progress and self.rank == 0:
            from tqdm.auto import tqdm
            progress = tqdm(total=cfg.train.steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        last_record: dict = {}
        window_start, window_steps = time.perf_counter(), 0
        try:
            with GracefulInterrupt() as interrupt:
                while self.step < cfg.train.steps:
                    self.train_step()
                    self.step += 1
                    self.images_seen += cfg.train.batch_size
                    window_steps += 1
                    if progress is not None:
                        progress.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        last_record = self.flush(window_steps, time.perf_counter() - window_start)
                        window_start, window_steps = time.perf_counter(), 0
                        if progress is not None:
                            progress.set_postfix(loss=f"{last_record['loss']:.4f}", img_s=f"{last_record['images_per_sec']:.0f}")
                    done = self.step == cfg.train.steps
                    if not done and cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                        self.save_checkpoint()
                    if not done and cfg.sample.every_steps and self.step % cfg.sample.every_steps == 0:
                        self.sample_grid()
                    for cb in self.callbacks:
                        if not done and hasattr(cb, "on_step"):
                            cb.on_step(self)
                    if not done and self.stop_requested(interrupt):
                        self.save_checkpoint()
                        self.write_status("interrupted", signal=interrupt.signum)
                        if progress is not None:
                            progress.close()
                        distributed.barrier()
                        interrupt.resume_default()  # chains to submitit (requeue) or exits; returns on a rank that got no signal
                        return {"step": self.step, "interrupted": True}
            if progress is not None:
                progress.close()
            self.save_checkpoint()
            grid = self.sample_grid()
            summary = {"step": self.step, "final_loss": last_record.get("loss"), "samples": str(grid) if grid else None}
            for cb in self.callbacks:
                if hasattr(cb, "on_train_end"):
                    summary.update(cb.on_train_end(self) or {})
            self.write_status("finished", **{k: v for k, v in summary.items() if k != "step"})
            return summary
        except NonFiniteLossError as exc:
            self.write_status("halted", error=str(exc))
            raise
        except (Exception, KeyboardInterrupt) as exc:
            self.write_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
            for cb in self.callbacks:
                if hasattr(cb, "close"):
                    cb.close()
