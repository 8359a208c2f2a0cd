"""Exponential moving average of the weights, updated with one fused `_foreach` call per step."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # starts synced with the model
        self.num_updates = 0

    def current_decay(self) -> float:
        """min(decay, (1 + n)/(10 + n)): averages over the few steps taken so far early in training."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, good: torch.Tensor | None = None) -> None:
        """One EMA step towards `model`; with `good` (a 0-d bool tensor) a skipped training step moves nothing."""
        rate = torch.as_tensor(1.0 - self.current_decay(), device=next(model.parameters()).device)
        if good is not None:
            rate = rate * good
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, rate)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
