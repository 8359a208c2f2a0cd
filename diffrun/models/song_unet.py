"""EDM's DDPM++ / NCSN++ U-Net (`SongUNet`, Karras et al. 2022, arXiv:2206.00364), conditioned on c_noise.

Song et al.'s score-SDE backbones (arXiv:2011.13456) as NVlabs/edm re-implements them in
`training/networks.py::SongUNet`, the network behind EDM's CIFAR-10 results. One class, two presets:

              noise embedding                  encoder    decoder    resample filter
    DDPM++    positional, model_channels       standard   standard   [1, 1]
    NCSN++    Fourier (scale 16), 2× that      residual   standard   [1, 3, 3, 1]

Every choice follows EDM's code (commit 008a4e5) so that its state dicts map one-to-one onto ours
(docs/networks.md gives the key mapping and the agreement measured on identical weights): additive
noise conditioning, every residual sum scaled by 1/√2, one attention head, GroupNorm(min(32, C/4)
groups, eps 1e-6), Xavier-uniform weights with zero biases, the last conv of each block and the
output conv at 1e-5 × Xavier, the attention qkv at √0.2 × Xavier.

Class labels are integers in [0, num_classes]; `num_classes` is the null label (unconditional, for
classifier-free guidance). EDM feeds √num_classes · one-hot(label) through a Linear and drops a label
by feeding the zero vector; here label k gets the same Linear's output √num_classes · W[:, k] + b and
the null label gets b, EDM's zero vector. Same parameters, same gradients, same checkpoints.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrun.errors import ConfigError

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")

SKIP_SCALE = 1 / math.sqrt(2)  # every residual and skip sum (Song et al. 2021, arXiv:2011.13456: "rescale skip connections")
OUTPUT_INIT_GAIN = 1e-5        # EDM `init_zero`: near-zero rather than zero, so gradients reach every layer
ATTENTION_INIT_GAIN = math.sqrt(0.2)  # EDM `init_attn` for the qkv projection
FOURIER_SCALE = 16             # std of the random Fourier frequencies (EDM `FourierEmbedding`)
MAX_POSITIONS = 10000          # positional embedding: frequencies 10000^(−i/(n−1)), i = 0..n−1


def _xavier(layer: nn.Conv2d | nn.Linear, gain: float = 1.0):
    """EDM's `weight_init(mode='xavier_uniform') * init_weight` with zero bias; same fans as PyTorch."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(in_ch: int, out_ch: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return _xavier(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), gain)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = min(32, channels // 4)  # EDM GroupNorm: at most 32 groups, at least 4 channels each
    if groups == 0 or channels % groups:
        raise ConfigError(f"model.net.model_channels / channel_mult give a layer of {channels} channels, which "
                          f"GroupNorm cannot split into min(32, {channels}/4) groups; use multiples of 4 (of 32 from 128 up)")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)


class Resample(nn.Module):
    """×2 up- or down-sampling with a separable FIR filter f⊗f / (Σf)² (EDM `Conv2d` resample_filter):
    [1, 1] is box (average pool / nearest), [1, 3, 3, 1] the binomial anti-aliasing filter of NCSN++."""

    def __init__(self, fir: Sequence[float], direction: str, pad: int | None = None):
        super().__init__()
        f = torch.as_tensor(fir, dtype=torch.float32)
        self.register_buffer("fir", torch.outer(f, f) / f.sum().square(), persistent=False)
        self.direction, self.pad = direction, (len(fir) - 1) // 2 if pad is None else pad

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        f = self.fir.to(x.dtype)[None, None].expand(c, 1, -1, -1)
        if self.direction == "down":
            return F.conv2d(x, f, stride=2, padding=self.pad, groups=c)
        return F.conv_transpose2d(x, 4 * f, stride=2, padding=self.pad, groups=c)  # ×4 keeps the mean


