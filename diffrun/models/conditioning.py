"""What every diffrun backbone is called with, and the embeddings of its conditioning inputs.

The call contract (shared by the U-Net, DiT, Min-SNR's ViT and EDM's SongUNet):

    net(x, c_noise, class_labels=None, augment_labels=None) -> Tensor shaped like x

    x               (B, C, H, W)  the network input (the noisy image or latent, scaled by the Denoiser)
    c_noise         (B,)          the noise level, c_noise = −λ/8 = ln(σ)/4 with σ EDM's noise level
                                  (Karras et al. 2022, arXiv:2206.00364, Table 1); `Denoiser` computes it
    class_labels    (B,) int64    values in [0, num_classes]; the value `num_classes` is the NULL label
                                  (no class: what classifier-free guidance contrasts with). None means
                                  every sample is null. A net built with num_classes = 0 is unconditional
                                  and accepts only None.
    augment_labels  (B, A)        EDM's augmentation labels; a net without augmentation conditioning
                                  raises if it is given any.

Label dropout for classifier-free guidance (DiT's `token_drop`, Min-SNR's `drop_label_prob`) is the
trainer's job: it replaces dropped labels with `num_classes` before calling the net. Nets never drop
labels themselves, so train and eval mode compute the same function.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffrun.errors import ConfigError


def check_num_classes(num_classes: int, where: str = "model.net") -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"{where}.num_classes={num_classes!r}: must be an integer >= 0 (0 = unconditional)")


def reject_augment_labels(augment_labels: Tensor | None, net: nn.Module) -> None:
    if augment_labels is not None:
        raise ValueError(f"{type(net).__name__} has no augmentation conditioning; it was given augment_labels")


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t·f_k), sin(t·f_k)] with f_k = max_period^(−k/(dim/2)), k < dim/2 (GLIDE/ADM; DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    features = torch.cat([angles.cos(), angles.sin()], dim=1)
    return nn.functional.pad(features, (0, dim % 2))


class LabelEmbedding(nn.Module):
    """A table of num_classes + 1 rows: one per class and the NULL row `num_classes` (DiT's LabelEmbedder with
    its classifier-free-guidance row, Peebles & Xie 2023, arXiv:2212.09748 §3.2). None → the NULL row."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: Tensor | None, batch_size: int) -> Tensor:
        if class_labels is None:
            class_labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        return self.table(class_labels)


def check_class_labels(class_labels: Tensor | None, num_classes: int, batch_size: int, net: nn.Module) -> None:
    """Checks that need no device sync; values outside [0, num_classes] are caught by nn.Embedding itself."""
    if class_labels is None:
        return
    if num_classes == 0:
        raise ValueError(f"{type(net).__name__} was built unconditional (num_classes=0) but was given class_labels")
    if class_labels.shape != (batch_size,) or class_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"class_labels must be an integer tensor of shape ({batch_size},), got "
                         f"{tuple(class_labels.shape)} {class_labels.dtype}")
