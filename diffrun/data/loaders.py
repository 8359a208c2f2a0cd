"""Readers for the supported on-disk formats (`dataset.loader._target_`). Each returns a `Source`; reading the
pixels waits for the placement where the format allows (image files are decoded when they are needed).

    load_digits        scikit-learn's bundled digits (no download)
    load_cifar         CIFAR-10/100, the official python-pickle release (diffrun/data/cifar.py)
    load_image_folder  any folder of PNG/JPEG images, optionally labelled by sub-folder or EDM's dataset.json
    load_imagenet64    downsampled ImageNet 64×64: the `Imagenet64_train_npz` release, or an image folder
    load_celeba        CelebA aligned images with ScoreSDE's 140-px centre crop
    load_latents       precomputed SD-VAE latents (diffrun/data/latents.py, scripts/encode_latents.py)
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from diffrun.checks import POSITIVE, check_choice, check_number, show
from diffrun.config import NOT_TRAINED
from diffrun.data.base import ArraySource, Source, seeded_subset
from diffrun.data.loader_checks import LoaderChecks, Needs, checked_by
from diffrun.data.transforms import center_crop_arr, central_crop_resize, resize_uint8
from diffrun.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABELS = ("none", "subfolder", "dataset_json")   # dataset.loader.labels of image folders


def _digits_values(spec: dict, dataset: dict) -> None:
    check_choice("dataset.channels", dataset["channels"], (1, 3))
    if dataset["channels"] != 1:
        raise ConfigError(f"dataset.channels={dataset['channels']}: the digits are grayscale; allowed 1")


def _rgb(name: str):
    def check(spec: dict, dataset: dict) -> None:
        check_choice("dataset.channels", dataset["channels"], (1, 3))
        if dataset["channels"] != 3:
            raise ConfigError(f"dataset.channels={dataset['channels']}: {name} is RGB; allowed 3")
    return check


def _folder_exists(what: str):
    def check(spec: dict, dataset: dict, key: str, needs: Needs) -> None:
        if not Path(spec["root"]).expanduser().is_dir():
            raise DataError(f"{key}={show(spec['root'])} is not a directory; allowed {what}")
    return check


@checked_by(LoaderChecks(values=_digits_values, labels=True))
def load_digits(image_size: int = 16, random_flip: bool = False) -> ArraySource:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, labels 0-9, no download), resized to `image_size`."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8)[:, None]
    return ArraySource(resize_uint8(images, image_size), "digits", random_flip, labels=digits.target)


# --- image files -----------------------------------------------------------------------------------
class ImageFileSource(Source):
    """Image files decoded on access (by the stream's workers, or all at once for placement=device)."""

    def __init__(self, files: list[Path], name: str, image_size: int, channels: int = 3, random_flip: bool = True,
                 labels: np.ndarray | None = None, resize: bool = False, center_crop: bool = False,
                 central_crop: int | None = None):
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise ConfigError(f"dataset.channels={channels}: allowed 1 or 3")
        if not files:
            raise DataError(f"dataset {name}: no images")
        self.files, self.name, self.mode, self.random_flip, self.labels = files, name, mode, random_flip, labels
        self.image_size, self.resize, self.center_crop, self.central_crop = image_size, resize, center_crop, central_crop
        self.shape = (channels, image_size, image_size)
        self.preprocess = (f"central_crop_{central_crop}_resize" if central_crop else "center_crop" if center_crop
                           else "resize" if resize else "exact")

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image

        size = self.image_size
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                if self.central_crop:
                    return central_crop_resize(img, self.central_crop, size)
                if self.center_crop:
                    return center_crop_arr(img, size)
                if img.size != (size, size):
                    if not self.resize:
                        raise DataError(f"{path} is {img.size[0]}x{img.size[1]}, expected {size}x{size}; resize the "
                                        f"images, or set dataset.loader.resize=true (no crop) or "
                                        f"dataset.loader.center_crop=true")
                    img = img.resize((size, size), Image.BICUBIC)
                return np.asarray(img, dtype=np.uint8)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); remove or replace it") from exc

    def item(self, index: int, flip: bool) -> torch.Tensor:
        array = self._read(self.files[index]).reshape(self.image_size, self.image_size, self.shape[0])
        image = torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # PIL's arrays are read-only
        return image.flip(-1) if flip else image

    def materialize(self, workers: int = 0) -> torch.Tensor:
        """Every image decoded into one uint8 tensor, by `workers` DataLoader processes (ImageNet has 1.28M files)."""
        from torch.utils.data import DataLoader

        images = torch.empty((len(self), *self.shape), dtype=torch.uint8)
        loader = DataLoader(_Decoded(self), batch_size=256, num_workers=workers, generator=torch.Generator())
        start = 0
        for batch in loader:
            images[start:start + len(batch)] = batch
            start += len(batch)
        return images

    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.shape)) + (0 if self.labels is None else 8 * len(self))

    def reference_images(self, count: int, seed: int) -> torch.Tensor:
        index = seeded_subset(len(self), count, seed)
        chosen = range(len(self)) if index is None else index.tolist()
        return torch.stack([self.item(i, False) for i in chosen])


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, source: ImageFileSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.source.item(index, False)


