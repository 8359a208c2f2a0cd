#!/usr/bin/env python
"""Encode a dataset into SD-VAE latents once, offline, for `dataset=imagenet256_latents` (docs/data.md).

Every image is encoded twice, as it is and mirrored, with diffusers' AutoencoderKL; the latents are multiplied
by the VAE's scale factor (0.18215 for SD-VAE) and written, memory-mappable, with the labels and a meta.json
(diffrun/data/latents.py describes the folder).

    # ImageNet train (class sub-folders), ADM centre crop to 256 px, the VAE Min-SNR's sampler decodes with:
    python scripts/encode_latents.py --images /data/imagenet/train --labels subfolder --resolution 256 \\
        --vae stabilityai/sd-vae-ft-mse --out /data/imagenet256_latents --device cuda --batch-size 128
    # CIFAR-10's python release, or the ImageNet 64x64 npz release, at their own resolution:
    python scripts/encode_latents.py --cifar ~/data/cifar --release cifar10 --vae /models/sd-vae-ft-mse --out ...
    python scripts/encode_latents.py --imagenet64 /data/imagenet64 --vae ... --out ...

The VAE comes from a local folder or the Hugging Face cache; `--download` lets diffusers fetch it (online only).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffrun.data.latents import DTYPES, POSTERIORS, encode_images, load_vae  # noqa: E402
from diffrun.data.cifar import load_cifar  # noqa: E402
from diffrun.data.loaders import LABELS, load_image_folder, load_imagenet64  # noqa: E402
from diffrun.errors import DiffrunError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument("--cifar", help="the folder that contains cifar-10-batches-py/ or cifar-100-python/")
    source.add_argument("--imagenet64", help="the Imagenet64 npz release or a 64-px image folder")
    parser.add_argument("--labels", choices=LABELS, default="subfolder", help="--images: where class labels come from")
    parser.add_argument("--release", choices=("cifar10", "cifar100"), default="cifar10")
    parser.add_argument("--split", default="train")
    parser.add_argument("--resolution", type=int, default=256, help="--images: ADM centre crop to this size")
    parser.add_argument("--vae", required=True, help="a Hugging Face id in the local cache, or a folder")
    parser.add_argument("--download", action="store_true", help="let diffusers download the VAE (online only)")
    parser.add_argument("--out", required=True, help="the latent folder to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--posterior", choices=POSTERIORS, default="sample",
                        help="one draw of the VAE posterior (DiT) or its mean")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior draws")
    parser.add_argument("--scale-factor", type=float, default=None, help="default: the VAE config's (0.18215 for SD)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding worker processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.images:
            source = load_image_folder(args.images, args.resolution, 3, random_flip=False, center_crop=True,
                                       labels=args.labels)
        elif args.cifar:
            source = load_cifar(args.release, args.cifar, args.split, download=False, random_flip=False)
        else:
            source = load_imagenet64(args.imagenet64, args.split, random_flip=False)
        if args.download:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae).to(args.device).eval().requires_grad_(False)
        else:
            vae = load_vae(args.vae, args.device, key="--vae")
        meta = encode_images(source, vae, args.out, vae_name=args.vae, batch_size=args.batch_size, dtype=args.dtype,
                             posterior=args.posterior, seed=args.seed, workers=args.workers,
                             scale_factor=args.scale_factor, log_every=100,
                             description=args.images or args.cifar or args.imagenet64)
    except DiffrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
