"""The reference side of FID: training images, or a published statistics file.

Images: the whole training set unless `eval.num_reference` asks for a seeded subset, whatever the number
of samples (FID is biased by the smaller of the two sets, so a reference that shrinks with the samples
changes the number). Data sources that know their own reference set offer `reference_images(count, seed)`;
others are read through their in-memory `images`.

Statistics files (`eval.reference_stats`) hold the mean `mu` (2048,) and covariance `sigma` (2048, 2048)
of Inception-v3's pool features over a reference set. Formats read:

    .npz   keys `mu`, `sigma`: NVlabs/edm `fid.py ref` (e.g. cifar10-32x32.npz), TTUR / pytorch-fid
           (fid_stats_cifar10_train.npz, what tqch/ddpm-torch downloads), and openai/guided-diffusion
           reference batches (VIRTUAL_*.npz: `mu`, `sigma` are read; `arr_0`, `mu_s`, `sigma_s` are not)
    .pt    torch-fidelity's cached statistics, `<name>-<extractor>-stat-fid-2048.pt` ({"mu", "sigma"})

A file has no features, so KID cannot be computed against it.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffrun.errors import ConfigError

FEATURE_DIM = 2048                  # Inception-v3 pool_3, the features FID is defined on
SUBSET_SEED = 0                     # which training images form a reference of eval.num_reference


@dataclass(frozen=True)
class ReferenceStatistics:
    mu: np.ndarray                  # (2048,) float64
    sigma: np.ndarray               # (2048, 2048) float64
    path: Path
    sha256: str
    format: str                     # "npz" | "torch-fidelity"


def read_reference_statistics(path: str | os.PathLike, key: str = "eval.reference_stats") -> ReferenceStatistics:
    """The statistics in `path`, checked: shapes (2048,) and (2048, 2048), finite, symmetric covariance.
    Raises a ConfigError naming `key` and what is wrong."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such file; allowed an .npz with mu and sigma (EDM, ADM, TTUR) "
                          f"or torch-fidelity's *-stat-fid-2048.pt")
    stat = path.stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns, key)


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int, key: str) -> ReferenceStatistics:
    where = f"{key}={path!r}"
    arrays, kind = _load_arrays(Path(path), where)
    missing = [name for name in ("mu", "sigma") if name not in arrays]
    if missing:
        held = ", ".join(sorted(arrays)) or "nothing"
        raise ConfigError(f"{where} has no {' and no '.join(missing)} (it holds {held}); allowed a statistics file "
                          f"with mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM})")
    mu, sigma = (np.asarray(arrays[name]) for name in ("mu", "sigma"))
    for name, value, shape in (("mu", mu, (FEATURE_DIM,)), ("sigma", sigma, (FEATURE_DIM, FEATURE_DIM))):
        if value.shape != shape or not np.issubdtype(value.dtype, np.floating):
            raise ConfigError(f"{where}: {name} is {value.dtype} {value.shape}, expected float {shape}: statistics of "
                              f"Inception-v3's {FEATURE_DIM}-d pool features (a file for other features or layers "
                              f"cannot be compared with ours)")
        if not np.isfinite(value).all():
            raise ConfigError(f"{where}: {name} has NaN or infinite entries")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * np.abs(sigma).max()):
        raise ConfigError(f"{where}: sigma is not symmetric, so it is not a covariance matrix")
    for value in (mu, sigma):
        value.setflags(write=False)
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return ReferenceStatistics(mu, sigma, Path(path), digest, kind)


def _load_arrays(path: Path, where: str) -> tuple[dict, str]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:      # lazy: ADM's image array is never read
                return {name: data[name] for name in ("mu", "sigma") if name in data.files} | \
                       {name: None for name in data.files if name not in ("mu", "sigma")}, "npz"
        if path.suffix == ".pt":
            core = getattr(np, "_core", None) or np.core
            allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype,
                       type(np.dtype(np.float32)), type(np.dtype(np.float64))]
            with torch.serialization.safe_globals(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict):
                raise ConfigError(f"{where} holds a {type(data).__name__}, not torch-fidelity's {{'mu', 'sigma'}}")
            return {k: v.numpy() if torch.is_tensor(v) else v for k, v in data.items()}, "torch-fidelity"
    except ConfigError:
        raise
    except Exception as exc:  # a damaged zip, a pickle with other objects, ...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ConfigError(f"{where} cannot be read ({reason})") from None
    raise ConfigError(f"{where}: allowed an .npz (EDM, ADM, TTUR) or a torch-fidelity .pt statistics file")


# ----------------------------------------------------------------------------- training images

def dataset_size(data) -> int:
    return len(data) if hasattr(data, "__len__") else int(data.images.shape[0])


def check_reference_count(data, num_reference: int | None, dataset_name: str) -> int:
    """How many training images the reference holds: `num_reference`, or all. ConfigError if there are fewer."""
    available = dataset_size(data)
    if num_reference is not None and num_reference > available:
        raise ConfigError(f"eval.num_reference={num_reference} exceeds the {available} training images of dataset "
                          f"{dataset_name}; allowed at most {available}, or null for all of them")
    return available if num_reference is None else num_reference


def reference_images(data, count: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """`count` training images as uint8 (N, C, H, W) on the CPU: all of them, or a subset drawn with `seed`
    (kept in dataset order), as the data source gives them (diffrun/data/base.py)."""
    return data.reference_images(count, seed)
