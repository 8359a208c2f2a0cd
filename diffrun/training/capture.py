"""Whole-step capture (`train.capture=compile`): the training step compiled as one function.

Eager, a step of a small network is bound by the host: a hundred operators outside the network alone, each
a kernel launch on a GPU (`scripts/bench_train.py --overhead`). With `train.capture=compile` the whole step —
noise-level sampling, forward, loss and weights, backward, gradient clipping, the optimizer, the EMA, the
strategy's feedback and the bookkeeping — is traced by torch.compile, and on CUDA replayed as CUDA graphs
(mode="reduce-overhead"): a few graph launches a step, with the fused optimizer and `zero_grad` between them.

What is compiled is `diffrun.training.step.train_step` itself, on a view of the components in which the host
work stays outside the graph:

  * the optimizer steps eagerly between two graphs (`_EagerOptimizer`): a fused Adam(W) is one kernel already,
    torch.compile does not trace fused optimizers, and so the learning rate stays a host float that the
    schedule, stepped on the host after each call, sets;
  * the EMA decay is computed on the device from a device count of updates (`DeviceDecayEMA`);
  * the step number is a device tensor advanced inside the graph (the host's count is copied in only when the
    two differ: a resume).

With inductor the random draws (t, ε) come from inductor's own generator, seeded from torch's: a captured run is
another random sample than the eager run of the same seed. `torch._inductor.config.fallback_random = True`
draws through ATen and reproduces the eager run to rounding (docs/performance.md).

Refused with a ConfigError (`refusal`): a strategy that works on the host around the update (adaptive_timestep:
KL probes, sklearn's F-test), precision=fp16 (the GradScaler reads found_inf on the host), an optimizer without
a fused kernel (skipping a non-finite step would read `good` on the host), DDP, and train.compile=true (the
captured step compiles the network already).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.strategies import Strategy
from diffrun.training.ema import EMA, lerp_on_device_
from diffrun.training.setup import Components
from diffrun.training.step import found_inf, train_step


def host_hooks(strategy: Strategy) -> bool:
    """The strategy works on the host around the optimizer update (`on_before_update` / `on_after_update`)."""
    cls = type(strategy)
    return cls.on_before_update is not Strategy.on_before_update or cls.on_after_update is not Strategy.on_after_update


def refusal(strategy: Strategy, fp16: bool, compiled_network: bool, world_size: int,
            fused_optimizer: bool, augment: bool = False) -> str | None:
    """Why `train.capture=compile` cannot capture this run's step (the ConfigError's text), or None."""
    why = "train.capture=compile"
    if augment:
        return (f"{why} with augment.p > 0: EDM's augmentation draws its parameters on the host (EDM's random "
                f"order); use train.capture=none")
    if host_hooks(strategy):
        return (f"{why} cannot capture weighting={strategy.name}: it works on the host around each update "
                f"(on_before_update/on_after_update); allowed with it: train.capture=none")
    if fp16:
        return f"{why} with precision=fp16: the GradScaler reads found_inf on the host every step; use precision=bf16"
    if compiled_network:
        return f"{why} compiles the network as part of the step; set train.compile=false"
    if world_size > 1:
        return f"{why} runs on one process; with {world_size} ranks (DDP) use train.capture=none"
    if not fused_optimizer:
        return (f"{why} needs an optimizer with a fused kernel (it skips non-finite steps on the device); "
                f"use torch.optim.Adam or AdamW, or train.capture=none")
    return None


class DeviceDecayEMA:
    """`EMA.update` inside the captured step: the decay (EMA.decay_at) from a device count n of
    updates (a host float would be a constant of the graph), the move toward the model kept on the device."""

    def __init__(self, ema: EMA, device: torch.device):
        self.ema = ema
        self.updates = torch.zeros((), dtype=torch.float64, device=device)
        self.synced = None                     # the host count `updates` was last set to

    def sync(self) -> None:
        """Host side, before a captured call: copy the host count in if it moved (a resume)."""
        if self.synced != self.ema.num_updates:
            self.updates.fill_(self.ema.num_updates)
            self.synced = self.ema.num_updates

    def advanced(self) -> None:
        """Host side, after a captured call: the host count follows the device one."""
        self.ema.num_updates += 1
        self.synced = self.ema.num_updates

    def update(self, model: nn.Module, good: Tensor) -> None:
        n, ema = self.updates, self.ema
        decay = torch.as_tensor(ema.decay_at(n), dtype=n.dtype, device=n.device)
        ema_params, params, ema_buffers, buffers = ema.tensors(model)
        with torch.no_grad():
            lerp_on_device_(ema_params, params, (1 - decay).float() * good)
            if buffers:
                torch._foreach_copy_(ema_buffers, buffers)
        n.add_(1)


class _EagerOptimizer:
    """The optimizer as the captured step sees it: `step` and `zero_grad` run eagerly between graphs (not traced,
    so no graph depends on the learning rate); `found_inf` is the optimizer's own flag (step.found_inf)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.defaults = optimizer, optimizer.defaults
        self.found_inf = found_inf(optimizer)

    @torch.compiler.disable
    def step(self) -> None:
        self.optimizer.step()

    @torch.compiler.disable
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _StepsOnTheHost:
    """The learning-rate schedule inside the captured step: it steps on the host, after the call."""

    def step(self) -> None:
        pass


