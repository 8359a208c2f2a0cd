"""One interface for every loss-weighting and timestep-sampling method.

A strategy answers two questions per batch (NVlabs/edm `training/loss.py` style):
  1. which noise levels to train on: `sample(x0)` → a `NoiseDraw` (log-SNR λ per sample, plus the
     importance correction when the proposal differs from the density the objective is defined by);
  2. how much each sample counts: `loss_weights(draw, loss, target)` → per-sample weights in the
     space of the model's prediction target. The weight formula `weight(λ)` is written once, in the
     space the paper uses (`space`), and converted (see `models.parameterization.convert_weight`).
After the optimizer step it is told the unweighted per-sample losses (`observe`), so adaptive
methods can update their state. State lives in buffers (saved in checkpoints, moved with `.to`).

Per-step work must stay on the device: no `.item()`, no host-side branching on tensor values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.models.parameterization import WEIGHT_SPACES, convert_weight
from diffrun.schedules import NoiseSchedule


@dataclass
class NoiseDraw:
    """The noise levels drawn for one batch."""

    logsnr: Tensor                    # (B,) λ per sample, float32
    proposal_weight: Tensor           # (B,) p_objective / p_proposal; 1 when sampling is not corrected
    t: Tensor | None = None           # (B,) continuous time, when the draw went through the schedule
    index: Tensor | None = None       # (B,) integer timestep, for discrete-time methods
    log_prob: Tensor | None = None    # (B,) log-density of the draw (policy-gradient methods)


class Strategy(nn.Module):
    """Default behaviour: t ~ U[0, 1], λ = schedule.logsnr(t), weight 1 in the target's own space."""

    name = "uniform"
    space = "target"  # "target" means: the weight applies to whatever the model predicts
    unbiased = True   # True when the sampling is importance-corrected (objective unchanged)

    def __init__(self, name: str | None = None, citation: str | None = None):
        super().__init__()
        if name is not None:
            self.name = name
        self.citation = citation
        self.schedule: NoiseSchedule | None = None
        self.sigma_data = 0.5

    # --- wiring -------------------------------------------------------------------------------
    def bind(self, schedule: NoiseSchedule, prediction: str, sigma_data: float = 0.5) -> "Strategy":
        """Called once by the trainer with the run's schedule and prediction target."""
        if self.space not in ("target", *WEIGHT_SPACES):
            raise ConfigError(f"strategy {self.name}: unknown weight space {self.space!r}")
        self.schedule, self.prediction, self.sigma_data = schedule, prediction, sigma_data
        return self

    # --- 1. sampling --------------------------------------------------------------------------
    def sample(self, x0: Tensor) -> NoiseDraw:
        t = torch.rand(x0.shape[0], device=x0.device)
        logsnr = self.schedule.logsnr(t)
        return NoiseDraw(logsnr=logsnr.float(), proposal_weight=torch.ones_like(t), t=t)

    # --- 2. weighting -------------------------------------------------------------------------
    def weight(self, logsnr: Tensor) -> Tensor:
        """w(λ) in `self.space`. Constant 1 by default."""
        return torch.ones_like(logsnr)

    def loss_weights(self, draw: NoiseDraw, loss: Tensor) -> Tensor:
        """Per-sample weight on the target-space loss, including the proposal correction."""
        w = self.weight(draw.logsnr)
        if self.space != "target":
            w = convert_weight(w, draw.logsnr, self.space, self.prediction, self.sigma_data)
        return w * draw.proposal_weight

    # --- 3. feedback --------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, draw: NoiseDraw, loss: Tensor) -> None:
        """Told the unweighted per-sample losses of the batch just trained on. Stateless by default."""

    def on_before_update(self, denoiser: nn.Module, x0: Tensor, step: int) -> None:
        """Called just before the optimizer step (the model still has θ_k). No-op by default."""

    def on_after_update(self, denoiser: nn.Module, x0: Tensor, step: int) -> None:
        """Called just after the optimizer step (the model now has θ_{k+1}). No-op by default."""

    def extra_loss(self) -> Tensor | None:
        """An auxiliary loss to add (none by default)."""
        return None

    def describe(self) -> str:
        return f"{self.name} ({self.citation})" if self.citation else self.name