class ConvDown(nn.Module):
    """NCSN++'s residual image path: a 3×3 conv at full resolution, padded by the filter's reach too,
    then FIR down-sampling without padding (EDM `Conv2d(down=True, fused_resample=True)`)."""

    def __init__(self, in_ch: int, out_ch: int, fir: Sequence[float]):
        super().__init__()
        self.conv = _xavier(nn.Conv2d(in_ch, out_ch, 3, padding=1 + (len(fir) - 1) // 2))
        self.down = Resample(fir, "down", pad=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.conv(x))


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, + embedding, GroupNorm–SiLU–dropout–conv, + skip, all × 1/√2; optional
    ×2 resampling of both paths (before the 3×3 conv and before a 1×1 skip projection) and optional
    single-head self-attention after it (again a residual sum × 1/√2)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, resample: Resample | None = None,
                 attention: bool = False):
        super().__init__()
        self.resample = resample if resample is not None else nn.Identity()
        self.norm0, self.conv0 = _group_norm(in_ch), _conv(in_ch, out_ch, 3)
        self.emb_proj = _xavier(nn.Linear(emb_ch, out_ch))
        self.norm1, self.dropout = _group_norm(out_ch), nn.Dropout(dropout)
        self.conv1 = _conv(out_ch, out_ch, 3, gain=OUTPUT_INIT_GAIN)
        self.skip = _conv(in_ch, out_ch, 1) if in_ch != out_ch or resample is not None else None
        self.attention = attention
        if attention:
            self.attn_norm = _group_norm(out_ch)
            self.qkv = _conv(out_ch, 3 * out_ch, 1, gain=ATTENTION_INIT_GAIN)
            self.attn_proj = _conv(out_ch, out_ch, 1, gain=OUTPUT_INIT_GAIN)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        h = F.silu(self.norm1(h + self.emb_proj(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        skip = self.resample(x)
        x = (h + (self.skip(skip) if self.skip is not None else skip)) * SKIP_SCALE
        if not self.attention:
            return x
        b, c, height, width = x.shape
        # qkv channels interleaved per channel as (q, k, v), EDM's layout, so its weights load unpermuted
        q, k, v = self.qkv(self.attn_norm(x)).reshape(b, c, 3, height * width).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (self.attn_proj(a.transpose(1, 2).reshape(b, c, height, width)) + x) * SKIP_SCALE


class PositionalEmbedding(nn.Module):
    """[sin(c·ω_i), cos(c·ω_i)] with ω_i = 10000^(−i/(n−1)), i = 0..n−1, n = channels/2 (DDPM++;
    EDM `PositionalEmbedding(endpoint=True)` followed by SongUNet's sin/cos swap)."""

    def __init__(self, channels: int):
        super().__init__()
        n = channels // 2
        freqs = (1 / MAX_POSITIONS) ** (torch.arange(n, dtype=torch.float32) / (n - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = torch.outer(c_noise, self.freqs.to(c_noise.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """[sin(2π c f_i), cos(2π c f_i)] with fixed random f_i ~ N(0, 16²) (NCSN++, Tancik et al. 2020,
    arXiv:2006.10739); the frequencies are a saved buffer, as in EDM, so a checkpoint keeps them."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * FOURIER_SCALE)

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = torch.outer(c_noise, (2 * math.pi * self.freqs).to(c_noise.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ClassEmbedding(nn.Module):
    """EDM's `map_label` Linear(√K · one-hot) as a lookup: row k = √K · W[:, k] + b, null row (k = K) = b."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.linear = _xavier(nn.Linear(num_classes, channels))

    def forward(self, labels: Tensor) -> Tensor:
        rows = self.linear.weight.t() * math.sqrt(self.num_classes) + self.linear.bias
        return F.embedding(labels, torch.cat([rows, self.linear.bias[None]]))


class EncoderLevel(nn.Module):
    def __init__(self, down: ResBlock | None, aux_resample: Resample | None, aux_conv: nn.Module | None,
                 blocks: list[ResBlock]):
        super().__init__()
        self.down, self.aux_resample, self.aux_conv = down, aux_resample, aux_conv
        self.blocks = nn.ModuleList(blocks)


class DecoderLevel(nn.Module):
    def __init__(self, entry: list[ResBlock], blocks: list[ResBlock], head: nn.Module | None):
        super().__init__()
        self.entry, self.blocks, self.head = nn.ModuleList(entry), nn.ModuleList(blocks), head


class SongUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,                   # image channels; the output has as many
        image_size: int = 32,                   # input resolution; divisible by 2^(levels−1)
        num_classes: int = 0,                   # 0 = unconditional; else labels 0..K−1 and K = null
        augment_dim: int = 0,                   # EDM augmentation-label size (9 with its AugmentPipe), 0 = none
        model_channels: int = 128,              # base width
        channel_mult: Sequence[int] = (2, 2, 2),  # width multiplier per resolution level
        channel_mult_emb: int = 4,              # embedding width = model_channels × this
        channel_mult_noise: int = 1,            # noise-embedding width: 1 for DDPM++, 2 for NCSN++
        num_blocks: int = 4,                    # residual blocks per level on the way down
        attn_resolutions: Sequence[int] = (16,),  # resolutions with self-attention
        dropout: float = 0.13,                  # before the second conv of every block
        embedding_type: str = "positional",     # positional (DDPM++) | fourier (NCSN++)
        encoder_type: str = "standard",         # standard (DDPM++) | skip | residual (NCSN++)
        decoder_type: str = "standard",         # standard (both) | skip
        resample_filter: Sequence[float] = (1, 1),  # FIR filter: [1, 1] (DDPM++) | [1, 3, 3, 1] (NCSN++)
    ):
        super().__init__()
        levels = len(channel_mult)
        resolutions = [image_size >> level for level in range(levels)]
        _check_config(**locals())
        self.num_classes, self.augment_dim = num_classes, augment_dim
        self.encoder_type = encoder_type
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise

        # Mapping: noise (+ class, + augmentation) embedding, then two SiLU layers.
        self.noise_embedding = PositionalEmbedding(noise_ch) if embedding_type == "positional" else FourierEmbedding(noise_ch)
        self.class_embedding = ClassEmbedding(num_classes, noise_ch) if num_classes else None
        self.augment_embedding = _xavier(nn.Linear(augment_dim, noise_ch, bias=False)) if augment_dim else None
        self.mapping = nn.Sequential(_xavier(nn.Linear(noise_ch, emb_ch)), nn.SiLU(), _xavier(nn.Linear(emb_ch, emb_ch)), nn.SiLU())

        def block(cin, cout, resample=None, attention=False):
            return ResBlock(cin, cout, emb_ch, dropout, resample, attention)

        # Encoder: a 3×3 stem, then per level (a down-block and the auxiliary image path, past level 0)
        # num_blocks blocks. Every output is kept for the decoder.
        self.stem = _conv(in_channels, model_channels, 3)
        self.encoder = nn.ModuleList()
        skip_channels, ch = [model_channels], model_channels
        aux_ch = in_channels
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            down = aux_resample = aux_conv = None
            if level > 0:
                down = block(ch, ch, Resample(resample_filter, "down"))
                skip_channels.append(ch)
                if encoder_type == "skip":  # the image, down-sampled, 1×1-projected and added
                    aux_resample, aux_conv = Resample(resample_filter, "down"), _conv(aux_ch, ch, 1)
                elif encoder_type == "residual":  # a running image path, summed with h × 1/√2
                    aux_conv, aux_ch = ConvDown(aux_ch, ch, resample_filter), ch
            blocks = []
            for _ in range(num_blocks):
                blocks.append(block(ch, model_channels * mult, attention=res in attn_resolutions))
                ch = model_channels * mult
                skip_channels.append(ch)
            self.encoder.append(EncoderLevel(down, aux_resample, aux_conv, blocks))

        # Decoder: per level from the lowest, two blocks (the first with attention) or an up-block,
        # then num_blocks + 1 blocks on [h, skip] (attention in the last at attn_resolutions), and an
        # output head GroupNorm–SiLU–conv at level 0 (skip decoder: at every level, summed upwards).
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            if level == levels - 1:
                entry = [block(ch, ch, attention=True), block(ch, ch)]
            else:
                entry = [block(ch, ch, Resample(resample_filter, "up"))]
            blocks = []
            for index in range(num_blocks + 1):
                attention = index == num_blocks and res in attn_resolutions
                blocks.append(block(ch + skip_channels.pop(), model_channels * mult, attention=attention))
                ch = model_channels * mult
            head = None
            if decoder_type == "skip" or level == 0:
                head = nn.Sequential(_group_norm(ch), nn.SiLU(), _conv(ch, in_channels, 3, gain=OUTPUT_INIT_GAIN))
            self.decoder.append(DecoderLevel(entry, blocks, head))
        self.upsample_output = Resample(resample_filter, "up") if decoder_type == "skip" else None

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.noise_embedding(c_noise.to(self.mapping[0].weight.dtype))
        if self.class_embedding is not None:
            if class_labels is None:  # EDMPrecond's default: the zero one-hot, i.e. the null label
                class_labels = torch.full_like(c_noise, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ConfigError("class labels were passed to an unconditional SongUNet; set model.net.num_classes")
        if augment_labels is not None:
            if self.augment_embedding is None:
                raise ConfigError("augmentation labels were passed but model.net.augment_dim=0; set it to their size")
            emb = emb + self.augment_embedding(augment_labels.to(emb.dtype))
        emb = self.mapping(emb)

        h = self.stem(x)
        skips, aux = [h], x
        for level in self.encoder:
            if level.down is not None:
                h = level.down(h, emb)
                if self.encoder_type == "skip":
                    aux = level.aux_resample(aux)
                    h = h + level.aux_conv(aux)
                elif self.encoder_type == "residual":
                    h = aux = (h + level.aux_conv(aux)) * SKIP_SCALE
                skips.append(h)
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)

        out = None
        for level in self.decoder:
            for block in level.entry:
                h = block(h, emb)
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.head is not None:
                y = level.head(h)
                out = y if out is None else y + self.upsample_output(out)
        return out


def _check_config(*, in_channels, image_size, num_classes, augment_dim, model_channels, channel_mult,
                  channel_mult_emb, channel_mult_noise, num_blocks, attn_resolutions, dropout,
                  embedding_type, encoder_type, decoder_type, resample_filter, levels, resolutions, **_):
    """Every impossible value, named by its config key, before any layer is built."""
    def fail(key, value, allowed):
        raise ConfigError(f"model.net.{key}={value!r}: {allowed}")

    for key, value in dict(in_channels=in_channels, image_size=image_size, model_channels=model_channels,
                           channel_mult_emb=channel_mult_emb, channel_mult_noise=channel_mult_noise).items():
        if value < 1:
            fail(key, value, "must be a positive integer")
    for key, value in dict(num_classes=num_classes, augment_dim=augment_dim, num_blocks=num_blocks).items():
        if value < 0:
            fail(key, value, "must be ≥ 0 (0 = none)")
    if levels == 0 or any(m < 1 for m in channel_mult):
        fail("channel_mult", list(channel_mult), "a non-empty list of positive integers")
    if image_size % 2 ** (levels - 1):
        fail("image_size", image_size, f"cannot be halved {levels - 1} times (channel_mult has {levels} levels); "
             f"use a multiple of {2 ** (levels - 1)}")
    if embedding_type not in EMBEDDING_TYPES:
        fail("embedding_type", embedding_type, f"allowed: {', '.join(EMBEDDING_TYPES)}")
    if encoder_type not in ENCODER_TYPES:
        fail("encoder_type", encoder_type, f"allowed: {', '.join(ENCODER_TYPES)}")
    if decoder_type not in DECODER_TYPES:
        fail("decoder_type", decoder_type, f"allowed: {', '.join(DECODER_TYPES)}")
    if not 0 <= dropout < 1:
        fail("dropout", dropout, "a probability in [0, 1)")
    if len(resample_filter) < 2 or len(resample_filter) % 2 or sum(resample_filter) <= 0:
        fail("resample_filter", list(resample_filter), "an even-length FIR filter with positive sum, e.g. [1, 1] or [1, 3, 3, 1]")
    missing = [r for r in attn_resolutions if r not in resolutions]
    if missing:
        fail("attn_resolutions", list(attn_resolutions), f"{missing} not among this net's resolutions {resolutions}")
    noise_ch = model_channels * channel_mult_noise
    if noise_ch % 2 or (embedding_type == "positional" and noise_ch < 4):
        fail("model_channels", model_channels, f"model_channels × channel_mult_noise = {noise_ch} must be even "
             "(sin and cos halves), and ≥ 4 for the positional embedding")