class _NoScaler:
    """The disabled GradScaler of a captured step (fp16 is refused), in code torch.compile traces through
    (it does not trace torch.amp's: every call would split the graph)."""

    def scale(self, outputs: Tensor) -> Tensor:
        return outputs

    def unscale_(self, optimizer) -> None:
        pass

    def is_enabled(self) -> bool:
        return False


def _step_and_advance(c: Components, x0: Tensor, step: Tensor, counters, stats, labels) -> None:
    train_step(c, x0, step, counters, stats, labels)
    step.add_(1)


class CapturedStep:
    """Called like `train_step(parts, x0, step, counters, stats, labels)`. `backend`/`mode` go to torch.compile; by
    default the inductor backend, with CUDA graphs (mode="reduce-overhead") on CUDA."""

    def __init__(self, parts: Components, backend: str | None = None, mode: str | None = None):
        self.device = parts.device
        if mode is None and backend is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        options = {"mode": mode} if backend is None else {"backend": backend, "mode": mode}
        self._compiled = torch.compile(_step_and_advance, **options)
        self._step = torch.zeros((), dtype=torch.long, device=self.device)
        self._next_step: int | None = None
        self._ema = DeviceDecayEMA(parts.ema, self.device)
        self._source: tuple | None = None      # the components the view was made from
        self._view: Components | None = None
        self._bookkeeping: tuple | None = None  # the counters and statistics marked static

    @staticmethod
    def _check(c: Components) -> None:
        reason = refusal(c.strategy, fp16=c.scaler.is_enabled(), compiled_network=hasattr(c.model, "_orig_mod"),
                         world_size=c.comm.world_size, fused_optimizer=bool(c.optimizer.defaults.get("fused")),
                         augment=c.augment is not None)
        if reason is None and c.model is not c.denoiser:
            reason = (f"train.capture=compile trains the bare denoiser, not a {type(c.model).__name__}; "
                      f"use train.capture=none")
        if reason is not None:
            raise ConfigError(reason)

    def _view_of(self, c: Components) -> Components:
        """`c` with the host work moved out; made again when a component is replaced (a strategy swapped in)."""
        source = tuple(getattr(c, f.name) for f in dataclasses.fields(c))
        if self._source is None or any(a is not b for a, b in zip(source, self._source)):
            self._check(c)
            if c.ema is not self._ema.ema:
                self._ema = DeviceDecayEMA(c.ema, self.device)
            self._view = dataclasses.replace(c, ema=self._ema, optimizer=_EagerOptimizer(c.optimizer),
                                             lr_schedule=_StepsOnTheHost(), scaler=_NoScaler())
            self._source = source
            self._mark_static(c)
        return self._view

    def _mark_static(self, c: Components) -> None:
        """Tensors the graph mutates keep their addresses: CUDA graphs may then write them in place."""
        ema_params, _, ema_buffers, _ = c.ema.tensors(c.denoiser)
        for tensor in (self._step, self._ema.updates, found_inf(c.optimizer), *c.parameters,
                       *ema_params, *ema_buffers, *c.strategy.buffers()):
            torch._dynamo.mark_static_address(tensor)

    def __call__(self, c: Components, x0: Tensor, step: int, counters, stats, labels: Tensor | None = None) -> None:
        view = self._view_of(c)
        if step != self._next_step:
            self._step.fill_(step)
        self._ema.sync()
        if self._bookkeeping is None or self._bookkeeping[0] is not counters or self._bookkeeping[1] is not stats:
            for tensor in (counters.sums, counters.counts, counters.first_bad, stats.sums):
                torch._dynamo.mark_static_address(tensor)
            self._bookkeeping = (counters, stats)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        self._compiled(view, x0, self._step, counters, stats, labels)
        self._ema.advanced()
        self._next_step = step + 1
        c.lr_schedule.step()


def step_function(capture: str, parts: Components):
    """What the Trainer calls every step: `train_step`, or with capture=compile a `CapturedStep`."""
    return CapturedStep(parts) if capture == "compile" else train_step
