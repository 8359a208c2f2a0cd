"""EDM's non-leaking augmentation (Karras et al. 2022, arXiv:2206.00364; NVlabs/edm `training/augment.py`, after
ADA, Karras et al. 2020, arXiv:2006.06676).

Each image is transformed with probability p × (the transform's multiplier), and the network is told what was done
(`augment_labels`, one row per image). Sampling passes no labels, which the network reads as "not augmented", so
the augmentations do not leak into the generated images. The transforms EDM's `train.py` switches on for CIFAR-10,
in its order, with their labels:

    xflip           mirror x                               label  f_x ∈ {0, 1}
    yflip           mirror y                               label  f_y ∈ {0, 1}
    scale           zoom by 2^(0.2·w), w ~ N(0, 1)          label  w
    rotate_frac     rotate by θ ~ U(−π, π)                  labels cos θ − 1, sin θ
    aniso           stretch 2^(0.2·w) / shrink along r      labels w cos r, w sin r
    translate_frac  shift by 0.125·(W, H)·(u, v), N(0, 1)   labels u, v

A transform not applied to an image gets the identity parameter (w = 0, θ = 0, ...), so its labels are 0. The
geometric ones are composed into one inverse matrix G⁻¹ per image and resampled once: reflect-pad, 2× upsample
with the Symlet-6 low-pass filter, bilinear `grid_sample`, filter and 2× downsample (ADA's anti-aliased warp).

The random parameters are drawn on the CPU, in EDM's order and shapes, so (i) on the CPU a seed gives EDM's
augmentations exactly, and (ii) the padding the warp needs is known without reading the GPU back (the training
step stays free of host syncs). Only the images live on the device. EDM's colour transforms and integer
rotations/translations (off in its `train.py`) are not implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffrun.errors import ConfigError

# Symlet-6 decomposition low-pass filter (Daubechies 1992; PyWavelets `pywt.Wavelet("sym6").dec_lo`).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
FILTER_MARGIN = len(SYM6) // 4          # output pixels the filter's support reaches beyond the image, per side
PAD_STEP = 4                            # the reflect padding is a multiple of this (few shapes for cuDNN to tune)

TRANSFORMS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")
LABELS_PER_TRANSFORM = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}


# --- 3×3 homogeneous matrices, one per image (N, 3, 3) ------------------------------------------------
def _matrices(rows: list[list[Tensor | float]], n: int) -> Tensor:
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).expand(n) for v in row], -1)
                        for row in rows], -2)


def scaling(sx: Tensor | float, sy: Tensor | float, n: int) -> Tensor:
    return _matrices([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], n)


def inverse_scaling(sx: Tensor | float, sy: Tensor | float, n: int) -> Tensor:
    """The inverse of `scaling(sx, sy)`."""
    return scaling(1 / sx, 1 / sy, n)


def rotation(theta: Tensor, n: int) -> Tensor:
    """Counter-clockwise by θ in (x, y) pixel coordinates."""
    cos, sin = theta.cos(), theta.sin()
    return _matrices([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], n)


def translation(tx: Tensor | float, ty: Tensor | float, n: int) -> Tensor:
    return _matrices([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], n)


@dataclass
class AugmentDraw:
    """The random part of one batch's augmentation (CPU tensors)."""

    xflip: Tensor | None        # (N,) bool: mirror x
    yflip: Tensor | None        # (N,) bool: mirror y
    warp: Tensor | None         # (N, 3, 3) G⁻¹: output pixel → input pixel, centred coordinates; None: no warp
    labels: Tensor              # (N, label_dim) float32