def image_files(root: Path, key: str = "dataset.root") -> list[Path]:
    """Every image under `root`, recursively, in sorted order."""
    if not root.is_dir():
        raise DataError(f"{key}={root} is not a directory; point it at a folder of PNG/JPEG images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def folder_labels(root: Path, files: list[Path], labels: str) -> np.ndarray | None:
    """Class labels of image files: `subfolder` (torchvision's ImageFolder: sorted names of the first-level
    folders → 0..K−1; ImageNet's train/n01440764/...), `dataset_json` (EDM's dataset_tool: {"labels":
    [[relative path, label], ...]}), or `none`."""
    if labels not in LABELS:
        raise ConfigError(f"dataset.loader.labels={labels!r}: allowed {', '.join(LABELS)}")
    if labels == "none":
        return None
    if labels == "subfolder":
        classes = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
        if None in classes:
            loose = files[classes.index(None)]
            raise DataError(f"{loose} is not inside a class folder; dataset.loader.labels=subfolder needs "
                            f"{root}/<class>/<image> for every image")
        index = {name: i for i, name in enumerate(sorted(set(classes)))}
        return np.array([index[c] for c in classes], dtype=np.int64)
    meta = root / "dataset.json"
    try:
        table = dict(json.loads(meta.read_text())["labels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta}: cannot read EDM's {{'labels': [[file, label], ...]}} ({type(exc).__name__}: {exc}); "
                        f"dataset.loader.labels=dataset_json needs it") from exc
    missing = [p for p in files if p.relative_to(root).as_posix() not in table]
    if missing:
        raise DataError(f"{meta} has no label for {missing[0].relative_to(root).as_posix()} "
                        f"({len(missing)} images without a label)")
    return np.array([table[p.relative_to(root).as_posix()] for p in files], dtype=np.int64)


def _image_folder_values(spec: dict, dataset: dict) -> None:
    check_choice("dataset.channels", dataset["channels"], (1, 3))
    check_choice("dataset.loader.labels", spec.get("labels", "none"), LABELS)
    if spec.get("resize") and spec.get("center_crop"):
        raise ConfigError("dataset.loader.resize=true and dataset.loader.center_crop=true: allowed one of them")


def _image_folder_files(spec: dict, dataset: dict, key: str, needs: Needs) -> None:
    root, kinds = Path(spec["root"]).expanduser(), "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
    if not root.is_dir():
        raise DataError(f"{key}={show(spec['root'])} is not a directory; allowed a folder of {kinds} images")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")):
        raise DataError(f"{key}={show(spec['root'])} holds no images; allowed a folder of {kinds} images "
                        f"(searched recursively)")


@checked_by(LoaderChecks(values=_image_folder_values, files=_image_folder_files,
                         labels=lambda spec: spec.get("labels", "none") != "none"))
def load_image_folder(root: Annotated[str, NOT_TRAINED], image_size: int, channels: int = 3, random_flip: bool = True,
                      resize: bool = False, center_crop: bool = False, labels: str = "none") -> ImageFileSource:
    """Every PNG/JPEG under `root` (recursively). Images must already be `image_size` square, unless
    `resize=true` (resized without a crop) or `center_crop=true` (ADM's centre crop)."""
    if resize and center_crop:
        raise ConfigError("dataset.loader.resize=true and dataset.loader.center_crop=true: choose one")
    root_path = Path(root).expanduser()
    files = image_files(root_path)
    return ImageFileSource(files, f"image_folder:{root_path.name}", image_size, channels, random_flip,
                           folder_labels(root_path, files, labels), resize=resize, center_crop=center_crop)


# --- ImageNet 64×64 ---------------------------------------------------------------------------------
def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """The shape of one array in an .npz, read from its header (the array itself is not loaded)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(fh)
    return shape


class NpzImagesSource(ArraySource):
    """The downsampled-ImageNet npz release (Chrabaszcz et al. 2017, arXiv:1707.08819): files with `data`
    (N, 3·S·S) uint8, one RGB plane after the other, and `labels` 1..1000. Read when placed."""

    def __init__(self, files: list[Path], name: str, image_size: int, random_flip: bool):
        self.files, self.name, self.random_flip, self.image_size = files, name, random_flip, image_size
        self.shape = (3, image_size, image_size)
        self.count = 0
        for path in files:
            try:
                rows, width = _npz_shape(path, "data")
            except Exception as exc:
                raise DataError(f"{path} is not a readable ImageNet npz batch with a 'data' array "
                                f"({type(exc).__name__}: {exc}); re-download or re-extract it") from exc
            if width != 3 * image_size * image_size:
                raise DataError(f"{path} holds {width}-value rows, {3 * image_size * image_size} expected for "
                                f"{image_size}x{image_size} RGB images: set dataset.image_size to its resolution")
            self.count += rows
        self._images: torch.Tensor | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.count

    def _load(self) -> None:
        chunks, labels = [], []
        for path in self.files:
            with np.load(path) as batch:
                chunks.append(torch.from_numpy(batch["data"]).view(-1, *self.shape))
                labels.append(np.asarray(batch["labels"], dtype=np.int64) - 1)   # the release counts classes from 1
        self._images, self._labels = torch.cat(chunks), np.concatenate(labels)

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._load()
        return self._images

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._load()
        return self._labels

    def nbytes(self) -> int:
        return self.count * (int(np.prod(self.shape)) + 8)


# The npz release cannot be centre-cropped after the fact: its publishers resized every whole image to 64 px.
NPZ_NOT_CENTRE_CROPPED = (
    "ImageNet-64 from the downsampled-ImageNet npz release: its publishers resized each whole image (no crop), "
    "while EDM's dataset_tool and ADM centre-crop, so FID against their reference statistics compares different "
    "data; for those, point dataset.root at the full-size ImageNet folder (centre-cropped here) or at EDM's "
    "dataset_tool output")


def _imagenet64_values(spec: dict, dataset: dict) -> None:
    check_choice("dataset.loader.split", spec.get("split", "train"), ("train", "val"))
    _rgb("ImageNet")(spec, dataset)


@checked_by(LoaderChecks(values=_imagenet64_values, labels=True,
                         files=_folder_exists("the folder docs/data.md describes for dataset=imagenet64")))
def load_imagenet64(root: Annotated[str, NOT_TRAINED], split: str = "train", image_size: int = 64, random_flip: bool = True) -> Source:
    """ImageNet at 64×64, labels 0..999, from `root` holding either the npz release (`train_data_batch_*.npz`
    (Imagenet64_train_part1/2_npz) or `val_data.npz`) or an image folder: ImageNet's class sub-folders, or EDM's
    dataset_tool output with dataset.json (Min-SNR's 'imagenet-64x64'), centre-cropped as ADM when not 64 px."""
    if split not in ("train", "val"):
        raise ConfigError(f"dataset.loader.split={split!r}: allowed train, val")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"dataset.root={root_path} is not a directory; point it at the Imagenet64 npz files or "
                        f"an image folder (docs/data.md)")
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    npz = sorted(root_path.rglob(pattern), key=lambda p: (len(p.name), p.name))
    if npz:
        logging.getLogger(__name__).warning(NPZ_NOT_CENTRE_CROPPED)
        return NpzImagesSource(npz, f"imagenet{image_size}-{split}", image_size, random_flip)
    files = image_files(root_path)
    labels = "dataset_json" if (root_path / "dataset.json").exists() else "subfolder"
    return ImageFileSource(files, f"imagenet{image_size}-{split}", image_size, 3, random_flip,
                           folder_labels(root_path, files, labels), center_crop=True)


# --- CelebA ----------------------------------------------------------------------------------------
def _celeba_values(spec: dict, dataset: dict) -> None:
    check_choice("dataset.loader.split", spec.get("split", "train"), ("train", "validation", "test"))
    check_number("dataset.loader.crop", spec.get("crop", 140), POSITIVE, integer=True)
    _rgb("CelebA")(spec, dataset)


@checked_by(LoaderChecks(values=_celeba_values, labels=False,
                         files=_folder_exists("the folder docs/data.md describes for dataset=celeba64")))
def load_celeba(root: Annotated[str, NOT_TRAINED], split: str = "train", image_size: int = 64, crop: int = 140,
                random_flip: bool = True) -> ImageFileSource:
    """CelebA's aligned images (`img_align_celeba/*.jpg`, 178×218) of one split of `list_eval_partition.txt`
    (0 train, 1 validation, 2 test), preprocessed as ScoreSDE: a `crop`-px centre square resized to `image_size`."""
    splits = {"train": "0", "validation": "1", "test": "2"}
    if split not in splits:
        raise ConfigError(f"dataset.loader.split={split!r}: allowed {', '.join(splits)}")
    root_path = Path(root).expanduser()
    images, partition = root_path / "img_align_celeba", root_path / "list_eval_partition.txt"
    if not images.is_dir() or not partition.is_file():
        raise DataError(f"dataset.root={root_path} must hold CelebA's img_align_celeba/ and list_eval_partition.txt "
                        f"(the 'Align&Cropped Images' release); missing "
                        f"{images if not images.is_dir() else partition}")
    names = [line.split() for line in partition.read_text().splitlines() if line.strip()]
    files = [images / name for name, part in names if part == splits[split]]
    absent = [p for p in files if not p.exists()]
    if absent:
        raise DataError(f"{partition} lists {absent[0].name}, which is not in {images} ({len(absent)} missing)")
    return ImageFileSource(files, f"celeba{image_size}-{split}", image_size, 3, random_flip, central_crop=crop)


