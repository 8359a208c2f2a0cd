"""Latent-space test data in the real on-disk formats: a small, randomly initialised AutoencoderKL saved as diffusers
saves one, labelled image folders, and latent folders written by the real encoder (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 16      # pixels; the tiny VAE halves once: 8x8x4 latents
LATENT_SIZE = 8


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE)


def write_vae(folder: Path) -> Path:
    """config.json + diffusion_pytorch_model.safetensors, as `AutoencoderKL.save_pretrained` writes them."""
    tiny_vae().save_pretrained(folder)
    return folder


def write_class_folders(root: Path, classes: int = 3, per_class: int = 6, size: int = IMAGE_SIZE,
                        odd_size: bool = False) -> Path:
    """ImageNet's layout: <root>/<class>/<class>_<i>.png, each class a different mean colour (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size + 6, size + 2, 3) if odd_size else (size, size, 3)
            base = np.full(shape, 40 + 80 * c, dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"n{c:08d}" / f"n{c:08d}_{i}.png")
    return root


def write_latents(tmp: Path, classes: int = 3, per_class: int = 6, dtype: str = "float32") -> dict[str, Path]:
    """{'images', 'vae', 'latents'}: a labelled image folder, a saved tiny VAE, and the latent folder
    scripts/encode_latents.py writes from them."""
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        import encode_latents
    finally:
        sys.path.remove(str(scripts))
    images = write_class_folders(tmp / "images", classes, per_class)
    vae = write_vae(tmp / "vae")
    out = tmp / "latents"
    code = encode_latents.main(["--images", str(images), "--labels", "subfolder", "--resolution", str(IMAGE_SIZE),
                                "--vae", str(vae), "--out", str(out), "--batch-size", "5", "--dtype", dtype,
                                "--device", "cpu", "--workers", "0"])
    assert code == 0
    return {"images": images, "vae": vae, "latents": out}


def latent_overrides(paths: dict[str, Path], classes: int = 3) -> list[str]:
    """Overrides that train dataset=imagenet256_latents on `write_latents`' folder."""
    return ["dataset=imagenet256_latents", f"dataset.root={paths['latents']}", f"dataset.image_size={LATENT_SIZE}",
            f"dataset.num_classes={classes}", f"dataset.loader.reference_root={paths['images']}"]
