"""CIFAR-10/100 (Krizhevsky 2009), the official python-pickle release, and what its loader checks.

The batch files are pickles. They are read with an unpickler that builds NumPy arrays and nothing else
(`BatchUnpickler`), so a hostile file in the data folder cannot run code: data is never code.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from diffrun.checks import Interval, check_choice, check_number, show
from diffrun.config import NOT_TRAINED
from diffrun.data.base import ArraySource
from diffrun.data.loader_checks import LoaderChecks, Needs, checked_by
from diffrun.errors import ConfigError, DataError


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: dicts, lists, bytes, numbers and NumPy arrays. Any other global a file names
    (a function, a class to construct) is refused, where `pickle.load` would import and call it."""

    ALLOWED = {*((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar")),      # an array, a NumPy number
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}       # how protocol 2 writes bytes from Python 3: text to bytes, nothing else

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"the file names {module}.{name}, which a CIFAR batch never holds "
                                         f"(a pickle that would run code is refused)")
        return super().find_class(module, name)


CIFAR_RELEASES = ("cifar10", "cifar100")
CIFAR_SPLITS = ("train", "test")
CIFAR_SHAPE = (3, 32)   # (channels, image size) of every CIFAR image; the loader does not resize


def _cifar_release(release: str):
    """torchvision's class for the release: its archive URL, md5 and batch file names."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if release not in CIFAR_RELEASES:
        raise ConfigError(f"dataset.loader.release={release!r}: allowed {', '.join(CIFAR_RELEASES)}")
    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[release]


def cifar_folder(release: str) -> str:
    return _cifar_release(release).base_folder


def cifar_archive(release: str) -> tuple[str, str]:
    """(archive file name, URL) of the official release."""
    kind = _cifar_release(release)
    return kind.filename, kind.url


def cifar_paths(release: str, root: str, split: str = "train") -> list[Path]:
    """The batch files `load_cifar` reads: `<root>/<folder in the archive>/<file>`."""
    kind = _cifar_release(release)
    files = kind.train_list if split == "train" else kind.test_list
    return [Path(root).expanduser() / kind.base_folder / name for name, _md5 in files]


def check_values(spec: dict, dataset: dict) -> None:
    channels, image_size = dataset["channels"], dataset["image_size"]
    check_choice("dataset.loader.release", spec.get("release"), CIFAR_RELEASES)
    check_choice("dataset.loader.split", spec.get("split", "train"), CIFAR_SPLITS)
    check_number("dataset.loader.limit", spec.get("limit"), Interval(0, low_open=True, note="or null: every image"),
                 integer=True)
    if (channels, image_size) != CIFAR_SHAPE:
        key, value = (("dataset.image_size", image_size) if image_size != CIFAR_SHAPE[1]
                      else ("dataset.channels", channels))
        raise ConfigError(f"{key}={value}: CIFAR images are {CIFAR_SHAPE[0]}x{CIFAR_SHAPE[1]}x{CIFAR_SHAPE[1]} "
                          f"and are not resized; allowed dataset.channels={CIFAR_SHAPE[0]}, "
                          f"dataset.image_size={CIFAR_SHAPE[1]}")


def check_files(spec: dict, dataset: dict, key: str, needs: Needs) -> None:
    """The batches are there, or `download=true` fetches them (offline, the loader says what to provide)."""
    folder, archive = cifar_folder(spec["release"]), cifar_archive(spec["release"])[0]
    root = Path(spec["root"]).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset.loader.root={show(spec['root'])} is a file; allowed a folder that contains "
                        f"{folder}/")
    missing = [p for p in cifar_paths(spec["release"], spec["root"], spec.get("split", "train")) if not p.exists()]
    if missing and not spec.get("download", True):
        raise DataError(f"dataset.loader.root={show(spec['root'])} does not hold {folder}/{missing[0].name}: "
                        f"allowed a folder that contains {folder}/ (extract {archive} there), or "
                        f"dataset.loader.download=true to fetch it")


@checked_by(LoaderChecks(values=check_values, files=check_files, labels=True))
def load_cifar(release: str, root: Annotated[str, NOT_TRAINED], split: str = "train",
               download: Annotated[bool, NOT_TRAINED] = True, random_flip: bool = True,
               limit: int | None = None) -> ArraySource:
    """The official python-pickle release of CIFAR-10/100, read from `root/<folder>/`; with `download`, a missing
    release is fetched by torchvision, which verifies the archive's md5 before extracting it."""
    kind = _cifar_release(release)
    if split not in CIFAR_SPLITS:
        raise ConfigError(f"dataset.loader.split={split!r}: allowed {', '.join(CIFAR_SPLITS)}")
    root_path = Path(root).expanduser()
    paths = cifar_paths(release, root, split)
    archive, url = cifar_archive(release)
    if not all(p.exists() for p in paths) and download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(kind.url, str(root_path), filename=kind.filename, md5=kind.tgz_md5)
        except Exception as exc:  # offline machines and compute nodes: say exactly what to provide
            missing = [str(p) for p in paths if not p.exists()]
            raise DataError(
                f"{release} not found and could not be downloaded ({type(exc).__name__}: {exc}).\n"
                f"Missing: {', '.join(missing)}\n"
                f"Fix: download {url} on a machine with internet and extract it so that "
                f"{root_path / kind.base_folder}/ holds {', '.join(p.name for p in paths)}, e.g.\n"
                f"    tar -xzf {archive} -C {root_path}\n"
                f"or point dataset.loader.root=/path/containing/{kind.base_folder}"
            ) from exc
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"{release} not found: missing {', '.join(missing)}. Extract {archive} ({url}) into "
            f"{root_path}, or set dataset.loader.root to the folder that contains {kind.base_folder}/ "
            f"(or dataset.loader.download=true to fetch it when online)"
        )
    label_key = b"labels" if release == "cifar10" else b"fine_labels"
    chunks, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                entry = BatchUnpickler(fh, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            chunks.append(data.reshape(-1, CIFAR_SHAPE[0], CIFAR_SHAPE[1], CIFAR_SHAPE[1]))
            labels.append(np.asarray(entry[label_key]))
        except Exception as exc:
            raise DataError(
                f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}); "
                f"the file may be truncated: re-extract {archive}"
            ) from exc
    images = torch.from_numpy(np.concatenate(chunks))
    targets = np.concatenate(labels)
    if limit:
        images, targets = images[:limit], targets[:limit]
    return ArraySource(images, f"{release}-{split}", random_flip, labels=targets)
