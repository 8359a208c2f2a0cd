"""Optimizer and learning-rate schedule from the `optimizer` config group (torch.optim.lr_scheduler)."""
from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

from diffrun.config import build
from diffrun.errors import ConfigError


def build_optimizer(cfg: DictConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels where torch has them (lets NaN steps be skipped on the device)."""
    factory = build(cfg.optim)
    target = factory.func if hasattr(factory, "func") else factory
    kwargs = {}
    if "fused" in inspect.signature(target).parameters and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    return factory(params, **kwargs)


def build_lr_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up (DDPM: 5k steps) followed by constant or cosine decay."""
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    decay = cfg.get("decay", "constant")
    if decay == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif decay == "cosine":
        base_lr = optimizer.param_groups[0]["lr"]
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=base_lr * cfg.get("min_lr_ratio", 0.0))
    else:
        raise ConfigError(f"optimizer.decay={decay!r}: allowed constant, cosine")
    if warmup <= 0:
        return after
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after], milestones=[warmup])
