"""Exponential moving average of the weights, updated with one fused `_foreach` call per step.

The parameter lists are made once per model: walking the module tree costs ~0.2 ms a step on a small U-Net,
and a module keeps its Parameter objects through `.to()` and `load_state_dict`. Buffers may be replaced by
`.to()`, so they are found again by owner and name at every step (a dictionary lookup each).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def lerp_on_device_(ema: list[Tensor], targets: list[Tensor], weight: Tensor) -> None:
    """ema ← ema + weight·(target − ema) for every pair, with `weight` a 0-d tensor that stays on the device
    (`torch._foreach_lerp_` would read a tensor weight on the host: a sync on a GPU). Three fused
    multi-tensor calls; the rounding differs from lerp's by at most an ulp."""
    delta = torch._foreach_sub(targets, ema)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema, delta)


def _buffer_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
            for name, _ in module.named_buffers()]


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # starts synced with the model
        self.num_updates = 0
        self._tracked: tuple | None = None    # (model, its parameters, EMA parameters, buffer slots of both)

    def current_decay(self) -> float:
        """min(decay, (1 + n)/(10 + n)): averages over the few steps taken so far early in training."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

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
