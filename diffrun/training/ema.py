"""Exponential moving average of the weights, updated with one fused `_foreach` call per step.

Two ways to say how fast it forgets, as the papers do:

    per step (DDPM, Ho et al. 2020):   β_n = min(decay, (1 + n)/(10 + n))     (the ramp with `warmup`)
    half-life in images (EDM):          β_n = 0.5^(B / max(h_n, 1e-8)),   h_n = min(H, r · n · B)

n the updates so far (the images seen before this step are n · B), B the global batch, H = halflife_kimg · 1000
and r = rampup_ratio (Karras et al. 2022, arXiv:2206.00364; NVlabs/edm `training/training_loop.py`, where the first
update, with no images seen, copies the weights). The EMA is then ema ← β·ema + (1 − β)·θ.

The parameter lists are made once per model: walking the module tree costs ~0.2 ms a step on a small U-Net,
and a module keeps its Parameter objects through `.to()` and `load_state_dict`. Buffers may be replaced by
`.to()`, so they are found again by owner and name at every step (a dictionary lookup each).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError

LERP_CHUNK_ELEMENTS = 1 << 24   # the update's temporary: at most this many elements (64 MB in float32)


def lerp_on_device_(ema: list[Tensor], targets: list[Tensor], weight: Tensor,
                    chunk_elements: int = LERP_CHUNK_ELEMENTS) -> None:
    """ema ← ema + weight·(target − ema) for every pair, with `weight` a 0-d tensor that stays on the device
    (`torch._foreach_lerp_` would read a tensor weight on the host: a sync on a GPU). Three fused
    multi-tensor calls per group of tensors of at most `chunk_elements` elements (a tensor larger than that is a
    group of its own), so the temporary difference is bounded instead of model-sized (2.7 GB for DiT-XL/2);
    the rounding differs from lerp's by at most an ulp."""
    if not ema:
        return
    groups, start, size = [], 0, 0
    for i, tensor in enumerate(ema):
        if size and size + tensor.numel() > chunk_elements:
            groups.append((start, i))
            start, size = i, 0
        size += tensor.numel()
    groups.append((start, len(ema)))
    for lo, hi in groups:
        delta = torch._foreach_sub(targets[lo:hi], ema[lo:hi])
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(ema[lo:hi], delta)
        del delta   # freed before the next group's: one group's worth at a time


def _buffer_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
            for name, _ in module.named_buffers()]


def _capped(x: float | Tensor, cap: float) -> float | Tensor:
    """min(x, cap) of a host number, or of a device tensor without reading it back."""
    return torch.clamp(x, max=cap) if torch.is_tensor(x) else min(x, cap)


def check_settings(decay: float | None, warmup: bool, halflife_kimg: float | None, rampup_ratio: float | None) -> None:
    """A decay per step or a half-life in images, not both; each with its own ramp-up."""
    if (decay is None) == (halflife_kimg is None):
        raise ConfigError(f"ema.decay={decay} and ema.halflife_kimg={halflife_kimg}: give exactly one, a decay "
                          f"per step (DDPM: 0.9999) or a half-life in thousands of images (EDM: 500) with ema.decay=null")
    if halflife_kimg is not None and warmup:
        raise ConfigError(f"ema.warmup=true is the ramp of the per-step decay; with ema.halflife_kimg={halflife_kimg} "
                          f"set ema.warmup=false and ramp the half-life with ema.rampup_ratio (EDM: 0.05)")
    if rampup_ratio is not None and halflife_kimg is None:
        raise ConfigError(f"ema.rampup_ratio={rampup_ratio} ramps a half-life; it needs ema.halflife_kimg "
                          f"(or ema.rampup_ratio=null with ema.decay)")


class EMA:
    def __init__(self, model: nn.Module, decay: float | None = 0.999, warmup: bool = True,
                 halflife_kimg: float | None = None, rampup_ratio: float | None = None, batch_size: int | None = None):
        check_settings(decay, warmup, halflife_kimg, rampup_ratio)
        if halflife_kimg is not None and (batch_size is None or batch_size <= 0):
            raise ConfigError("ema.halflife_kimg needs the global batch size (train.batch_size) to count images")
        self.decay, self.warmup = decay, warmup
        self.halflife_images = None if halflife_kimg is None else halflife_kimg * 1000
        self.rampup_ratio, self.batch_size = rampup_ratio, batch_size
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # starts synced with the model
        self.num_updates = 0
        self._tracked: tuple | None = None    # (model, its parameters, EMA parameters, buffer slots of both)

    def decay_at(self, n: int | Tensor) -> float | Tensor:
        """β of update `n` (the module docstring's formulas), for a count on the host (an int: the eager step) or
        on the device (a tensor: the captured step, diffrun/training/capture.py, which must not read it back)."""
        if self.halflife_images is None:
            return _capped((1 + n) / (10 + n), self.decay) if self.warmup else self.decay
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = _capped(n * self.batch_size * self.rampup_ratio, halflife)
        return 0.5 ** (self.batch_size / (halflife.clamp(min=1e-8) if torch.is_tensor(halflife) else max(halflife, 1e-8)))

    def current_decay(self) -> float:
        """β of the next update."""
        return self.decay_at(self.num_updates)

    def tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(EMA parameters, `model`'s parameters, EMA buffers, `model`'s buffers), paired in order."""
        if self._tracked is None or self._tracked[0] is not model:
            self._tracked = (model, list(self.model.parameters()), list(model.parameters()),
                             _buffer_slots(self.model), _buffer_slots(model))
        _, ema_params, params, ema_slots, slots = self._tracked
        return (ema_params, params, [m._buffers[n] for m, n in ema_slots], [m._buffers[n] for m, n in slots])

    @torch.no_grad()
    def update(self, model: nn.Module, good: Tensor | None = None) -> None:
        """One EMA step towards `model`; with `good` (a 0-d bool tensor) a skipped training step moves nothing."""
        ema_params, params, ema_buffers, buffers = self.tensors(model)
        rate = 1.0 - self.current_decay()
        if good is None:
            torch._foreach_lerp_(ema_params, params, rate)
        elif good.device.type == "cpu":    # one kernel per tensor on a CPU anyway: lerp's own rounding, no host read
            torch._foreach_lerp_(ema_params, params, [good * rate] * len(params))
        else:                              # (a list of weights would cost a kernel launch per tensor on a GPU)
            lerp_on_device_(ema_params, params, good * rate)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
