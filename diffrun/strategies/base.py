"""One interface for every loss-weighting and timestep-sampling method.

A strategy answers two questions per batch (NVlabs/edm `training/loss.py` style):
  1. which noise levels to train on: `sample(x0)` → a `NoiseDraw` (log-SNR λ per sample, plus the
     importance correction when the proposal differs from the density the objective is defined by);
  2. how much each sample counts: `loss_weights(draw, loss)` → per-sample weights in the
     space of the model's prediction target. The weight formula `weight(λ)` is written once, in the
     space the paper uses (`space`), and converted in log space by `weight_in` (r_src / r_dst, see
     `models.parameterization.convert_log_weight`).
After the optimizer step an adaptive strategy (`observes = True`) is told the unweighted per-sample
losses of the global batch (`observe`) and whether the step was applied (`good`: a skipped non-finite
step must not reach its state). State lives in buffers (saved in checkpoints, moved with `.to`).
Under DDP a strategy talks to the other ranks only through the `Communication` handed to `bind`.

Per-step work must stay on the device: no `.item()`, no host-side branching on tensor values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.models.parameterization import WEIGHT_SPACES, convert_log_weight
from diffrun.schedules import NoiseSchedule


def uniform_t_log_density(schedule: NoiseSchedule, logsnr: Tensor, h: float = 1e-3) -> Tensor:
    """log |dt/dλ|: the log-SNR density of t ~ U[0, 1] on `schedule` (central difference of t(λ), float64).

    On a discrete schedule (`schedule.timesteps = T`, k ~ U{1..T}) the draws are point masses 1/T at the table's λ_k;
    the density is then their histogram: mass 1/T spread evenly over the cell around each λ_k (cells split at the
    midpoints between neighbours, the outer cells mirrored), i.e. p(λ) = 1/(T·width_k), 0 outside the cells. It is
    finite at every λ the strategy can draw, and a density-corrected weight w/p turns Σ_k (1/T)·w/p into the
    Riemann sum Σ_k w(λ_k)·width_k of the λ-integral.
    """
    dtype = torch.float32 if logsnr.device.type == "mps" else torch.float64
    lam = logsnr.to(dtype)
    if schedule.timesteps is not None:
        return _grid_log_density(schedule.timestep_table(lam.device, dtype), lam).to(logsnr.dtype)
    dt = schedule.t_of_logsnr(lam - h) - schedule.t_of_logsnr(lam + h)
    return torch.log(dt.clamp(min=0.0) / (2 * h)).to(logsnr.dtype)


class Communication(Protocol):
    """Collectives over the data-parallel ranks (diffrun.distributed.ProcessGroupCommunication);
    `SingleProcess` on one process."""

    world_size: int

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor: ...
    def summed(self, tensor: Tensor) -> Tensor: ...
    def all_gather_cat(self, *tensors: Tensor | None) -> tuple[Tensor | None, ...]: ...
    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None: ...


class SingleProcess:
    """The `Communication` of a run on one process: every collective is the identity."""

    world_size = 1

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        return tensor

    def summed(self, tensor: Tensor) -> Tensor:
        return tensor.clone()

    def all_gather_cat(self, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
        return tensors

    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        pass


def _grid_log_density(table: Tensor, lam: Tensor) -> Tensor:
    """log of the histogram density of T equally likely λ values (`table`, descending) at `lam`."""
    ascending = table.flip(0)
    mids = 0.5 * (ascending[1:] + ascending[:-1])
    edges = torch.cat([(2 * ascending[:1] - mids[:1]), mids, (2 * ascending[-1:] - mids[-1:])])
    cell = (torch.searchsorted(edges, lam.contiguous()) - 1).clamp(0, table.numel() - 1)
    log_p = -torch.log(table.numel() * (edges[1:] - edges[:-1]))[cell]
    inside = (lam >= edges[0]) & (lam <= edges[-1])
    return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))


def grid_timesteps(schedule: NoiseSchedule, requested: int | None, key: str = "weighting.num_timesteps") -> int:
    """T of a strategy defined on a T-step grid: `schedule.timesteps` when set (a different explicit T is
    refused), else the requested T, else DDPM's 1000."""
    if schedule.timesteps is None:
        return 1000 if requested is None else requested
    if requested is not None and requested != schedule.timesteps:
        raise ConfigError(f"{key}={requested} differs from schedule.timesteps={schedule.timesteps}: the run trains "
                          f"on one grid; set {key}=null (take T from the schedule) or {key}={schedule.timesteps}")
    return schedule.timesteps


@dataclass
class NoiseDraw:
    """The noise levels drawn for one batch."""

    logsnr: Tensor                    # (B,) λ per sample, float32
    proposal_weight: Tensor           # (B,) p_objective / p_proposal; 1 when sampling is not corrected
    t: Tensor | None = None           # (B,) continuous time, when the draw went through the schedule
    index: Tensor | None = None       # (B,) integer timestep, for discrete-time methods


