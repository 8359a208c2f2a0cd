"""SpeeD: asymmetric timestep sampling with change-aware weighting (Wang, Zhou, Shi et al. 2024,
"A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training", arXiv:2405.17403;
official code NUS-HPC-AI-Lab/SpeeD `speed/diffusion/speed/__init__.py`).

The process increment σ_t = √(1 − ᾱ_t) stops changing near pure noise. SpeeD calls the timesteps where
dσ_t/dt < ε the *convergence area*, samples them less and weights the fast-changing ones more. Both variants
draw half the batch (n//2 + 1) from P(t) and fill the rest with the draws' *duals* about the pivot M (the first
t with dσ_t/dt < 10⁻⁴, +1: 642 of 1000 on DDPM's linear betas): t' = M − t below M, t − M from M on. Neither
is importance-corrected: SpeeD changes the objective on purpose.

`SpeeD` (`weighting=speed`): the class the official configs run, `Speed_IDDPM` with sampling and weighting "ours":

    P(t) ∝ k for t < τ, 1 for t ≥ τ                 τ = 700 (fixed), k = 5 (MetFaces, ablations; FFHQ: 2)
    w_t  = (1 − λ) + (2λ − 1) · (g_t − g_min)/(g_max − g_min) for t < τ, 1 for t ≥ τ,  g_t = ∂_t(1 − ᾱ_t), λ = 0.6

on the ε-MSE (np.gradient's central differences, one-sided at the ends; min and max over all T steps).

`SpeeDP2` (`weighting=speed_p2`): the README's and `Speed_Mask_IDDPM`'s formulas, diffrun's earlier `speed`:
P(t) ∝ tanh(10⁶(dσ_t/dt − ε)) + 1.5, i.e. levels 2.5 : 0.5 (k = 5) stepping down where dσ_t/dt falls below ε
(at M − 1), and the P2 weight 1/(1 + SNR).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffrun.errors import ConfigError
from diffrun.strategies.base import NoiseDraw, Strategy, grid_timesteps, uniform_t_log_density
from diffrun.strategies.ops import sample_categorical
from diffrun.strategies.weights import p2_log_weight


def process_increment(logsnr_table: Tensor) -> Tensor:
    """dσ_t/dt per grid step, σ_t = √(1 − ᾱ_t) = √sigmoid(−λ_t): central differences, one-sided at the ends
    (numpy.gradient, as the official code)."""
    return torch.gradient(torch.sigmoid(-logsnr_table.double()).sqrt())[0]


def convergence_threshold(logsnr_table: Tensor, epsilon: float) -> int:
    """M: one past the first timestep whose process increment dσ_t/dt is below ε. T when there is none: then no
    timestep is in the convergence area (the official `np.argmax` of an all-False mask would give M = 1)."""
    below = (process_increment(logsnr_table) < epsilon).nonzero()
    return int(below[0, 0]) + 1 if below.numel() else logsnr_table.numel()


class _TimestepLevels(Strategy):
    """Discrete t from a density `probs` on the run's T-step grid, half the batch dualled about the pivot M."""

    space = "eps"

    def __init__(self, num_timesteps: int | None = None, epsilon: float = 1e-4, dual_sampling: bool = True, **kw):
        super().__init__(**kw)
        if num_timesteps is not None and num_timesteps < 2:
            raise ConfigError(f"weighting.num_timesteps must be >= 2 or null (schedule.timesteps, else 1000), "
                              f"got {num_timesteps}")
        if not epsilon > 0:
            raise ConfigError(f"weighting.epsilon must be > 0 (SpeeD's threshold on dσ_t/dt), got {epsilon}")
        self.requested_timesteps, self.num_timesteps = num_timesteps, num_timesteps or 1000
        self.epsilon, self.dual_sampling = float(epsilon), bool(dual_sampling)
        self.pivot = self.num_timesteps

    def levels(self, table: Tensor) -> Tensor:
        """Unnormalised P(t) over the T grid steps (float64)."""
        raise NotImplementedError

    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        self.num_timesteps = grid_timesteps(schedule, self.requested_timesteps)
        table = schedule.discrete_logsnr(self.num_timesteps)
        self.pivot = convergence_threshold(table, self.epsilon)
        levels = self.levels(table)
        self.register_buffer("logsnr_table", table.float(), persistent=False)  # moved by the trainer's .to(device)
        self.register_buffer("probs", (levels / levels.sum()).float(), persistent=False)
        return self

    def dual(self, index: Tensor) -> Tensor:
        """t' = M − t below M, t − M from M on (the code's `dual_t`), kept inside [0, T − 1]."""
        return torch.where(index < self.pivot, self.pivot - index, index - self.pivot).clamp(0, self.num_timesteps - 1)

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

    def grid_index(self, logsnr: Tensor) -> Tensor:
        """The grid step whose λ is nearest to `logsnr` (exact for drawn values, which are table entries)."""
        ascending = self.logsnr_table.double().flip(0)
        lam = logsnr.double().clamp(ascending[0], ascending[-1]).contiguous()
        right = torch.searchsorted(ascending, lam).clamp(1, self.num_timesteps - 1)
        nearer_left = (lam - ascending[right - 1]) <= (ascending[right] - lam)
        return self.num_timesteps - 1 - torch.where(nearer_left, right - 1, right)

    def log_density(self, logsnr: Tensor) -> Tensor:
        """λ-density of the (large-batch) marginal, continuous-t approximation: T·m_t per unit t, through
        the schedule."""
        t = self.schedule.t_of_logsnr(logsnr.double())
        index = (torch.ceil(t * self.num_timesteps) - 1).clamp(0, self.num_timesteps - 1).long()
        m = self.marginal().to(index.device)[index]
        return (torch.log(m * self.num_timesteps) + uniform_t_log_density(self.schedule, logsnr.double())).to(logsnr.dtype)


