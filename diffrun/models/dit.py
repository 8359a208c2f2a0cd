"""DiT with adaLN-Zero (Peebles & Xie 2023, arXiv:2212.09748; facebookresearch/DiT `models.py`).

Latent (or pixel) patches + fixed 2-D sin-cos positions go through `depth` transformer blocks whose
LayerNorms are modulated by the conditioning vector c = noise embedding (+ label embedding): each block
regresses shift, scale and a residual gate from c, zero-initialised, so every block starts as the
identity and the zero-initialised final layer makes the untrained net output 0 (§3.2, "adaLN-Zero").

Differences from the official code, all deliberate:
* `learn_sigma` as in the official code: 2C output channels, the prediction and IDDPM's variance v
  (diffrun/models/learned_variance.py); the model configs set it, as DiT trains. Parameters (DiT-XL/2):
  ours 674,834,720 with learn_sigma (674,816,272 without); official learn_sigma=True 675,129,632 (675M in
  the paper), which counts the frozen positional table (294,912 values) that we keep as a buffer.
  docs/networks.md has all sizes.
* The noise level: DiT embeds the integer DDPM step t ∈ [0, 1000) with GLIDE's sinusoid (periods up to
  10,000). We embed t' = noise_scale · c_noise with the same sinusoid, c_noise = ln(σ)/4 = −λ/8.
  With noise_scale = 1000, one unit of λ moves t' by 125 — between the ≈52 (linear schedule, averaged
  over its λ range) and ≈160 (cosine, at λ = 0) DDPM steps per unit of λ that DiT's t sees — so the
  frequencies resolve noise levels about as finely as in DiT; and t' is continuous, so any schedule or
  sampler can drive it.
* Labels: the table always has the NULL row (DiT adds it only when class_dropout_prob > 0) and label
  dropout is the trainer's (see `conditioning`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffrun.errors import ConfigError
from diffrun.models.checks import require_float, require_int
from diffrun.models.conditioning import (
    LabelEmbedding,
    check_class_labels,
    check_num_classes,
    reject_augment_labels,
    timestep_features,
)
from diffrun.models.transformer_layers import Attention, Mlp, PatchEmbedding, sincos_positions_2d, unpatchify

# DiT paper Table 1: (depth, hidden size, heads) per model size.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCH_SIZES = (2, 4, 8)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift  # adaLN: γ = 1 + scale, β = shift (arXiv:2212.09748 §3.2)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias="qkv")
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate="tanh")
        self.modulation = nn.Linear(dim, 6 * dim)  # SiLU(c) → shift, scale, gate for attention, then for the MLP

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond))[:, None].chunk(6, dim=2)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(cond))[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer; called as `net(x, c_noise, class_labels=None)` (see `conditioning`)."""

    def __init__(
        self,
        in_channels: int = 4,          # latent channels (SD-VAE: 4) or image channels
        image_size: int = 32,          # input height = width (256-px images → 32 latents)
        patch_size: int = 2,           # p: tokens = (image_size / p)²
        hidden_size: int = 1152,       # token width
        depth: int = 28,               # DiT blocks
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,          # 0: unconditional; else labels in [0, num_classes], num_classes = NULL
        noise_scale: float = 1000.0,   # t' = noise_scale · c_noise is what the sinusoid sees (module docstring)
        frequency_dim: int = 256,      # sinusoidal features of t' before the MLP (DiT's frequency_embedding_size)
        learn_sigma: bool = False,     # twice the output channels: the prediction and IDDPM's variance v (DiT: True)
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                           ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                           ("frequency_dim", frequency_dim)):
            require_int(key, value)
        require_float("mlp_ratio", mlp_ratio, 0.0, low_open=True)
        require_float("noise_scale", noise_scale, 0.0, low_open=True)
        check_num_classes(num_classes)
        if image_size % patch_size:
            raise ConfigError(f"model.net.patch_size={patch_size} does not divide model.net.image_size={image_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ConfigError(f"model.net.hidden_size={hidden_size}: must be divisible by 4 (2-D sin-cos positions) "
                              f"and by model.net.num_heads={num_heads}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.noise_scale, self.frequency_dim = num_classes, noise_scale, frequency_dim

        self.patch_embed = PatchEmbedding(in_channels, hidden_size, patch_size)
        self.register_buffer("pos_embed", sincos_positions_2d(hidden_size, image_size // patch_size)[None], persistent=False)
        self.noise_embed = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's `initialize_weights`: Xavier for linear maps (the patch conv as a linear map), N(0, 0.02²) for
        the label table and the noise MLP, zeros for every modulation and the output layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        nn.init.normal_(self.noise_embed[0].weight, std=0.02)
        nn.init.normal_(self.noise_embed[2].weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        reject_augment_labels(augment_labels, self)
        check_class_labels(class_labels, self.num_classes, x.shape[0], self)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DiT was built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x) + self.pos_embed
        cond = self.noise_embed(timestep_features(self.noise_scale * c_noise, self.frequency_dim))
        if self.label_embed is not None:
            cond = cond + self.label_embed(class_labels, x.shape[0])
        for block in self.blocks:
            tokens = block(tokens, cond)
        return unpatchify(self.final(tokens, cond), self.out_channels, self.patch_size, *x.shape[-2:])


def dit_variant(variant: str, **kwargs) -> DiT:
    """A DiT by its paper name, "DiT-XL/2" (size S|B|L|XL, patch 2|4|8); kwargs set the rest."""
    name = variant.removeprefix("DiT-")
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCH_SIZES:
        allowed = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCH_SIZES)
        raise ConfigError(f"model.net.variant={variant!r}: allowed {allowed}")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    return DiT(patch_size=int(patch), depth=depth, hidden_size=hidden_size, num_heads=num_heads, **kwargs)
