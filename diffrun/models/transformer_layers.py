"""Pieces shared by the transformer backbones (DiT, Min-SNR's ViT): patches in and out, fixed 2-D
positions, self-attention and the feed-forward MLP, with parameter names that say what they are."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbedding(nn.Module):
    """Non-overlapping p×p patches → tokens (B, H/p · W/p, dim), row-major over the patch grid (ViT, arXiv:2010.11929)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(tokens: Tensor, channels: int, patch_size: int, height: int, width: int) -> Tensor:
    """(B, h·w, p·p·C) with channels fastest → (B, C, h·p, w·p): the inverse of PatchEmbedding's layout (DiT, MAE)."""
    b, p = tokens.shape[0], patch_size
    h, w = height // p, width // p
    x = tokens.reshape(b, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * p, w * p)


def sincos_positions_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos positions (grid_size², dim), as MAE's `get_2d_sincos_pos_embed` that DiT uses:
    [sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)] with ω_k = 10000^(−k/(dim/4)), k < dim/4."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention, q k v from one projection, computed by `scaled_dot_product_attention`.

    qkv_bias: "qkv" one bias for q, k and v (timm's Attention, used by DiT);
              "qv"  BEiT's q and v biases with no k bias (Min-SNR's ViT): softmax is invariant to a key bias,
                    so leaving it out changes nothing but the parameter count.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: str = "qkv"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        elif qkv_bias != "qkv":
            raise ValueError(f"qkv_bias={qkv_bias!r}: allowed 'qkv', 'qv'")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        bias = self.qkv.bias
        if bias is None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """The transformer feed-forward block: Linear → GELU → Linear (hidden width = mlp_ratio · dim)."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
