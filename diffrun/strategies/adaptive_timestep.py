"""Adaptive non-uniform timestep sampling (Kim, Ki, Shim & Lee, CVPR 2025, arXiv:2411.09998).

A policy π_φ(u | x0) = Beta(a, b) (a small CNN on the clean image) picks one discrete timestep per image,
t = round(u·(T − 1)); the model trains on the plain, unweighted ε-loss there (no importance correction,
so the policy changes the objective). Every `update_every` steps the policy is trained by REINFORCE on
how much the optimizer step lowered the VLB terms (written after ku-dmlab/Adaptive-Timestep-Sampler,
`ddpm_torch/utils/train.py::Trainer.step`, `ddpm_torch/network.py::ActorNetwork`):

  1. before and after the optimizer step, KL_τ = KL(q(x_{τ−1}|x_τ, x0) ‖ p_θ(x_{τ−1}|x_τ)) in bits/dim,
     (a) for one image of the batch at every probe timestep and (b) for every image at the selected S;
  2. ΔKL = KL_before − KL_after of (a) goes into a ring buffer (20 rows); S is re-chosen as the |S| = 3
     probe timesteps whose ΔKL best predicts the row sum Σ_τ ΔKL_τ (univariate F-test);
  3. reward_i = Σ_{τ∈S} ΔKL_τ(x_i) + c·H(Beta_i); loss = −mean(log π(u_i|x_i) · reward_i); Adam, clip 1.

The DDPM chain is the run's schedule discretised to T steps (ᾱ_k = sigmoid(λ_k), k = 0 least noisy);
p_θ(x_{τ−1}|x_τ) has mean from the model's x̂0 and a fixed variance (`model_variance`).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Beta

from diffrun.errors import ConfigError
from diffrun.models.parameterization import WEIGHT_SPACES
from diffrun.schedules import alpha_sigma
from diffrun.strategies.base import NoiseDraw, Strategy, grid_timesteps, uniform_t_log_density

_U_EPS = 1e-6  # u is clamped to [ε, 1 − ε] for log π(u): Beta(a < 1) has infinite density at 0 and 1


class AveragePoolTo(nn.Module):
    """`nn.AdaptiveAvgPool2d(size)` written as two matrix products (P_h · x · P_wᵀ, the same windows), because the
    CUDA backward of adaptive average pooling has no deterministic implementation (deterministic=true)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def _windows(self, n: int, device, dtype) -> Tensor:
        i = torch.arange(self.size)
        start, end = (i * n) // self.size, -((-(i + 1) * n) // self.size)      # floor, ceil: PyTorch's windows
        j = torch.arange(n)
        inside = (j[None] >= start[:, None]) & (j[None] < end[:, None])
        return (inside.double() / (end - start)[:, None]).to(device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = self._windows(x.shape[-2], x.device, x.dtype)
        cols = self._windows(x.shape[-1], x.device, x.dtype)
        return rows @ x @ cols.T


class BetaPolicy(nn.Module):
    """x0 → Beta(a, b): 3 × (conv3×3 32/64/128, ReLU, max-pool 2) → average-pool to 4×4 → MLP → (a, b).

    The adaptive pool makes any image size work (identity at 32×32, where it is the paper's network);
    the last layer starts at weights 0, bias 0.5, i.e. a = b = softplus(0.5) ≈ 0.974 (near uniform).
    """

    def __init__(self, in_channels: int = 3, hidden_dim: int = 256, hidden_depth: int = 2):
        super().__init__()
        layers, width = [], in_channels
        for out in (32, 64, 128):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            width = out
        self.features = nn.Sequential(*layers, AveragePoolTo(4), nn.Flatten())
        mlp, width = [], 128 * 4 * 4
        for _ in range(hidden_depth):
            mlp += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.head = nn.Linear(width, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 0.5)
        self.mlp = nn.Sequential(*mlp, self.head)

    def forward(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        out = F.softplus(self.mlp(self.features(x0)).float()) + 1e-5
        return out[:, 0], out[:, 1]


def _unwrap(model: nn.Module) -> nn.Module:
    """The `Denoiser` inside DDP / torch.compile wrappers (KL probes need no gradient sync)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


class AdaptiveTimestep(Strategy):
    """Learned Beta timestep policy, REINFORCE on ΔKL at a few F-test-selected timesteps (biased sampler).

    Cost: every `update_every` steps, 2 × (probe timesteps + batch × num_selected) extra image-forwards
    of the denoiser (counted in the `extra_forwards` buffer) plus a policy step; `probe_timesteps`
    subsamples the all-T sweep (None: all T, as the paper). The policy CNN also runs on every batch.
    """

    name = "adaptive_timestep"
    # learns through on_before_update / on_after_update (the KL probes around the update), not `observe`

    def __init__(self, num_timesteps: int | None = None, in_channels: int = 3, update_every: int = 40,
                 num_selected: int = 3, buffer_size: int = 20, policy_lr: float = 1e-2,
                 entropy_coef: float = 0.01, grad_clip: float = 1.0, hidden_dim: int = 256, hidden_depth: int = 2,
                 probe_timesteps: int | None = None, probe_batch: int = 250, model_variance: str = "fixed_small",
                 common_noise: bool = False, space: str = "eps", **kw):
        super().__init__(**kw)
        if model_variance not in ("fixed_small", "fixed_large"):
            raise ConfigError(f"weighting.model_variance={model_variance!r}: allowed fixed_small, fixed_large")
        if space not in ("target", *WEIGHT_SPACES):
            raise ConfigError(f"weighting.space={space!r}: allowed target, {', '.join(WEIGHT_SPACES)}")
        if (num_timesteps is not None and num_timesteps < 2) or update_every < 1 or buffer_size < 3 or probe_batch < 1:
            raise ConfigError("weighting: need num_timesteps >= 2 (or null), update_every >= 1, buffer_size >= 3, "
                              f"probe_batch >= 1; got {num_timesteps}, {update_every}, {buffer_size}, {probe_batch}")
        if probe_timesteps is not None and probe_timesteps < 1:
            raise ConfigError(f"weighting.probe_timesteps must be >= 1 or null, got {probe_timesteps}")
        self.requested_timesteps, self.probe_timesteps, self.buffer_size = num_timesteps, probe_timesteps, buffer_size
        self.update_every, self.num_selected = update_every, num_selected
        self.entropy_coef, self.grad_clip, self.probe_batch = entropy_coef, grad_clip, probe_batch
        self.model_variance, self.common_noise, self.space = model_variance, bool(common_noise), space
        self.policy = BetaPolicy(in_channels, hidden_dim, hidden_depth)
        self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=policy_lr)
        self._build_probes(num_timesteps or 1000)
        self.register_buffer("buffer_rows", torch.zeros((), dtype=torch.long))        # rows ever pushed
        self.register_buffer("extra_forwards", torch.zeros((), dtype=torch.long))     # image-forwards spent on probes
        self.register_buffer("policy_updates", torch.zeros((), dtype=torch.long))
        self._last_u: Tensor | None = None       # the batch's Beta draws, for the next policy update
        self._before: dict | None = None         # KL before the optimizer step (between the two hooks)

    def _build_probes(self, num_timesteps: int) -> None:
        """The probe timesteps (all T, or `probe_timesteps` evenly spaced plus the initial S) and the buffers sized by them."""
        grid = torch.arange(num_timesteps)
        if self.probe_timesteps is not None:
            spaced = torch.linspace(0, num_timesteps - 1, self.probe_timesteps).round().long()
            grid = torch.unique(torch.cat([torch.arange(min(self.num_selected, num_timesteps)), spaced]))
        if not 1 <= self.num_selected <= grid.numel():
            raise ConfigError(f"weighting.num_selected must be in [1, {grid.numel()}], got {self.num_selected}")
        self.num_timesteps = num_timesteps
        self.register_buffer("probe_grid", grid.long(), persistent=False)
        self.register_buffer("selected", grid[:self.num_selected].clone().long())          # S, initially {0, 1, 2}
        self.register_buffer("delta_kl", torch.zeros(self.buffer_size, grid.numel()))      # ring buffer of ΔKL rows

    # --- wiring: the discrete DDPM chain of the run's schedule -----------------------------------
    def bind(self, schedule, prediction, sigma_data=0.5, comm=None):
        super().bind(schedule, prediction, sigma_data, comm)
        T = grid_timesteps(schedule, self.requested_timesteps)
        if T != self.num_timesteps:  # T from schedule.timesteps
            self._build_probes(T)
        dev = self.selected.device
        lam = schedule.discrete_logsnr(self.num_timesteps).double()
        abar = torch.sigmoid(lam)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        beta = (1 - abar / abar_prev).clamp(min=1e-20, max=1.0)
        post_var = (beta * (1 - abar_prev) / (1 - abar)).clamp(min=1e-20)
        post_var[0] = post_var[1]                                               # clipped log-variance at t = 0
        model_var = post_var if self.model_variance == "fixed_small" else torch.cat([post_var[1:2], beta[1:]])
        log_ratio = post_var.log() - model_var.log()                            # log σ_q² − log σ_p²
        self.register_buffer("logsnr_table", lam.float().to(dev), persistent=False)
        # KL per element = var_term + mean_coef · (x0 − x̂0)²   (q, p share the mean's z-coefficient)
        var_term = 0.5 * (-1 - log_ratio + log_ratio.exp())
        self.register_buffer("kl_var_term", var_term.float().to(dev), persistent=False)
        mean_coef = abar_prev.sqrt() * beta / (1 - abar)                        # coefficient of x0 in μ̃
        self.register_buffer("kl_mean_coef", (mean_coef**2 / (2 * model_var)).float().to(dev), persistent=False)
        return self

    # --- 1. sampling --------------------------------------------------------------------------
    def _policy_dist(self, x0: Tensor) -> Beta:
        a, b = self.policy(x0.float())
        return Beta(a, b, validate_args=False)

    def sample(self, x0: Tensor) -> NoiseDraw:
        with torch.no_grad():
            dist = self._policy_dist(x0)
            u = dist.sample()
        index = torch.round(u * (self.num_timesteps - 1)).long()
        self._last_u = u
        logsnr = self.logsnr_table[index]
        return NoiseDraw(logsnr=logsnr, proposal_weight=torch.ones_like(logsnr),
                         t=(index + 1).float() / self.num_timesteps, index=index)

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)                                         # L_simple: unweighted ε-MSE

    def log_density(self, logsnr: Tensor) -> Tensor:
        """λ-density of the *initial* policy (head weights 0 ⇒ Beta(a0, b0) for every image), continuous-t
        approximation. After training the density depends on x0 and is not available in closed form."""
        a, b = (F.softplus(self.policy.head.bias.detach().double().cpu()) + 1e-5).tolist()
        t = self.schedule.t_of_logsnr(logsnr.double()).clamp(1e-12, 1 - 1e-12)
        log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        log_beta = (a - 1) * torch.log(t) + (b - 1) * torch.log1p(-t) - log_norm
        return (log_beta + uniform_t_log_density(self.schedule, logsnr.double())).to(logsnr.dtype)

    # --- 2. the policy update (host-side work on the `update_every` schedule only) ----------------
    @torch.no_grad()
    def _kl_bits(self, model: nn.Module, x0: Tensor, index: Tensor, noise: Tensor) -> Tensor:
        """KL(q(x_{τ−1}|x_τ,x0) ‖ p_θ(x_{τ−1}|x_τ)) per sample, bits/dim, in chunks of `probe_batch`."""
        out = []
        for lo in range(0, x0.shape[0], self.probe_batch):
            x, idx, eps = x0[lo:lo + self.probe_batch], index[lo:lo + self.probe_batch], noise[lo:lo + self.probe_batch]
            lam = self.logsnr_table[idx]
            alpha, sigma = (c.view(-1, *[1] * (x.ndim - 1)) for c in alpha_sigma(lam))
            z = alpha * x + sigma * eps
            x0_hat, _ = model.predict_x0_eps(z, lam, model.split(model(z, lam))[0])
            err = (x.float() - x0_hat.float()).pow(2).flatten(1).mean(1)
            out.append((self.kl_var_term[idx] + self.kl_mean_coef[idx] * err) / math.log(2.0))
        # x̂0 is undefined at ᾱ = 0 (zero terminal SNR, e.g. the linear schedule at small T): no signal there
        return torch.nan_to_num(torch.cat(out), nan=0.0, posinf=0.0, neginf=0.0)

    def _probe(self, model: nn.Module, x_probe: Tensor, x0: Tensor, noise: dict | None) -> dict:
        grid, sel = self.probe_grid, self.selected
        x_grid = x_probe.expand(grid.numel(), *x_probe.shape[1:])
        x_sel = x0.repeat_interleave(sel.numel(), dim=0)                        # (B·|S|): image-major
        idx_sel = sel.repeat(x0.shape[0])
        if noise is None:
            noise = {"grid": torch.randn_like(x_grid), "sel": torch.randn_like(x_sel)}
        kl_grid = self._kl_bits(model, x_grid, grid, noise["grid"])
        kl_sel = self._kl_bits(model, x_sel, idx_sel, noise["sel"]).view(x0.shape[0], sel.numel())
        return {"grid": kl_grid, "sel": kl_sel, "noise": noise}

    def on_before_update(self, denoiser: nn.Module, x0: Tensor, step: int) -> None:
        self._before = None
        if step % self.update_every != 0:
            return
        pick = torch.randint(x0.shape[0], (1,), device=x0.device)
        x_probe = x0[pick].detach()
        self._before = {"x_probe": x_probe, **self._probe(_unwrap(denoiser), x_probe, x0.detach(), None)}

    def on_after_update(self, denoiser: nn.Module, x0: Tensor, step: int, good: Tensor) -> None:
        before, self._before = self._before, None
        if before is None or self._last_u is None:
            return
        if not bool(good):  # host sync, on update steps only: a skipped step teaches the policy nothing
            return
        x0 = x0.detach()
        after = self._probe(_unwrap(denoiser), before["x_probe"], x0, before["noise"] if self.common_noise else None)
        world = self.comm.world_size
        self.extra_forwards.add_(2 * world * (self.probe_grid.numel() + x0.shape[0] * self.selected.numel()))
        # ΔKL of the probe image (under DDP: the mean over the ranks' probe images, so that S is one
        # choice on all ranks) → ring buffer; re-select S on it (host-side, sklearn)
        delta = self.comm.summed((before["grid"] - after["grid"]).float()) / world
        row = self.buffer_rows % self.delta_kl.shape[0]
        self.delta_kl.index_copy_(0, row.view(1), delta.view(1, -1))
        self.buffer_rows.add_(1)
        reward = (before["sel"] - after["sel"]).sum(dim=1)                      # Σ_{τ∈S} ΔKL_τ(x_i)
        self._update_policy(x0, reward)
        self._reselect()

    def _update_policy(self, x0: Tensor, reward: Tensor) -> None:
        self._optimizer_to_param_device()
        with torch.enable_grad():
            dist = self._policy_dist(x0)
            log_prob = dist.log_prob(self._last_u.clamp(_U_EPS, 1 - _U_EPS))
            total = reward.detach() + self.entropy_coef * dist.entropy()        # entropy bonus inside the reward
            loss = -(log_prob * total).mean()
            self.policy_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        world = self.comm.world_size
        if world > 1:  # the policy gradient of the global batch: one policy on all ranks, as DDP keeps one model
            for param in self.policy.parameters():
                if param.grad is not None:
                    self.comm.all_reduce_(param.grad).div_(world)
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.policy_optimizer.step()
        self.policy_optimizer.zero_grad(set_to_none=True)
        self.policy_updates.add_(1)

    def _reselect(self) -> None:
        from sklearn.feature_selection import SelectKBest, f_regression

        rows = int(min(self.buffer_rows.item(), self.delta_kl.shape[0]))
        if rows < 3:                                                            # F-test needs n − 2 ≥ 1
            return
        X = self.delta_kl[:rows].double().cpu().numpy()
        y = X.sum(axis=1)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            columns = SelectKBest(f_regression, k=self.num_selected).fit(X, y).get_support(indices=True)
        self.selected.copy_(self.probe_grid[torch.as_tensor(columns, device=self.probe_grid.device)])

    # --- checkpointing: the policy's Adam state ------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"policy_optimizer": self.policy_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])

    def _optimizer_to_param_device(self) -> None:
        """Adam state follows the policy if the strategy was moved (`.to`) after loading a checkpoint."""
        for param, state in self.policy_optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.device != param.device and key != "step":
                    state[key] = value.to(param.device)