class AugmentPipe:
    """EDM's AugmentPipe restricted to the transforms its `train.py` uses; `__call__(images) → (images, labels)`."""

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0,
                 scale_std: float = 0.2, rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125):
        values = dict(p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                      translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                      aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"augment.{key}={value!r}: allowed a finite number >= 0")
        for key in ("p", "aniso_rotate_prob"):
            if values[key] > 1:
                raise ConfigError(f"augment.{key}={values[key]}: a probability, allowed [0, 1]")
        self.p = float(p)
        self.multipliers = {name: float(values[name]) for name in TRANSFORMS}   # probability multipliers
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @property
    def enabled(self) -> list[str]:
        """The transforms that run (multiplier > 0), in EDM's order; each adds its labels."""
        return [name for name in TRANSFORMS if self.multipliers[name] > 0]

    @property
    def label_dim(self) -> int:
        return sum(LABELS_PER_TRANSFORM[name] for name in self.enabled)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n, _, height, width = images.shape
        draw = self.draw(n, height, width, generator)
        return self.apply(images, draw), to_device(draw.labels, images.device)

    # --- the random parameters (CPU) --------------------------------------------------------------
    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> AugmentDraw:
        """Parameters for `n` images, drawn from the CPU generator in EDM's order."""
        def rand(*shape):
            return torch.rand(shape, generator=generator)

        def randn(*shape):
            return torch.randn(shape, generator=generator)

        def applied(name: str, *shape) -> Tensor:       # this image gets the transform: u < p × multiplier
            return rand(*shape) < self.multipliers[name] * self.p

        labels: list[Tensor] = []
        flips: dict[str, Tensor | None] = {"xflip": None, "yflip": None}
        for name in ("xflip", "yflip"):
            if self.multipliers[name] > 0:
                flip = torch.randint(2, (n,), generator=generator)
                flips[name] = (flip * applied(name, n)).bool()
                labels.append(flips[name].float())

        warp = None
        geometric = [name for name in ("scale", "rotate_frac", "aniso", "translate_frac") if self.multipliers[name] > 0]
        if geometric:
            warp = torch.eye(3).expand(n, 3, 3)
        if "scale" in geometric:
            w = randn(n) * applied("scale", n)
            s = torch.exp2(w * self.scale_std)
            warp = warp @ inverse_scaling(s, s, n)                               # inverse of a zoom by s
            labels.append(w)
        if "rotate_frac" in geometric:
            theta = (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max)
            theta = theta * applied("rotate_frac", n)
            warp = warp @ rotation(theta, n)                                     # inverse of a rotation by −θ
            labels += [theta.cos() - 1, theta.sin()]
        if "aniso" in geometric:
            w, r = randn(n), (rand(n) * 2 - 1) * math.pi
            w = w * applied("aniso", n)
            r = r * (rand(n) < self.aniso_rotate_prob)
            s = torch.exp2(w * self.aniso_std)
            warp = warp @ rotation(-r, n) @ inverse_scaling(s, 1 / s, n) @ rotation(r, n)  # inverse of R(r) diag(s, 1/s) R(−r)
            labels += [w * r.cos(), w * r.sin()]
        if "translate_frac" in geometric:
            uv = randn(2, n) * applied("translate_frac", 1, n)
            warp = warp @ translation(-uv[0] * width * self.translate_frac_std,
                                      -uv[1] * height * self.translate_frac_std, n)
            labels += [uv[0], uv[1]]
        labels = torch.stack(labels, 1) if labels else torch.zeros(n, 0)
        return AugmentDraw(xflip=flips["xflip"], yflip=flips["yflip"], warp=warp, labels=labels.float())

    # --- the images (any device) -----------------------------------------------------------------
    def apply(self, images: Tensor, draw: AugmentDraw) -> Tensor:
        device = images.device
        for flip, dim in ((draw.xflip, 3), (draw.yflip, 2)):
            if flip is not None:
                images = torch.where(to_device(flip, device).view(-1, 1, 1, 1), images.flip(dim), images)
        if draw.warp is not None:               # as EDM: every image is resampled once a warp is enabled
            images = warp_images(images, draw.warp)
        return images


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device` without making the host wait: a CUDA copy is asynchronous from pinned memory only
    (from pageable memory it waits for the stream)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def warp_images(images: Tensor, inverse: Tensor) -> Tensor:
    """Resample each image at G⁻¹ (CPU (N, 3, 3), output pixel → input pixel, origin at the image centre) with
    ADA's anti-aliased warp: reflect-pad as far as the warped corners reach, upsample 2×, bilinear lookup,
    downsample 2×, both with the Symlet-6 low-pass filter."""
    n, channels, height, width = images.shape
    cx, cy = (width - 1) / 2, (height - 1) / 2

    # How far outside the image the warped corners (plus the filter's reach) sample: the reflect padding.
    corners = torch.tensor([[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]]).t()
    reach = (inverse @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)            # (xy, N·4)
    margin = torch.cat([-reach, reach]).amax(1)                                 # left, top, right, bottom
    margin = margin + torch.tensor([2 * FILTER_MARGIN - cx, 2 * FILTER_MARGIN - cy] * 2)
    # One pad for both sides of an axis, rounded up to a multiple of PAD_STEP: a handful of padded shapes, not one per
    # batch, so that cuDNN's autotuner (cudnn.benchmark) times the filters' convolutions once per shape. Padding more
    # than the corners reach changes no sampled pixel; the centre stays where it was.
    margin = margin.clamp(min=0).view(2, 2).amax(0)                             # x, y
    pad_x, pad_y = (min(size - 1, PAD_STEP * math.ceil(float(v) / PAD_STEP)) for v, size in zip(margin, (width, height)))
    images = F.pad(images, [pad_x, pad_x, pad_y, pad_y], mode="reflect")

    # 2× upsampling (zero insertion + the time-reversed filter), then the same map in the finer pixel grid.
    images = _upsample2x(images)
    inverse = scaling(2.0, 2.0, n) @ inverse @ inverse_scaling(2.0, 2.0, n)
    inverse = translation(-0.5, -0.5, n) @ inverse @ translation(0.5, 0.5, n)

    # Bilinear lookup on the output grid (the image plus the filter margin, at 2×), in grid_sample's [−1, 1] units.
    out_shape = [n, channels, (height + 2 * FILTER_MARGIN) * 2, (width + 2 * FILTER_MARGIN) * 2]
    inverse = (scaling(2 / images.shape[3], 2 / images.shape[2], n) @ inverse
               @ inverse_scaling(2 / out_shape[3], 2 / out_shape[2], n))
    grid = F.affine_grid(to_device(inverse[:, :2, :], images.device), out_shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Filter and keep every other pixel, then crop the margin.
    return _downsample2x(images)[:, :, FILTER_MARGIN:-FILTER_MARGIN, FILTER_MARGIN:-FILTER_MARGIN]


def _filter(images: Tensor, reverse: bool) -> Tensor:
    taps = torch.tensor(SYM6[::-1] if reverse else SYM6, dtype=images.dtype, device=images.device)
    return taps.view(1, 1, -1).repeat(images.shape[1], 1, 1)                    # (C, 1, taps): one per channel


def _upsample2x(images: Tensor) -> Tensor:
    n, c, h, w = images.shape
    taps, pad = _filter(images, reverse=True), (len(SYM6) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], 4).reshape(n, c, h, 2 * w)[..., :-1]
    images = F.conv2d(images, taps.unsqueeze(2), groups=c, padding=(0, pad))                  # along x
    images = torch.stack([images, torch.zeros_like(images)], 3).reshape(n, c, 2 * h, -1)[:, :, :-1]
    return F.conv2d(images, taps.unsqueeze(3), groups=c, padding=(pad, 0))                     # along y


def _downsample2x(images: Tensor) -> Tensor:
    c = images.shape[1]
    taps, pad = _filter(images, reverse=False), (len(SYM6) - 1) // 2
    images = F.conv2d(images, taps.unsqueeze(2), groups=c, stride=(1, 2), padding=(0, pad))   # along x
    return F.conv2d(images, taps.unsqueeze(3), groups=c, stride=(2, 1), padding=(pad, 0))      # along y


def check_settings(augment: dict, net: dict, model_name: str) -> None:
    """With augmentation on, the network must take its labels, exactly as many as the enabled transforms give."""
    if augment['p'] == 0:
        if (net.get("augment_dim") or 0) > 0:
            raise ConfigError(f"model.net.augment_dim={net['augment_dim']} but augment.p=0: the network would "
                              f"never be given augmentation labels; set augment.p>0 (EDM: 0.12) or "
                              f"model.net.augment_dim=0")
        return
    pipe = AugmentPipe(**augment)
    if "augment_dim" not in net:
        raise ConfigError(f"augment.p={augment['p']} needs a network that takes augmentation labels "
                          f"(model.net.augment_dim, EDM's SongUNet: model=edm_ddpmpp_cifar10); model={model_name} "
                          f"has none; set augment.p=0")
    if net['augment_dim'] != pipe.label_dim:
        raise ConfigError(f"model.net.augment_dim={net['augment_dim']} but the enabled augmentations "
                          f"({', '.join(pipe.enabled)}) give {pipe.label_dim} labels: set "
                          f"model.net.augment_dim={pipe.label_dim}")
