"""The peer: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py written out
with diffrun's own U-Net, same batch and autocast precision."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from diffrun.building import build


class PeerDDPMScheduler:
    """The part of diffusers' DDPMScheduler the training loop uses: linear β, integer t, `add_noise`."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.alphas_cumprod = self.alphas_cumprod.to(device=original.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=original.dtype)
        sqrt_alpha_prod = (alphas_cumprod[timesteps] ** 0.5).flatten()
        while sqrt_alpha_prod.dim() < original.dim():
            sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus = ((1 - alphas_cumprod[timesteps]) ** 0.5).flatten()
        while sqrt_one_minus.dim() < original.dim():
            sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
        return sqrt_alpha_prod * original + sqrt_one_minus * noise


class _FlipDataset(torch.utils.data.Dataset):
    """TensorDataset + per-image torchvision transforms (RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5))."""

    def __init__(self, images_uint8: torch.Tensor):
        from torchvision.transforms import v2

        self.data = torch.utils.data.TensorDataset(images_uint8)
        self.transform = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize([0.5] * images_uint8.shape[1], [0.5] * images_uint8.shape[1])])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.data[index][0])


class PeerLoop:
    """diffusers train_unconditional.py, step for step (defaults of that script): DataLoader on the CPU
    (num_workers=0), `.to(device)` per batch, AdamW(lr 1e-4, betas (0.95, 0.999), wd 1e-6) without
    `fused`, cosine LR with warm-up, autocast forward, `F.mse_loss` on ε, grad clip 1.0, EMA as a
    Python loop over parameters with the EMAModel warm-up decay, and `loss.item()` every step for logs."""

    def __init__(self, net_cfg: DictConfig, images_uint8: torch.Tensor, batch_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, num_workers: int = 0, compile: bool = False,
                 channels_last: bool = False):
        self.device, self.autocast_dtype = device, autocast_dtype
        self.weight_dtype = autocast_dtype or torch.float32     # the script casts inputs to the mixed dtype
        self.channels_last = channels_last
        self.model = build(net_cfg).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.forward = torch.compile(self.model) if compile else self.model
        self.scheduler = PeerDDPMScheduler()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                           weight_decay=1e-6, eps=1e-8)
        warmup, total = 500, 10**6
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: s / warmup if s < warmup else
                                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
        self.loader = torch.utils.data.DataLoader(_FlipDataset(images_uint8.cpu()), batch_size=batch_size,
                                                  shuffle=True, num_workers=num_workers, drop_last=True)
        self._batches = iter(self.loader)
        self.global_step, self.logs = 0, {}

    def _next_batch(self) -> torch.Tensor:
        try:
            return next(self._batches)
        except StopIteration:                                  # next epoch
            self._batches = iter(self.loader)
            return next(self._batches)

    def _ema_decay(self, inv_gamma: float = 1.0, power: float = 0.75, max_decay: float = 0.9999) -> float:
        step = max(0, self.global_step - 1)
        return 0.0 if step <= 0 else min(max_decay, 1 - (1 + step / inv_gamma) ** -power)

    def step(self, steps: int = 1) -> None:
        for _ in range(steps):
            clean = self._next_batch().to(self.device).to(self.weight_dtype)
            if self.channels_last:
                clean = clean.contiguous(memory_format=torch.channels_last)
            noise = torch.randn(clean.shape, dtype=self.weight_dtype, device=clean.device)
            timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (clean.shape[0],), device=clean.device).long()
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                model_output = self.forward(noisy, timesteps)
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.global_step += 1
            decay = self._ema_decay()
            with torch.no_grad():
                for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
                    ema_p.mul_(decay).add_(p, alpha=1 - decay)
            self.logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0],
                         "step": self.global_step, "ema_decay": decay}
