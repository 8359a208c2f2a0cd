"""The ViT that Min-SNR trains (Hang et al. 2023, arXiv:2303.09556; TiankaiHang/Min-SNR-Diffusion-Training
`guided_diffusion/vision_transformer.py`, models `vit_base_patch2_32`, `vit_xl_patch2_32`, `vit_large_patch4_64`).

A plain BEiT/timm-style pre-norm ViT with in-context conditioning (DiT's term, arXiv:2212.09748 §3.2): the
noise level and the class label are two extra tokens in front of the patch tokens, all with a learned
position embedding; no long skips, no adaLN. Its details, each as in the official code:
* attention with q and v biases and no k bias (BEiT); exact GELU MLP (ratio 4); LayerNorm eps 1e-6;
* no final LayerNorm (the official `use_mean_pooling=True` default turns it into an Identity) — the
  patch tokens go straight into one Linear to p·p·C values per patch;
* init: every Linear N(0, 0.02²) truncated at ±2, then the residual branches' output projections scaled
  by 1/√(2·layer) (`fix_init_weight`), the output Linear scaled by `init_scale` = 0.001; the patch conv
  keeps PyTorch's default; the label and noise tables N(0, 1) (nn.Embedding's default).

The noise token. The official net looks up the integer DDPM step t ∈ [0, 1000) of the cosine schedule in a
table of `num_steps` = 4000 rows (rows ≥ 1000 are never used but counted). `noise_embedding="table"` keeps
that table and turns c_noise back into a step: σ = e^{4·c_noise} (EDM's σ = e^{−λ/2}), t = the step whose
cosine-schedule σ_t is nearest — what the official EDM sampler does with `round_sigma` (scripts_vit/
sampler_edm.py: argmin |σ − u_j|). It quantises σ to the 1000 σ_t of the cosine schedule whatever
schedule trains the net. `noise_embedding="sinusoidal"`
instead embeds t' = noise_scale · c_noise with DiT's sinusoid + MLP (continuous; not the official net).
"""
from __future__ import annotations

import math

import torch
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
from diffrun.models.transformer_layers import Attention, Mlp, PatchEmbedding, unpatchify
from diffrun.schedules import CosineSchedule

NOISE_EMBEDDINGS = ("table", "sinusoidal")


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias="qv")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Min-SNR's ViT; called as `net(x, c_noise, class_labels=None)` (see `conditioning`)."""

    no_weight_decay_names = ("pos_embed",)  # a learned positional table (see training.optim.decays)

    def __init__(
        self,
        in_channels: int = 4,              # SD-VAE latents: 4; pixels: 3
        image_size: int = 32,              # input height = width
        patch_size: int = 2,
        hidden_size: int = 768,            # base 768, large 1024, xl 1152
        depth: int = 12,                   # set per run by the official scripts (--depth)
        num_heads: int = 12,               # base 12, large and xl 16
        mlp_ratio: float = 4.0,
        num_classes: int = 0,              # 0: unconditional (no label token)
        noise_embedding: str = "table",    # table (official) | sinusoidal
        table_rows: int = 4000,            # rows of the noise table (official `num_steps` = 4000)
        num_timesteps: int = 1000,         # DDPM steps of the cosine schedule the table is indexed by
        noise_scale: float = 1000.0,       # sinusoidal only: t' = noise_scale · c_noise (as in DiT)
        init_scale: float = 0.001,         # output Linear scaled by this at init
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                           ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                           ("table_rows", table_rows), ("num_timesteps", num_timesteps)):
            require_int(key, value)
        require_float("mlp_ratio", mlp_ratio, 0.0, low_open=True)
        require_float("noise_scale", noise_scale, 0.0, low_open=True)
        require_float("init_scale", init_scale, 0.0)
        check_num_classes(num_classes)
        if noise_embedding not in NOISE_EMBEDDINGS:
            raise ConfigError(f"model.net.noise_embedding={noise_embedding!r}: allowed {', '.join(NOISE_EMBEDDINGS)}")
        if noise_embedding == "table" and table_rows < num_timesteps:
            raise ConfigError(f"model.net.table_rows={table_rows} must be >= model.net.num_timesteps={num_timesteps}")
        if image_size % patch_size:
            raise ConfigError(f"model.net.patch_size={patch_size} does not divide model.net.image_size={image_size}")
        if hidden_size % num_heads:
            raise ConfigError(f"model.net.hidden_size={hidden_size} is not divisible by model.net.num_heads={num_heads}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.num_classes, self.noise_embedding, self.noise_scale = num_classes, noise_embedding, noise_scale
        self.num_extra_tokens = 1 + (num_classes > 0)

        self.patch_embed = PatchEmbedding(in_channels, hidden_size, patch_size)
        num_tokens = (image_size // patch_size) ** 2 + self.num_extra_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))
        self.blocks = nn.ModuleList([ViTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.out = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self._init_weights(init_scale)
        # created after the init above, so they keep nn.Embedding's N(0, 1) as in the official code
        if noise_embedding == "table":
            self.noise_embed = nn.Embedding(table_rows, hidden_size)
            with torch.device("cpu"):   # a host-side table, also when the net is built on the meta device
                logsnr = CosineSchedule().discrete_logsnr(num_timesteps).float()  # λ_t, t = 0..T−1 (guided-diffusion's index)
            self.register_buffer("timestep_logsnr", logsnr, persistent=False)
        else:
            self.noise_embed = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            for layer in (self.noise_embed[0], self.noise_embed[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes else None

    def _init_weights(self, init_scale: float) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:  # the qkv Linear has none (q_bias, v_bias start at 0)
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
            self.out.weight.mul_(init_scale)
            self.out.bias.mul_(init_scale)

    def timestep(self, c_noise: Tensor) -> Tensor:
        """The DDPM step whose cosine-schedule σ_t = e^{−λ_t/2} is nearest to σ = e^{4·c_noise} (the official
        `round_sigma` picks the nearest σ; the nearest λ differs for σ between two levels near their λ midpoint)."""
        if self.noise_embedding != "table":
            raise ValueError("ViT.timestep is the step lookup of noise_embedding='table'")
        dtype = torch.float32 if c_noise.device.type == "mps" else torch.float64   # float32 ties levels far off the grid
        sigma = torch.exp(4 * c_noise.to(dtype))
        return (torch.exp(-self.timestep_logsnr.to(dtype) / 2)[None] - sigma[:, None]).abs().argmin(dim=1)

    def _noise_token(self, c_noise: Tensor) -> Tensor:
        if self.noise_embedding == "table":
            return self.noise_embed(self.timestep(c_noise))
        return self.noise_embed(timestep_features(self.noise_scale * c_noise, 256))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        reject_augment_labels(augment_labels, self)
        check_class_labels(class_labels, self.num_classes, x.shape[0], self)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"ViT was built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        patches = self.patch_embed(x)
        extra = [self._noise_token(c_noise)]
        if self.label_embed is not None:
            extra.append(self.label_embed(class_labels, x.shape[0]))
        tokens = torch.cat([torch.stack(extra, dim=1).to(patches.dtype), patches], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        out = self.out(tokens[:, self.num_extra_tokens:])
        return unpatchify(out, self.in_channels, self.patch_size, *x.shape[-2:])
