"""Optimizer and learning-rate schedule from the `optimizer` config group (torch.optim.lr_scheduler)."""
from __future__ import annotations

import inspect
import logging
import math

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LinearLR, SequentialLR

from diffrun.building import build
from diffrun.checks import NON_NEGATIVE, POSITIVE, Interval, check_number, resolved, show
from diffrun.errors import ConfigError

log = logging.getLogger(__name__)


def decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies to `param` (called `name` in its owner `module`). Exempt are:
    1. vectors and scalars (ndim ≤ 1): biases, norm gains and shifts, BEiT's q/v biases;
    2. embedding tables (nn.Embedding): class-label tables with their NULL row, noise-level tables;
    3. parameters the owner lists in `no_weight_decay_names` (e.g. a learned positional table `pos_embed`).
    Everything else — linear and convolution weights, including the MLPs after fixed sinusoidal features —
    decays. The same rule as timm's `param_groups_weight_decay` plus embedding tables."""
    if param.ndim <= 1 or isinstance(module, nn.Embedding):
        return False
    return name not in getattr(module, "no_weight_decay_names", ())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{decayed params, weight_decay}, {exempt params, weight_decay 0}] by `decays`, each with its names."""
    decay, exempt = {"params": [], "names": [], "weight_decay": weight_decay}, {"params": [], "names": [], "weight_decay": 0.0}
    seen: set[int] = set()  # a tied parameter goes in one group, under its first name
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                group = decay if decays(module, name, param) else exempt
                group["params"].append(param)
                group["names"].append(f"{module_name}.{name}" if module_name else name)
    return [group for group in (decay, exempt) if group["params"]]


def _weight_decay(factory, target) -> float:
    """The weight decay the optimizer will use: the config's, else the optimizer's own default (AdamW: 0.01)."""
    keywords = getattr(factory, "keywords", {})
    if "weight_decay" in keywords:
        return float(keywords["weight_decay"])
    default = inspect.signature(target).parameters.get("weight_decay")
    return float(default.default) if default is not None and isinstance(default.default, (int, float)) else 0.0


def build_optimizer(cfg: DictConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels where torch has them (lets NaN steps be skipped on the device).

    `params` is the model (an nn.Module) or its parameters. With `optimizer.no_decay_norms_biases_embeddings:
    true` and a weight decay > 0 the parameters are split into two groups by `decays` (this needs the
    model, for the names); otherwise one group, exactly as before. Off by default: Min-SNR's official
    trainer (guided_diffusion/train_util.py) applies AdamW's decay of 0.03 to every parameter."""
    factory = build(cfg.optim)
    target = factory.func if hasattr(factory, "func") else factory
    kwargs = {}
    if "fused" in inspect.signature(target).parameters and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    exempt_some = cfg.get("no_decay_norms_biases_embeddings", False)
    if not isinstance(exempt_some, bool):
        raise ConfigError(f"optimizer.no_decay_norms_biases_embeddings={exempt_some!r}: expected true or false")
    weight_decay = _weight_decay(factory, target)
    if weight_decay < 0:
        raise ConfigError(f"optimizer.optim.weight_decay={weight_decay}: must be >= 0")
    if exempt_some and weight_decay > 0:
        if not isinstance(params, nn.Module):
            raise ConfigError("optimizer.no_decay_norms_biases_embeddings=true needs parameter names: build_optimizer "
                              "must be given the model (an nn.Module), not its parameters()")
        groups = parameter_groups(params, weight_decay)
        return factory([{k: v for k, v in group.items() if k != "names"} for group in groups], **kwargs)
    return factory(params.parameters() if isinstance(params, nn.Module) else params, **kwargs)


