"""FID and KID of generated images against a reference set, computed by torch-fidelity.

torch-fidelity does the arithmetic (resize, Inception, statistics, KID subsets); this module only
feeds it uint8 images and names the reference side so that its features are computed once per
(dataset, split, contents, weights, extractor) and read from disk afterwards. Repeated evaluations
during training then pay only for the generated samples. Against a statistics file (mu, sigma of a
published reference set; reference.py) only the generated side goes through Inception, and the
Fréchet distance is torch-fidelity's formula in float64.

Cache files (torch-fidelity writes them under `<cache_dir>/fidelity/`):
    diffrun-<reference_name>-<N>x<C>x<H>x<W>-<data sha1[:12]>-w<weights sha256[:8]>
        -<extractor>-features-2048.pt     (KID; FID reads its statistics from the next one)
        -<extractor>-stat-fid-2048.pt
A changed reference set or weights file gets a new name, so a stale entry is never read back.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from typing import Callable

import numpy as np
import torch
import torch_fidelity
import torch_fidelity.utils
from torch.utils.data import Dataset
from torch_fidelity.generative_model_base import GenerativeModelBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from diffrun.errors import ConfigError
from diffrun.evaluation.inception import (HeadlessInceptionError, InceptionWeights, default_cache_dir,
                                          resolve_inception_weights)
from diffrun.evaluation.reference import FEATURE_DIM, ReferenceStatistics
from diffrun.monitoring.progress import duration

KID_SUBSET_SIZE_MAX = 1000   # torch-fidelity's default, the KID paper's (arXiv:1801.01401) choice
log = logging.getLogger(__name__)


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inception sees RGB: a grey channel is repeated, as torchvision's Grayscale(3) would."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images N x {{1,3}} x H x W, got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class UInt8Images(Dataset):
    """An in-memory N x C x H x W uint8 tensor as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = _as_rgb(images).cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class ReferenceImages(UInt8Images):
    """The reference side on its first, uncached pass through Inception (minutes on a CPU for a whole training
    set): a log line every `every_s` seconds with the count, images/s and an ETA. torch-fidelity reads the items
    in order, one batch at a time, in this process (`save_cpu_ram=True`: no loader workers)."""

    every_s = 10.0

    def __init__(self, images: torch.Tensor):
        super().__init__(images)
        self.start = self.last_log = None

    def __getitem__(self, index: int) -> torch.Tensor:
        now = time.monotonic()
        if index == 0:
            self.start = self.last_log = now
        elif now - self.last_log >= self.every_s:
            self.last_log = now
            rate = index / (now - self.start)
            log.info("reference statistics: %d/%d images (%.0f%%), %.1f images/s, ETA %s", index, len(self),
                     100 * index / len(self), rate, duration((len(self) - index) / rate))
        return super().__getitem__(index)