class Strategy(nn.Module):
    """Default behaviour: t ~ U[0, 1], λ = schedule.logsnr(t), weight 1 in the target's own space; on a
    discrete schedule (`schedule.timesteps = T`) k ~ U{1..T}, λ = schedule.discrete_logsnr(T)[k − 1]."""

    name = "uniform"
    space = "target"  # "target" means: the weight applies to whatever the model predicts
    observes = False  # True: `observe` learns from the losses (the trainer gathers them every step)
    supports_timesteps = True  # False: draws λ from a continuous density, refuses schedule.timesteps

    def __init__(self, name: str | None = None, citation: str | None = None):
        super().__init__()
        if name is not None:
            self.name = name
        self.citation = citation
        self.schedule: NoiseSchedule | None = None
        self.sigma_data = 0.5
        self.comm: Communication = SingleProcess()

    # --- wiring -------------------------------------------------------------------------------
    def bind(self, schedule: NoiseSchedule, prediction: str, sigma_data: float = 0.5,
             comm: Communication | None = None) -> "Strategy":
        """Called once by the trainer with the run's schedule, prediction target and ranks."""
        if self.space not in ("target", *WEIGHT_SPACES):
            raise ConfigError(f"strategy {self.name}: unknown weight space {self.space!r}")
        if schedule.timesteps is not None and not self.supports_timesteps:
            raise ConfigError(f"weighting={self.name} draws λ from a continuous density; schedule.timesteps="
                              f"{schedule.timesteps} is not supported with it (use schedule.timesteps=null)")
        self.schedule, self.prediction, self.sigma_data = schedule, prediction, sigma_data
        self.comm = comm or SingleProcess()
        return self

    # --- 1. sampling --------------------------------------------------------------------------
    def sample(self, x0: Tensor) -> NoiseDraw:
        if self.schedule.timesteps is not None:
            T = self.schedule.timesteps
            index = torch.randint(T, (x0.shape[0],), device=x0.device)  # k − 1, k ~ U{1..T} (Ho et al. 2020, Alg. 1)
            logsnr = self.schedule.timestep_table(x0.device, torch.float32)[index]
            return NoiseDraw(logsnr=logsnr, proposal_weight=torch.ones_like(logsnr),
                             t=(index + 1).float() / T, index=index)
        t = torch.rand(x0.shape[0], device=x0.device)
        logsnr = self.schedule.logsnr(t)
        return NoiseDraw(logsnr=logsnr.float(), proposal_weight=torch.ones_like(t), t=t)

    # --- 2. weighting -------------------------------------------------------------------------
    def weight(self, logsnr: Tensor) -> Tensor:
        """w(λ) in `self.space`. Constant 1 by default."""
        return torch.ones_like(logsnr)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """log w(λ) in `self.space`. Override where w itself overflows (e.g. SNR = e^λ at large λ)."""
        return torch.log(self.weight(logsnr))

    def weight_in(self, space: str, logsnr: Tensor) -> Tensor:
        """w(λ) re-expressed for a loss in `space`: w_dst = w_src · r_src / r_dst, computed in log space
        so that it stays finite wherever the converted formula is (e.g. SNR on a v-loss at λ = 100)."""
        src = self.prediction if self.space == "target" else self.space
        # |λ| ≤ 1e4 stands for ±∞: e^{±1e4} over/underflows, so each formula lands on its limit, and
        # Min-SNR on ε at SNR = 0 gives min(SNR, γ)/SNR → 1 (Hang et al.'s terminal-SNR guard, PR #4).
        logsnr = logsnr.clamp(-1e4, 1e4)
        return convert_log_weight(self.log_weight(logsnr), logsnr, src, space, self.sigma_data).exp()

    def loss_weights(self, draw: NoiseDraw, loss: Tensor) -> Tensor:
        """Per-sample weight on the target-space loss, including the proposal correction."""
        return self.weight_in(self.prediction, draw.logsnr) * draw.proposal_weight

    def log_density(self, logsnr: Tensor) -> Tensor:
        """log p(λ) of the density the *objective* is defined under (for importance-corrected samplers
        that is not the proposal). Default: t ~ U[0, 1] pushed through the schedule."""
        return uniform_t_log_density(self.schedule, logsnr)

    # --- 3. feedback --------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, draw: NoiseDraw, loss: Tensor, good: Tensor) -> None:
        """Told the unweighted per-sample losses of the global batch just trained on, and `good` (a 0-d bool
        tensor on the device): False when the step was skipped as non-finite, and then the state must not
        change. Only called when `observes` is True."""

    def on_before_update(self, denoiser: nn.Module, x0: Tensor, step: int) -> None:
        """Called just before the optimizer step (the model still has θ_k). No-op by default."""

    def on_after_update(self, denoiser: nn.Module, x0: Tensor, step: int, good: Tensor) -> None:
        """Called just after the optimizer step (the model now has θ_{k+1}, or still θ_k if `good` is
        False). No-op by default."""

    def describe(self) -> str:
        return f"{self.name} ({self.citation})" if self.citation else self.name
