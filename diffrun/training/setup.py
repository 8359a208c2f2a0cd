"""Build what a run trains with, from its config: device, data, schedule, model, EMA, strategy, optimizer.

Read top to bottom as DiT's train.py: setup, data, model (+ DDP / compile), EMA, strategy, optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from diffrun import distributed
from diffrun.building import build
from diffrun.data import InMemoryImages, StreamingData, place
from diffrun.data.augment import AugmentPipe
from diffrun.errors import ConfigError
from diffrun.models.learned_variance import DiscretePosterior
from diffrun.models.parameterization import Denoiser
from diffrun.schedules import NoiseSchedule
from diffrun.strategies import Strategy
from diffrun.strategies.base import Communication, SingleProcess
from diffrun.training.ema import EMA
from diffrun.training.environment import (apply_tf32, resolve_device, resolve_precision, seed_everything,
                                          set_deterministic)
from diffrun.training.optim import build_lr_schedule, build_optimizer


@dataclass
class Components:
    """Everything the step touches. Plain attributes: the step reads no config."""

    device: torch.device
    autocast_dtype: torch.dtype | None     # None: fp32
    data: InMemoryImages | StreamingData   # diffrun/data/base.py: batch(n) -> (x, labels or None)
    augment: AugmentPipe | None            # EDM's augmentation (augment.p > 0), its labels go to the network
    local_batch_size: int                  # train.batch_size / world size
    num_classes: int                       # 0: unconditional; else labels in [0, K) and K is the null label
    label_dropout: float                   # probability that a label is replaced by the null label
    schedule: NoiseSchedule
    denoiser: Denoiser                     # the bare model (checkpoints, EMA, sampling)
    posterior: DiscretePosterior | None    # model.learn_sigma: q(x_{t−1}|x_t, x0) on the grid, for the hybrid loss
    parameters: list[nn.Parameter]         # the denoiser's, listed once (walking its modules costs ~0.2 ms a step)
    model: nn.Module                       # what the step calls: the denoiser, maybe in DDP and torch.compile
    ema: EMA
    strategy: Strategy
    comm: object                           # diffrun.strategies.base.Communication
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float                       # inf: no clipping (the norm is still computed, for the NaN check)
    channels_last: bool


def communication(ranks: distributed.DistInfo) -> Communication:
    """The ranks' `Communication` for the strategies: the process group's under DDP, the identity on one process."""
    return distributed.ProcessGroupCommunication(ranks.world_size) if ranks.enabled else SingleProcess()


def prepare_device(cfg: DictConfig, ranks: distributed.DistInfo) -> tuple[torch.device, torch.dtype | None, bool]:
    """(device, autocast dtype or None for fp32, whether fp16 needs a grad scaler), with the run's determinism,
    seeds and TF32 set."""
    device = distributed.rank_device(resolve_device(cfg.device), ranks)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)                     # cuda:N is also the current device (RNG restore, NCCL)
    autocast_dtype, use_scaler = resolve_precision(cfg.precision, device)
    set_deterministic(bool(cfg.deterministic), device)
    seed_everything(cfg.seed)                             # the same model init on every rank
    apply_tf32(cfg.train.tf32)
    return device, autocast_dtype, use_scaler


def build_data(cfg: DictConfig, device: torch.device, ranks: distributed.DistInfo) -> InMemoryImages | StreamingData:
    source = build(cfg.dataset.loader)
    if source.shape != (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size):
        raise ConfigError(
            f"dataset {cfg.dataset.name}: items are {source.shape[0]}x{source.shape[-1]}px but the config says "
            f"dataset.channels={cfg.dataset.channels}, dataset.image_size={cfg.dataset.image_size}")
    return place(source, cfg.dataset, device, cfg.seed, ranks.rank, ranks.world_size)


def build_denoiser(cfg: DictConfig, device: torch.device) -> Denoiser:
    denoiser = Denoiser(build(cfg.model.net), cfg.model.prediction, cfg.model.sigma_data,
                        bool(cfg.model.get("learn_sigma", False))).to(device)
    return denoiser.to(memory_format=torch.channels_last) if cfg.train.channels_last else denoiser


def build_components(cfg: DictConfig, ranks: distributed.DistInfo) -> Components:
    # --- device, precision, seeds ------------------------------------------------------------------
    distributed.check_batch(cfg.train.batch_size, ranks.world_size, f"this run's {ranks.world_size} ranks")
    device, autocast_dtype, use_scaler = prepare_device(cfg, ranks)

    # --- data ------------------------------------------------------------------------------------
    data = build_data(cfg, device, ranks)
    data.check_batch_size(cfg.train.batch_size)

    # --- schedule, model (+ DDP, compile), EMA ------------------------------------------------------
    schedule = build(cfg.schedule)
    denoiser = build_denoiser(cfg, device)
    posterior = DiscretePosterior(schedule.timestep_table()).to(device) if denoiser.learn_sigma else None
    ema = EMA(denoiser, cfg.ema.decay, cfg.ema.warmup, cfg.ema.halflife_kimg, cfg.ema.rampup_ratio, cfg.train.batch_size)
    model: nn.Module = denoiser
    if ranks.enabled:  # gradients averaged over ranks; DDP also broadcasts rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(denoiser, device_ids=[device] if device.type == "cuda" else None)
        seed_everything(cfg.seed + ranks.rank)            # data and noise: a different stream per rank
    if cfg.train.compile:
        model = torch.compile(model)

    # --- strategy: one state on all ranks ---------------------------------------------------------
    comm = communication(ranks)
    strategy = build(cfg.weighting, _keep_meta=("name", "citation"))
    strategy.bind(schedule, cfg.model.prediction, cfg.model.sigma_data, comm).to(device)
    if schedule.timesteps is not None:   # the step's λ tables, made before any compiled or captured step
        for dtype in (torch.float32,) if device.type == "mps" else (torch.float32, torch.float64):
            schedule.timestep_table(device, dtype)
    comm.broadcast_module_(strategy)

    # --- optimizer -------------------------------------------------------------------------------
    optimizer = build_optimizer(cfg.optimizer, denoiser, device)   # the module: parameter names decide decay groups
    augment = AugmentPipe(**cfg.augment) if cfg.augment.p > 0 else None
    return Components(
        device=device, autocast_dtype=autocast_dtype, data=data, augment=augment,
        local_batch_size=cfg.train.batch_size // ranks.world_size, num_classes=data.num_classes,
        label_dropout=float(cfg.train.label_dropout), schedule=schedule, denoiser=denoiser,
        posterior=posterior,        parameters=list(denoiser.parameters()),
        model=model, ema=ema, strategy=strategy, comm=comm, optimizer=optimizer,
        lr_schedule=build_lr_schedule(cfg.optimizer, optimizer, cfg.train.steps, cfg.train.batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        grad_clip=cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"),
        channels_last=bool(cfg.train.channels_last),
    )