class SampledImages(GenerativeModelBase):
    """Generated images drawn batch by batch from `sample_fn(n) -> n x C x H x W uint8`, so that
    50k samples never sit in memory at once. torch-fidelity's noise `z` only sets the batch size;
    seeding is the sampler's business."""

    def __init__(self, sample_fn: Callable[[int], torch.Tensor], num_samples: int):
        super().__init__()
        self.sample_fn, self.num_samples = sample_fn, int(num_samples)

    z_size = property(lambda self: 1)
    z_type = property(lambda self: "normal")
    num_classes = property(lambda self: 0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        images = self.sample_fn(z.shape[0])
        if images.shape[0] != z.shape[0]:
            raise ValueError(f"sample_fn({z.shape[0]}) returned {images.shape[0]} images")
        return _as_rgb(images).to(z.device)


def reference_cache_name(reference: torch.Tensor, reference_name: str, weights: InceptionWeights) -> str:
    """The input2 cache name: who the reference is, what it contains, which weights saw it."""
    if not re.fullmatch(r"[A-Za-z0-9._]+(-[A-Za-z0-9._]+)*", reference_name):
        raise ConfigError(f"reference_name={reference_name!r}: use letters, digits, '.', '_' and '-', "
                          f"e.g. 'cifar10-train'")
    data = hashlib.sha1(reference.contiguous().cpu().numpy().tobytes()).hexdigest()[:12]
    shape = "x".join(str(s) for s in reference.shape)
    return f"diffrun-{reference_name}-{shape}-{data}-w{weights.digest}"


def compute_fid_kid(generated: torch.Tensor | Dataset | SampledImages,
                    reference: torch.Tensor, *,
                    reference_name: str,
                    weights_path: str | os.PathLike | InceptionWeights | None = None,
                    batch_size: int = 64,
                    device: str = "cpu",
                    kid: bool = True,
                    kid_subset_size: int | None = None,
                    kid_subsets: int = 100,
                    isc: bool = False,
                    cache_dir: str | os.PathLike | None = None,
                    verbose: bool = False) -> dict[str, float | int]:
    """FID (and KID, ISC on request) of `generated` against the uint8 tensor `reference`.

    `generated`: an N x {1,3} x H x W uint8 tensor, a Dataset of 3 x H x W uint8 tensors, or
    `SampledImages`. `reference_name` names dataset and split ("cifar10-train"); `weights_path=None`
    resolves the Inception weights (inception.py). `kid_subset_size=None`: min(1000, both sizes).
    Returns fid, kid_mean, kid_std, num_samples, num_reference (+ isc_mean, isc_std).
    """
    weights = _weights(weights_path, cache_dir)
    if isc and not weights.has_classifier_head:
        raise HeadlessInceptionError(f"isc=True needs Inception weights with the classifier head; "
                                     f"{weights.path} ({weights.source}) has none. FID/KID work without it.")
    if isinstance(generated, torch.Tensor):
        generated = UInt8Images(generated)
    num_samples = generated.num_samples if isinstance(generated, SampledImages) else len(generated)
    num_reference = reference.shape[0]
    if kid_subset_size is None:
        kid_subset_size = min(KID_SUBSET_SIZE_MAX, num_samples, num_reference)
    if kid and kid_subset_size > min(num_samples, num_reference):
        raise ConfigError(f"kid_subset_size={kid_subset_size} exceeds the number of samples ({num_samples}) "
                          f"or reference images ({num_reference})")

    cache_root, cache_name = default_cache_dir(cache_dir) / "fidelity", reference_cache_name(reference, reference_name, weights)
    cached = any(cache_root.glob(f"{cache_name}-*.pt"))
    if not cached:
        log.info("Inception statistics of the %d reference images: computed now (once), cached as %s/%s-*.pt",
                 num_reference, cache_root, cache_name)
    start = time.monotonic()
    with _on_device(device) as cuda:
        metrics = torch_fidelity.calculate_metrics(
            input1=generated,
            input1_model_num_samples=num_samples,
            input2=UInt8Images(reference) if cached else ReferenceImages(reference),
            input2_cache_name=cache_name,
            cache=True,
            cache_root=str(cache_root),
            feature_extractor=weights.feature_extractor,
            feature_extractor_weights_path=str(weights.path),
            fid=True, kid=kid, isc=isc,
            kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
            batch_size=batch_size, cuda=cuda,
            save_cpu_ram=True,   # images are in memory already: DataLoader worker processes only add forks
            verbose=verbose,
        )
    if not cached:
        log.info("reference statistics and %d samples through Inception in %s", num_samples,
                 duration(time.monotonic() - start))
    out = {"fid": metrics[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        out["kid_mean"] = metrics[torch_fidelity.KEY_METRIC_KID_MEAN]
        out["kid_std"] = metrics[torch_fidelity.KEY_METRIC_KID_STD]
    if isc:
        out["isc_mean"] = metrics[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = metrics[torch_fidelity.KEY_METRIC_ISC_STD]
    return {**out, "num_samples": num_samples, "num_reference": num_reference}


def compute_fid_kid_from_sampler(sample_fn: Callable[[int], torch.Tensor], num_samples: int,
                                 reference: torch.Tensor, **kwargs) -> dict[str, float | int]:
    """`compute_fid_kid` with generated images pulled from `sample_fn(n)` in batches of `batch_size`."""
    return compute_fid_kid(SampledImages(sample_fn, num_samples), reference, **kwargs)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017, arXiv:1706.08500), by torch-fidelity in float64
    (the statistics files mix float32 and float64; torch-fidelity requires one dtype)."""
    as64 = lambda mu, sigma: {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}  # noqa: E731
    return fid_statistics_to_metric(as64(mu1, sigma1), as64(mu2, sigma2), False)[torch_fidelity.KEY_METRIC_FID]


def compute_fid_against_statistics(generated: torch.Tensor | Dataset | SampledImages,
                                   reference: ReferenceStatistics, *,
                                   weights_path: str | os.PathLike | InceptionWeights | None = None,
                                   batch_size: int = 64,
                                   device: str = "cpu",
                                   cache_dir: str | os.PathLike | None = None) -> dict[str, float | int]:
    """FID of `generated` (as in `compute_fid_kid`) against the mu, sigma of a statistics file. No KID: the
    file has no features. Returns fid, num_samples."""
    weights = _weights(weights_path, cache_dir)
    if isinstance(generated, torch.Tensor):
        generated = UInt8Images(generated)
    with _on_device(device) as cuda:
        extractor = torch_fidelity.utils.create_feature_extractor(
            weights.feature_extractor, [str(FEATURE_DIM)], cuda=cuda,
            feature_extractor_weights_path=str(weights.path), verbose=False)
        if isinstance(generated, SampledImages):
            features = torch_fidelity.utils.get_featuresdict_from_generative_model(
                generated, extractor, generated.num_samples, batch_size, cuda, rng_seed=2020, verbose=False)
        else:
            features = torch_fidelity.utils.get_featuresdict_from_dataset(
                generated, extractor, batch_size, cuda, save_cpu_ram=True, verbose=False)
    statistics = fid_features_to_statistics(features[str(FEATURE_DIM)])
    fid = frechet_distance(statistics["mu"], statistics["sigma"], reference.mu, reference.sigma)
    return {"fid": fid, "num_samples": int(features[str(FEATURE_DIM)].shape[0])}


def _weights(weights_path, cache_dir) -> InceptionWeights:
    if isinstance(weights_path, InceptionWeights):
        return weights_path
    if weights_path is None:
        return resolve_inception_weights(cache_dir=cache_dir)
    return resolve_inception_weights(weights_path)


@contextlib.contextmanager
def _on_device(device: str):
    """torch-fidelity knows only `cuda=True` (the current device); 'cuda:1' selects the current one."""
    device = torch.device(device)
    if device.type == "cpu":
        yield False
    elif device.type == "cuda":
        with torch.cuda.device(device.index if device.index is not None else torch.cuda.current_device()):
            yield True
    else:
        raise ConfigError(f"device={device}: torch-fidelity runs on 'cpu' or 'cuda[:N]' only")