def warmup_steps(requested: int, total_steps: int) -> int:
    """The steps of the linear warm-up: as requested, unless that is not shorter than the run (a quick
    `train.steps=60` with a preset's 100): the learning rate would never reach its peak, so it warms up over a
    tenth of the run instead, and the log says so."""
    if 0 < total_steps <= requested:
        log.info("optimizer.warmup_steps=%d is not shorter than train.steps=%d: the learning rate warms up over %d "
                 "steps (a tenth of the run) instead; set optimizer.warmup_steps to choose another",
                 requested, total_steps, total_steps // 10)
        return total_steps // 10
    return requested


def build_lr_schedule(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int, batch_size: int | None = None):
    """Linear warm-up followed by constant or cosine decay. The warm-up is counted in steps (`warmup_steps`, DDPM:
    5k steps) or in images (`warmup_kimg`, EDM: lr · min(images seen / (warmup_kimg·1000), 1), the images seen before
    the step, so EDM's first step has lr 0; NVlabs/edm `training/training_loop.py`). EDM's ramp may outlast a short
    run, as in EDM's own code; a step warm-up may not."""
    warmup = warmup_steps(int(cfg.get("warmup_steps", 0) or 0), total_steps)
    warmup_images = float(cfg.get("warmup_kimg", 0) or 0) * 1000
    decay = cfg.get("decay", "constant")
    if decay not in ("constant", "cosine"):
        raise ConfigError(f"optimizer.decay={decay!r}: allowed constant, cosine")
    if warmup_images > 0:
        if warmup > 0:
            raise ConfigError(f"optimizer.warmup_steps={warmup} and optimizer.warmup_kimg={cfg.warmup_kimg}: give one "
                              f"warm-up (the other 0)")
        if batch_size is None:
            raise ConfigError("optimizer.warmup_kimg needs the global batch size (train.batch_size) to count images")
        return LambdaLR(optimizer, _image_ramp(warmup_images, batch_size, decay, total_steps,
                                               float(cfg.get("min_lr_ratio", 0.0) or 0.0)))
    if decay == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        base_lr = optimizer.param_groups[0]["lr"]
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=base_lr * cfg.get("min_lr_ratio", 0.0))
    if warmup <= 0:
        return after
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after], milestones=[warmup])


def _image_ramp(warmup_images: float, batch_size: int, decay: str, total_steps: int, min_ratio: float):
    """The lr factor of step n (0-based): min(n·B / warmup_images, 1), times a cosine from the end of the ramp to
    the end of the run when `decay` is cosine. A plain function: LambdaLR then keeps only the step in its state."""
    ramp_steps = math.ceil(warmup_images / batch_size)

    def factor(n: int) -> float:
        ramp = min(n * batch_size / warmup_images, 1.0)
        if decay == "constant" or n <= ramp_steps:
            return ramp
        progress = min((n - ramp_steps) / max(1, total_steps - ramp_steps), 1.0)
        return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def check_settings(node: DictConfig) -> None:
    """The optimizer option's own values (torch checks the rest when the optimizer is built)."""
    optim = node.get("optim")
    if not isinstance(optim, DictConfig) or "_target_" not in optim:
        raise ConfigError(f"optimizer.optim={show(resolved(optim))}: allowed a node with _target_ "
                          f"(e.g. torch.optim.AdamW)")
    check_number("optimizer.optim.lr", optim.get("lr", 1e-3), POSITIVE)
    check_number("optimizer.optim.eps", optim.get("eps"), NON_NEGATIVE)
    check_number("optimizer.optim.weight_decay", optim.get("weight_decay"), NON_NEGATIVE)
    betas = resolved(optim.get("betas"))
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != 2:
            raise ConfigError(f"optimizer.optim.betas={show(betas)}: allowed two numbers in [0, 1), e.g. [0.9, 0.999]")
        for i, beta in enumerate(betas):
            check_number(f"optimizer.optim.betas[{i}]", beta, Interval(0, 1, high_open=True))
    warmup = node.get("warmup_steps")
    warmup_kimg = node.get("warmup_kimg")
    if (warmup_kimg or 0) > 0 and (warmup or 0) > 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} and optimizer.warmup_kimg={warmup_kimg}: give one warm-up, "
                          f"in steps or in images (set the other to 0)")
