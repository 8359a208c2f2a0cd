"""The DDPM U-Net (Ho et al. 2020, App. B; PixelCNN++ backbone), conditioned on a noise-level scalar.

Channel widths, resolutions and attention placement follow the DDPM CIFAR-10 model (35.7M
parameters at 128 channels, multipliers 1,2,2,2, two res-blocks per level, attention at 16×16,
dropout 0.1). GroupNorm + SiLU throughout, attention through `scaled_dot_product_attention`.
The backbone sees `c_noise` (see `parameterization.Denoiser`), embedded with fixed Fourier
features so that any schedule or continuous-time sampler can condition it, and, with num_classes > 0, a
class label whose table row (num_classes + 1 rows, the last one NULL) is added to the noise embedding, as
ADM's `label_emb` (Dhariwal & Nichol 2021; guided-diffusion `unet.py`). Call contract: `conditioning`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.models.checks import require_float, require_int, require_ints
from diffrun.models.conditioning import LabelEmbedding, check_class_labels, check_num_classes, reject_augment_labels


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels, eps=1e-6)


class NoiseEmbedding(nn.Module):
    """Fixed sinusoidal features of c_noise at geometrically spaced frequencies, then a 2-layer MLP."""

    def __init__(self, channels: int, emb_channels: int, min_freq: float = 0.05, max_freq: float = 20.0):
        super().__init__()
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), channels // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2, self.dropout = _norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over pixels, as in DDPM (q, k, v and output as 1×1 projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class StridedConv(nn.Conv2d):
    """The 3×3, stride-2 down-sampling convolution. `same` is DDPM's: TensorFlow's `conv2d(stride=2,
    padding='SAME')` in Ho et al.'s code pads an even-sized input by one row and column at the bottom and right
    only (tqch/ddpm-torch and pesser/pytorch_diffusion do the same); `symmetric` pads one pixel on every side, as
    improved-diffusion and ADM do. A Conv2d, so the parameter names are a plain convolution's either way."""

    PADDINGS = ("same", "symmetric")

    def __init__(self, channels: int, padding: str):
        super().__init__(channels, channels, 3, stride=2, padding=0 if padding == "same" else 1)
        self.pad_bottom_right = padding == "same"

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.pad_bottom_right else x)


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,               # image channels (1 for digits, 3 for CIFAR)
        image_size: int = 32,               # input resolution; must be divisible by 2^(levels−1)
        channels: int = 128,                # base width
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # width multiplier per resolution level
        num_res_blocks: int = 2,            # res-blocks per level on the way down
        attention_resolutions: Sequence[int] = (16,),  # resolutions with self-attention
        dropout: float = 0.1,
        num_classes: int = 0,               # 0: unconditional; else labels in [0, num_classes], num_classes = NULL
        learn_sigma: bool = False,          # twice the output channels: the prediction and IDDPM's variance v
        # same: DDPM's (bottom/right only), what every preset says; symmetric: ADM's, the default only so that a
        # config without the key (a checkpoint written before it existed) builds the network it trained
        downsample_padding: str = "symmetric",
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("channels", channels),
                           ("num_res_blocks", num_res_blocks)):
            require_int(key, value)
        require_ints("channel_mult", channel_mult)
        require_ints("attention_resolutions", attention_resolutions, allow_empty=True)
        require_float("dropout", dropout, 0.0, 1.0)
        check_num_classes(num_classes)
        if downsample_padding not in StridedConv.PADDINGS:
            raise ConfigError(f"model.net.downsample_padding={downsample_padding!r}: allowed "
                              f"{', '.join(StridedConv.PADDINGS)}")
        levels = len(channel_mult)
        if image_size % (2 ** (levels - 1)) != 0:
            raise ConfigError(
                f"model.net.image_size={image_size} cannot be halved {levels - 1} times "
                f"(channel_mult has {levels} levels); use an image size divisible by {2 ** (levels - 1)}"
            )
        if channels % 8 != 0:
            raise ConfigError(f"model.net.channels={channels}: must be a multiple of 8 (GroupNorm groups)")
        self.num_classes = num_classes
        emb_ch = 4 * channels
        self.embed = NoiseEmbedding(channels, emb_ch)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels, ch, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, emb_ch, dropout)]
                ch = channels * mult
                if res in attention_resolutions:
                    blocks.append(AttentionBlock(ch))
                self.down.append(nn.ModuleList(blocks))
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([StridedConv(ch, downsample_padding)]))
                skip_channels.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_ch, dropout), AttentionBlock(ch), ResBlock(ch, ch, emb_ch, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_channels.pop(), channels * mult, emb_ch, dropout)]
                ch = channels * mult
                if res in attention_resolutions:
                    blocks.append(AttentionBlock(ch))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * in_channels if learn_sigma else in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # built last: the other layers draw the same initial weights as the unconditional net's
        self.label_embed = LabelEmbedding(num_classes, emb_ch) if num_classes else None

    @staticmethod
    def _run(blocks: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        reject_augment_labels(augment_labels, self)
        check_class_labels(class_labels, self.num_classes, x.shape[0], self)
        emb = self.embed(c_noise)
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels, x.shape[0])  # ADM: emb = time_embed(t) + label_emb(y)
        emb = emb.to(x.dtype) if not torch.is_autocast_enabled() else emb
        h = self.stem(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.out(h)
