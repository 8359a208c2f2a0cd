"""How an image file becomes a square uint8 array of the training resolution, in the papers' own ways."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# dataset.loader.preprocess of image folders
EXACT = "exact"              # the image must already be image_size × image_size
RESIZE = "resize"            # resized (no crop) to image_size × image_size, bicubic
CENTER_CROP = "center_crop"  # ADM's center_crop_arr (guided-diffusion, DiT, Min-SNR's ImageNet): shorter side → size, centre crop
PREPROCESS = (EXACT, RESIZE, CENTER_CROP)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 batch (N, C, H, W) (the embedded digits)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr` (also DiT's): halve with a BOX filter while the shorter side is at
    least 2·size, resize bicubically so that the shorter side is `size`, then crop the centre."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def central_crop_resize(image: Image.Image, crop: int, size: int) -> np.ndarray:
    """ScoreSDE's CelebA preprocessing (yang-song/score_sde datasets.py: `central_crop(img, 140)` then
    `resize_small(img, 64)`, antialiased bilinear): a crop × crop centre square, resized to size × size."""
    width, height = image.size
    top, left = (height - crop) // 2, (width - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image.resize((size, size), resample=Image.BILINEAR))  # PIL antialiases when shrinking