class SpeeD(_TimestepLevels):
    """Official `Speed_IDDPM` (sampling and weighting "ours"): k× the mass before the fixed τ, duals about M,
    change-aware weight on the ε-MSE."""

    name = "speed"

    def __init__(self, num_timesteps: int | None = None, k: float = 5.0, tau: int = 700, lam: float = 0.6,
                 change_aware_weight: bool = True, epsilon: float = 1e-4, dual_sampling: bool = True, **kw):
        super().__init__(num_timesteps=num_timesteps, epsilon=epsilon, dual_sampling=dual_sampling, **kw)
        if not k >= 1:
            raise ConfigError(f"weighting.k must be >= 1 (how many times more often the steps before τ are drawn; "
                              f"1 = uniform), got {k}")
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ConfigError(f"weighting.tau must be an integer >= 1 (the step where the level and the weight "
                              f"change; official: 700 of 1000), got {tau!r}")
        if not 0 <= lam <= 1:
            raise ConfigError(f"weighting.lam must be in [0, 1] (the change-aware weight spans [1 − lam, lam] before "
                              f"τ; official: 0.6), got {lam}")
        self.k, self.tau, self.lam, self.change_aware_weight = float(k), tau, float(lam), bool(change_aware_weight)

    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        if self.tau > self.num_timesteps:
            raise ConfigError(f"weighting.tau={self.tau} exceeds the grid's T={self.num_timesteps} steps "
                              f"(official: τ = 700 of 1000); allowed 1..{self.num_timesteps}")
        weights = change_aware_weights(schedule.discrete_logsnr(self.num_timesteps), self.tau, self.lam)
        if not self.change_aware_weight:
            weights = torch.ones_like(weights)
        self.register_buffer("weight_table", weights.float(), persistent=False)
        return self

    def levels(self, table: Tensor) -> Tensor:
        index = torch.arange(table.numel())
        return torch.where(index < self.tau, self.k, 1.0).double()   # [k]·τ + [1]·(T − τ)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.log(self.weight_table[self.grid_index(logsnr)]).to(logsnr.dtype)

    def describe(self) -> str:
        return f"{super().describe()}, k = {self.k:g} before τ = {self.tau}, duals about M = {self.pivot} of {self.num_timesteps}"


def change_aware_weights(logsnr_table: Tensor, tau: int, lam: float) -> Tensor:
    """SpeeD's change-aware weight per grid step (official `Speed_IDDPM._weights("ours")`): g = ∂_t(1 − ᾱ_t) by
    central differences, min-max scaled to [1 − λ, λ] before τ (λ ≥ ½: the faster 1 − ᾱ changes, the larger),
    1 from τ on."""
    g = torch.gradient(torch.sigmoid(-logsnr_table.double()))[0]           # 1 − ᾱ_t = sigmoid(−λ_t)
    scaled = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min())
    return torch.where(torch.arange(g.numel()) < tau, scaled, torch.ones_like(scaled))


class SpeeDP2(_TimestepLevels):
    """The README's `SpeeDiffusion` / `Speed_Mask_IDDPM` formulas: two levels k apart with the step at M, P2 weight."""

    name = "speed_p2"

    def __init__(self, num_timesteps: int | None = None, suppression: float = 5.0, epsilon: float = 1e-4,
                 dual_sampling: bool = True, p2_gamma: float = 1.0, p2_k: float = 1.0, **kw):
        super().__init__(num_timesteps=num_timesteps, epsilon=epsilon, dual_sampling=dual_sampling, **kw)
        if not suppression >= 1.0:
            raise ConfigError(f"weighting.suppression must be >= 1 (SpeeD's k: how many times more often the "
                              f"timesteps before M are drawn; 1 = uniform), got {suppression}")
        if p2_gamma < 0 or not p2_k > 0:
            raise ConfigError(f"weighting.p2_gamma must be >= 0 and p2_k > 0, got {p2_gamma}, {p2_k}")
        self.suppression, self.p2_gamma, self.p2_k = float(suppression), float(p2_gamma), float(p2_k)

    def levels(self, table: Tensor) -> Tensor:
        """1 + (k − 1)·(1 + tanh(10⁶(dσ_t/dt − ε)))/2: k where σ_t still moves, 1 in the convergence area; for
        k = 5 proportional to the code's tanh(10⁶(dσ_t/dt − ε)) + 1.5 (which steps down at M − 1, one before M)."""
        step = 0.5 * (1 + torch.tanh(1e6 * (process_increment(table) - self.epsilon)))
        return 1 + (self.suppression - 1) * step

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """P2 in ε-space, log 1/(k + SNR)^γ."""
        return p2_log_weight(logsnr, self.p2_gamma, self.p2_k)

    def describe(self) -> str:
        return f"{super().describe()}, levels {self.suppression:g} : 1 split at dσ_t/dt = ε, duals about M = {self.pivot} of {self.num_timesteps}"
