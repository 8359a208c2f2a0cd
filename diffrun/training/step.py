"""One training step: a function of the components and a batch, with no host sync and no config lookup.

    λ ~ strategy            z = α x + σ ε           loss_i = ‖F(z, λ) − F*‖²       total = mean(w_i · loss_i)

With a learned variance (model.learn_sigma) the total is IDDPM's L_hybrid, mean(w_i · loss_i + c_i · λ T L_t,i)
(diffrun/models/learned_variance.py): the strategy's weight w_i acts on L_simple only, as in the Min-SNR, P2 and
SpeeD code, and the VB term carries only the proposal correction c_i (importance sampling's 1/(T p_t), which
improved-diffusion applies to its whole loss; 1 for every other strategy), so the bound stays unbiased.

One mask decides what a step may change: `good` = the loss and the gradient norm are finite. A step
that is not good changes nothing — no optimizer update (skipped on the device where the optimizer is
fused), no EMA update, no strategy feedback, no statistics, no loss sums — and is counted. With fp16
the GradScaler's own skips (a finite loss whose scaled gradients overflowed, routine while the scale
settles) are counted apart, as `overflow`, and never trigger `train.nan_policy`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffrun.data.labels import drop_labels
from diffrun.models.learned_variance import hybrid_vb_term
from diffrun.schedules import alpha_sigma
from diffrun.strategies import NoiseDraw
from diffrun.training.logsnr_stats import LogSNRStats
from diffrun.training.setup import Components


class StepCounters:
    """Device-side bookkeeping, read by the host only at a flush."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)   # Σloss, Σweighted loss, Σgrad-norm (good steps)
        self.counts = torch.zeros(3, dtype=torch.long, device=device)    # good, non-finite, overflow steps in the window
        self.good, self.nonfinite, self.overflow = self.counts.unbind()  # views of `counts`
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 1-based step of the first non-finite one

    def read(self, comm) -> dict:
        """The window's numbers on the host (one sync), then reset. Under DDP: loss sums averaged over ranks,
        counts maxed (a step is skipped on every rank alike)."""
        if comm.world_size > 1:
            comm.all_reduce_(self.sums).div_(comm.world_size)
            comm.all_reduce_(self.counts, "max")
            comm.all_reduce_(self.first_bad, "max")
        good, nonfinite, overflow = self.counts.tolist()
        loss, weighted, grad_norm = (self.sums / max(1, good)).tolist() if good else [float("nan")] * 3
        out = {"loss": loss, "weighted_loss": weighted, "grad_norm": grad_norm, "good": good,
               "nonfinite": nonfinite, "overflow": overflow, "first_bad": int(self.first_bad)}
        self.sums.zero_()
        self.counts.zero_()
        self.first_bad.fill_(-1)
        return out

    def add(self, values: Tensor, good: Tensor, nonfinite: Tensor, overflow: Tensor, step: int | Tensor) -> None:
        """One step (0-d bool flags): `values` = (mean loss, weighted loss, grad norm) count where `good`."""
        self.sums += values.double().nan_to_num_(0.0) * good
        self.counts += torch.stack([good, nonfinite, overflow])
        self.first_bad.masked_fill_(nonfinite & (self.first_bad < 0), step + 1)


