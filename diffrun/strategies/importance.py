"""Loss-aware importance sampling of discrete timesteps (Nichol & Dhariwal, ICML 2021, arXiv:2102.09672, §3.3).

improved-diffusion `resample.py::LossSecondMomentResampler`: keep the last K = 10 losses of every
timestep; until every timestep has K, sample uniformly; then p_t ∝ √E[L_t²], mixed with a little
uniform mass, and weight each sample by 1/(T p_t), so the objective E_{t~U}[L_t] is unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw, Strategy, grid_timesteps
from diffrun.strategies.ops import ring_push, sample_categorical


class ImportanceSampling(Strategy):
    """p_t ∝ √E[L_t²] over the last `history` losses per timestep (unbiased: weight 1/(T p_t)).

    T (`num_timesteps`) is `schedule.timesteps` when the schedule is discrete, else the given T (1000 if null).
    Duplicate timesteps in one batch are all pushed, in batch order (a timestep drawn m > K times keeps
    only its last K). Under DDP `observe` gets the global batch (rank order), as improved-diffusion's
    all-gathering resampler does, so the history is one on all ranks.
    """

    name = "importance"
    observes = True

    def __init__(self, num_timesteps: int | None = None, history: int = 10, uniform_prob: float = 0.001, **kw):
        super().__init__(**kw)
        if (num_timesteps is not None and num_timesteps < 2) or history < 1:
            raise ConfigError(f"weighting.num_timesteps must be >= 2 (or null) and history >= 1, "
                              f"got {num_timesteps}, {history}")
        if not 0.0 < uniform_prob <= 1.0:
            raise ConfigError(f"weighting.uniform_prob must be in (0, 1] (keeps every p_t > 0), got {uniform_prob}")
        self.requested_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self._allocate(num_timesteps or 1000)

    def _allocate(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self.register_buffer("loss_history", torch.zeros(num_timesteps, self.history))
        self.register_buffer("filled", torch.zeros(num_timesteps, dtype=torch.long))

    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        T = grid_timesteps(schedule, self.requested_timesteps)
        if T != self.num_timesteps:  # T from schedule.timesteps
            self._allocate(T)
        table = schedule.discrete_logsnr(self.num_timesteps).float()
        self.register_buffer("logsnr_table", table.to(self.filled.device), persistent=False)
        return self

    def probabilities(self) -> Tensor:
        """p_t (T,), on the device; uniform until every timestep has `history` losses."""
        T = self.num_timesteps
        rms = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = rms / rms.sum().clamp(min=1e-30)
        p = p * (1 - self.uniform_prob) + self.uniform_prob / T
        warm = (self.filled >= self.history).all()
        return torch.where(warm, p, torch.full_like(p, 1.0 / T))

    def sample(self, x0: Tensor) -> NoiseDraw:
        p = self.probabilities()
        index = sample_categorical(p, x0.shape[0])
        logsnr = self.logsnr_table[index]
        return NoiseDraw(logsnr=logsnr, proposal_weight=(1.0 / (self.num_timesteps * p[index])).float(),
                         t=(index + 1).float() / self.num_timesteps, index=index)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)

    @torch.no_grad()
    def observe(self, draw: NoiseDraw, loss: Tensor, good: Tensor) -> None:
        history, filled = self.loss_history.clone(), self.filled.clone()
        ring_push(self.loss_history, self.filled, draw.index, loss.detach().nan_to_num(0.0))
        self.loss_history.copy_(torch.where(good, self.loss_history, history))  # a skipped step changes nothing
        self.filled.copy_(torch.where(good, self.filled, filled))
