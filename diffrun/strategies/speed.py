"""SpeeD: asymmetric timestep sampling with change-aware weighting (Wang, Zhou, Shi et al. 2024,
"A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training", arXiv:2405.17403;
official code NUS-HPC-AI-Lab/SpeeD `diffusion/speed`).

The process increment σ_t = √(1 − ᾱ_t) stops changing near pure noise. SpeeD calls the timesteps
where dσ/dt < ε the *convergence area* and samples them less (paper §4.1, asymmetric sampling):

    τ = first t with dσ_t/dt < ε  (+1, as the code),   ε = 1e-4
    P(t) = k / (T + τ(k − 1))  for t < τ,   1 / (T + τ(k − 1))  for t ≥ τ,   k = 5

The official code builds the same two-level P(t) with tanh(10⁶ (dσ_t/dt − ε)) + 1.5 (levels 2.5 and
0.5, ratio k = 5) and draws half of the batch from it; the other half are the draws' *duals*,
t' = τ − t below τ and t − τ above it. The loss is weighted by P2 (k = 1, γ = 1) in ε-space: the code's
stand-in for the paper's change-aware weighting (§4.2), which we follow. No importance correction:
SpeeD changes the objective on purpose.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw, Strategy, grid_timesteps, uniform_t_log_density
from diffrun.strategies.ops import sample_categorical
from diffrun.strategies.weights import p2_log_weight


def convergence_threshold(logsnr_table: Tensor, epsilon: float) -> int:
    """τ: one past the first timestep whose process increment dσ_t/dt (central differences over the
    T-step table, one-sided at the ends, as numpy.gradient) is below ε. T when there is none: then no
    timestep is in the convergence area and sampling stays uniform."""
    sigma = torch.sigmoid(-logsnr_table.double()).sqrt()
    increment = torch.gradient(sigma)[0]
    below = (increment < epsilon).nonzero()
    return int(below[0, 0]) + 1 if below.numel() else logsnr_table.numel()


class SpeeD(Strategy):
    """Two-level timestep density (k× more mass below τ), dual draws, P2 weight."""

    name = "speed"
    space = "eps"

    def __init__(self, num_timesteps: int | None = None, suppression: float = 5.0, epsilon: float = 1e-4,
                 dual_sampling: bool = True, p2_gamma: float = 1.0, p2_k: float = 1.0, **kw):
        super().__init__(**kw)
        if num_timesteps is not None and num_timesteps < 2:
            raise ConfigError(f"weighting.num_timesteps must be >= 2 or null (schedule.timesteps, else 1000), "
                              f"got {num_timesteps}")
        if not suppression >= 1.0:
            raise ConfigError(f"weighting.suppression must be >= 1 (SpeeD's k: how many times more often the "
                              f"timesteps before τ are drawn; 1 = uniform), got {suppression}")
        if not epsilon > 0:
            raise ConfigError(f"weighting.epsilon must be > 0 (SpeeD's threshold on dσ_t/dt), got {epsilon}")
        if p2_gamma < 0 or not p2_k > 0:
            raise ConfigError(f"weighting.p2_gamma must be >= 0 and p2_k > 0, got {p2_gamma}, {p2_k}")
        self.requested_timesteps, self.num_timesteps = num_timesteps, num_timesteps or 1000
        self.suppression, self.epsilon = float(suppression), float(epsilon)
        self.dual_sampling, self.p2_gamma, self.p2_k = bool(dual_sampling), float(p2_gamma), float(p2_k)
        self.tau = self.num_timesteps

    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        self.num_timesteps = grid_timesteps(schedule, self.requested_timesteps)
        table = schedule.discrete_logsnr(self.num_timesteps)
        self.tau = convergence_threshold(table, self.epsilon)
        T, tau, k = self.num_timesteps, self.tau, self.suppression
        index = torch.arange(T)
        probs = torch.where(index < tau, k, 1.0).double() / (T + tau * (k - 1))
        self.register_buffer("logsnr_table", table.float(), persistent=False)  # moved by the trainer's .to(device)
        self.register_buffer("probs", probs.float(), persistent=False)
        return self

    def dual(self, index: Tensor) -> Tensor:
        """t' = τ − t below τ, t − τ from τ on (the code's `dual_t`), kept inside [0, T − 1]."""
        return torch.where(index < self.tau, self.tau - index, index - self.tau).clamp(0, self.num_timesteps - 1)

    def sample(self, x0: Tensor) -> NoiseDraw:
        n = x0.shape[0]
        if self.dual_sampling:
            primary = sample_categorical(self.probs, n // 2 + 1)
            index = torch.cat([primary, self.dual(primary)])[:n]
        else:
            index = sample_categorical(self.probs, n)
        return NoiseDraw(logsnr=self.logsnr_table[index], proposal_weight=torch.ones(n, device=x0.device),
                         t=(index + 1).float() / self.num_timesteps, index=index)

    def marginal(self, batch_size: int | None = None) -> Tensor:
        """The probability of each timestep over a batch's draws (T,): P(t) without dual sampling; with it,
        the mix of P and its duals in the proportions a batch of `batch_size` has (n//2 + 1 primary)."""
        if not self.dual_sampling:
            return self.probs.double()
        duals = torch.zeros(self.num_timesteps, dtype=torch.float64, device=self.probs.device)
        duals.index_add_(0, self.dual(torch.arange(self.num_timesteps, device=self.probs.device)), self.probs.double())
        if batch_size is None:
            return 0.5 * (self.probs.double() + duals)
        primary = min(batch_size // 2 + 1, batch_size) / batch_size
        return primary * self.probs.double() + (1 - primary) * duals

    def log_density(self, logsnr: Tensor) -> Tensor:
        """λ-density of the (large-batch) marginal, continuous-t approximation: T·m_t per unit t, through
        the schedule."""
        t = self.schedule.t_of_logsnr(logsnr.double())
        index = (torch.ceil(t * self.num_timesteps) - 1).clamp(0, self.num_timesteps - 1).long()
        m = self.marginal().to(index.device)[index]
        return (torch.log(m * self.num_timesteps) + uniform_t_log_density(self.schedule, logsnr.double())).to(logsnr.dtype)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """P2 in ε-space, log 1/(k + SNR)^γ."""
        return p2_log_weight(logsnr, self.p2_gamma, self.p2_k)

    def describe(self) -> str:
        return f"{super().describe()}, τ = {self.tau} of {self.num_timesteps}"