def train_step(c: Components, x0: Tensor, step: int | Tensor, counters: StepCounters, stats: LogSNRStats,
               labels: Tensor | None = None) -> None:
    """Train on the batch `x0` (this rank's share) with its class `labels` (None: unconditional); `step` is the
    number of steps already taken (a 0-d device tensor when the step is captured, diffrun/training/capture.py)."""
    augment_labels = None
    if c.augment is not None:                   # EDM's non-leaking augmentation: the net is told what was done
        x0, augment_labels = c.augment(x0)
    if c.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    if labels is not None:
        labels = drop_labels(labels, c.label_dropout, c.num_classes)   # classifier-free guidance's null label
    draw = c.strategy.sample(x0)
    eps = torch.randn_like(x0)
    alpha, sigma = (coef.view(-1, 1, 1, 1) for coef in alpha_sigma(draw.logsnr))
    z = alpha * x0 + sigma * eps

    with torch.autocast(c.device.type, dtype=c.autocast_dtype or torch.float32, enabled=c.autocast_dtype is not None):
        out = c.model(z, draw.logsnr, class_labels=labels, augment_labels=augment_labels)
    prediction, variance = c.denoiser.split(out.float())
    target = c.denoiser.target(x0, eps, z, draw.logsnr)
    loss = (prediction - target).square().mean(dim=(1, 2, 3))           # (B,) unweighted, target space
    seen = loss.detach()                                                 # what the strategy and statistics see
    weight = c.strategy.loss_weights(draw, seen)
    total = (weight * loss).mean()
    if variance is not None:                                             # L_hybrid: + λ L_vlb on a stopped mean
        x0_hat, _ = c.denoiser.predict_x0_eps(z, draw.logsnr, prediction.detach())
        vb = hybrid_vb_term(c.posterior, c.schedule.timesteps, draw.index, x0, z, x0_hat, variance)
        total = total + (draw.proposal_weight * vb).mean()

    c.optimizer.zero_grad(set_to_none=True)
    c.strategy.on_before_update(c.denoiser, x0, step)
    c.scaler.scale(total).backward()
    c.scaler.unscale_(c.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(c.parameters, c.grad_clip)
    values = torch.stack([seen.mean(), total.detach(), grad_norm])
    finite = torch.isfinite(values[1:])                                  # loss, gradients
    good = finite.all()
    if c.scaler.is_enabled():
        c.scaler.step(c.optimizer)                      # fp16: the scaler skips non-finite gradients itself
        c.scaler.update()
        loss_ok, grads_ok = finite.unbind()
        overflow, nonfinite = loss_ok & ~grads_ok, ~loss_ok
    else:
        overflow, nonfinite = torch.zeros_like(good), ~good
        _optimizer_step_if(c.optimizer, good)
    c.lr_schedule.step()
    c.ema.update(c.denoiser, good)
    c.strategy.on_after_update(c.denoiser, x0, step, good)
    if c.strategy.observes:
        c.strategy.observe(*_global_feedback(c, draw, seen), good=_all_good(c, good))

    # --- device-side bookkeeping, read back at the flush -------------------------------------------
    counters.add(values, good, nonfinite, overflow, step)
    stats.update(draw.logsnr, seen.nan_to_num(0.0), weight.detach().nan_to_num(0.0), good)


def _optimizer_step_if(optimizer: torch.optim.Optimizer, good: Tensor) -> None:
    if optimizer.defaults.get("fused"):        # fused kernels skip the update on the device where found_inf is 1
        found_inf(optimizer).copy_(~good)
        optimizer.step()
    elif bool(good):                            # host sync: only for optimizers without a fused kernel
        optimizer.step()


def found_inf(optimizer: torch.optim.Optimizer) -> Tensor:
    """The flag a fused Adam(W) reads as `optimizer.found_inf` (torch's GradScaler protocol), made once and kept
    on the optimizer: written in place each step, so that a compiled step never adds or deletes attributes."""
    if getattr(optimizer, "found_inf", None) is None:
        device = optimizer.param_groups[0]["params"][0].device
        optimizer.found_inf, optimizer.grad_scale = torch.zeros((), device=device), None
    return optimizer.found_inf


def _global_feedback(c: Components, draw: NoiseDraw, loss: Tensor) -> tuple[NoiseDraw, Tensor]:
    """Under DDP the strategy learns from the global batch (every rank's draws and losses, in rank order),
    so adaptive state stays identical on all ranks and a resumed run continues it exactly."""
    if c.comm.world_size == 1:
        return draw, loss
    logsnr, weight, t, index, loss = c.comm.all_gather_cat(draw.logsnr, draw.proposal_weight, draw.t, draw.index, loss)
    return NoiseDraw(logsnr=logsnr, proposal_weight=weight, t=t, index=index), loss


def _all_good(c: Components, good: Tensor) -> Tensor:
    """The step is good on every rank (gradients are averaged, but each rank's loss is its own)."""
    if c.comm.world_size == 1:
        return good
    return c.comm.all_reduce_(good.to(torch.int32), "min").bool()
