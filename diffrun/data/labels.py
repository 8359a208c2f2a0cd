"""Class labels in training and sampling: label dropout for classifier-free guidance, and class-balanced labels.

The null label is `num_classes` (diffrun/models/conditioning.py: the extra row of every label table).
"""
from __future__ import annotations

import torch
from torch import Tensor


def drop_labels(labels: Tensor, probability: float, null_label: int) -> Tensor:
    """Each label replaced by the null label with `probability` (DiT's `token_drop`, class_dropout_prob 0.1;
    Min-SNR's `drop_label_prob` 0.15), on the device, without a host sync. p = 0 draws nothing."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def balanced_labels(count: int, num_classes: int, seed: int) -> Tensor:
    """`count` labels with every class equally often (to within one): arange(count) % K, in the order of a
    permutation seeded by `seed` (CPU, int64). For FID-50k on ImageNet: 50 images of every class."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(count) % num_classes)[order]
