"""Readers for the supported on-disk formats. Each returns `InMemoryImages` (uint8, on CPU)."""
from __future__ import annotations

import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffrun.data.base import InMemoryImages
from diffrun.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_digits(image_size: int = 16, random_flip: bool = False) -> InMemoryImages:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download), resized to `image_size`."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8)[:, None]
    images = _resize_uint8(images, image_size)
    return InMemoryImages(images, "digits", random_flip, labels=torch.from_numpy(digits.target))


# --- CIFAR -----------------------------------------------------------------------------------------
CIFAR = {
    # name: (folder in the archive, train files, label key, archive url, archive name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], b"fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz"),
}
CIFAR_TEST_FILES = {"cifar10": ["test_batch"], "cifar100": ["test"]}
CIFAR_SPLITS = ("train", "test")
CIFAR_SHAPE = (3, 32)   # (channels, image size) of every CIFAR image; the loader does not resize


def cifar_paths(release: str, root: str, split: str = "train") -> list[Path]:
    """The batch files `load_cifar` reads: `<root>/<folder in the archive>/<file>`."""
    folder, train_files = CIFAR[release][:2]
    files = train_files if split == "train" else CIFAR_TEST_FILES[release]
    return [Path(root).expanduser() / folder / f for f in files]


def _download_cifar(name: str, root: Path) -> None:
    folder, _, _, url, archive = CIFAR[name]
    root.mkdir(parents=True, exist_ok=True)
    target = root / archive
    tmp = target.with_suffix(".part")
    urllib.request.urlretrieve(url, tmp)  # noqa: S310 — fixed https URL of the official release
    os.replace(tmp, target)
    with tarfile.open(target) as tar:
        tar.extractall(root, filter="data")


def load_cifar(release: str, root: str, split: str = "train", download: bool = True,
               random_flip: bool = True, limit: int | None = None) -> InMemoryImages:
    """The official python-pickle release of CIFAR-10/100, read from `root/<folder>/`."""
    name = release
    if name not in CIFAR:
        raise ConfigError(f"dataset.loader.release={name!r}: allowed {', '.join(CIFAR)}")
    if split not in CIFAR_SPLITS:
        raise ConfigError(f"dataset.loader.split={split!r}: allowed {', '.join(CIFAR_SPLITS)}")
    folder, _, label_key, url, archive = CIFAR[name]
    root_path = Path(root).expanduser()
    paths = cifar_paths(name, root, split)
    files = [p.name for p in paths]
    if not all(p.exists() for p in paths) and download:
        try:
            _download_cifar(name, root_path)
        except Exception as exc:  # offline machines and compute nodes: say exactly what to provide
            missing = [str(p) for p in paths if not p.exists()]
            raise DataError(
                f"{name} not found and could not be downloaded ({type(exc).__name__}: {exc}).\n"
                f"Missing: {', '.join(missing)}\n"
                f"Fix: download {url} on a machine with internet and extract it so that "
                f"{root_path / folder}/ holds {', '.join(files)}, e.g.\n"
                f"    tar -xzf {archive} -C {root_path}\n"
                f"or point dataset.loader.root=/path/containing/{folder}"
            ) from exc
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"{name} not found: missing {', '.join(missing)}. Extract {archive} ({url}) into "
            f"{root_path}, or set dataset.loader.root to the folder that contains {folder}/ "
            f"(or dataset.loader.download=true to fetch it when online)"
        )
    chunks, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            chunks.append(data.reshape(-1, CIFAR_SHAPE[0], CIFAR_SHAPE[1], CIFAR_SHAPE[1]))
            labels.append(np.asarray(entry[label_key]))
        except Exception as exc:
            raise DataError(
                f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}); "
                f"the file may be truncated: re-extract {archive}"
            ) from exc
    images = torch.from_numpy(np.concatenate(chunks))
    targets = torch.from_numpy(np.concatenate(labels))
    if limit:
        images, targets = images[:limit], targets[:limit]
    return InMemoryImages(images, f"{name}-{split}", random_flip, labels=targets)


# --- image folders ---------------------------------------------------------------------------------
def load_image_folder(root: str, image_size: int, channels: int = 3, random_flip: bool = True,
                      resize: bool = False) -> InMemoryImages:
    """Every PNG/JPEG under `root` (recursively). Images must already be `image_size` square unless
    `resize=true`, in which case they are resized (no crop) to it."""
    from PIL import Image

    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset.root={root_path} is not a directory; point it at a folder of PNG/JPEG images")
    files = sorted(p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root_path}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ConfigError(f"dataset.channels={channels}: allowed 1 or 3")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (image_size, image_size):
                    if not resize:
                        raise DataError(
                            f"{path} is {img.size[0]}x{img.size[1]}, expected {image_size}x{image_size}; "
                            f"resize the images or set dataset.loader.resize=true"
                        )
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                arrays.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); remove or replace it") from exc
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return InMemoryImages(images, f"image_folder:{root_path.name}", random_flip)
