"""One FID/KID evaluation of a model, and the protocol written beside its numbers.

    samples     `eval.num_samples` EMA samples per repeat, from `eval.sampler` / `eval.steps` /
                `eval.precision` / guidance (`run.generate(..., "eval")`), one seed per image (EDM's
                StackedRandomGenerator idea): image i of repeat r uses seed `eval.seed + r·N + i` (N samples per
                repeat), so repeat 0 is the same draw at every evaluation, the repeats never share a seed, and
                the set does not depend on `eval.batch_size` or on the number of ranks
    ranks       under DDP every rank samples its share, `eval.batch_size` images at a time, and rank 0 gathers
                them in seed order and computes the metrics; no rank waits for a whole evaluation of another
    reference   the whole training set, `eval.num_reference` images of it (seed 0), or the statistics file
                `eval.reference_stats` (its path and SHA-256 recorded)
    repeats     `eval.repeats` FIDs; `fid` is their minimum (EDM, arXiv:2206.00364, reports the min of 3
                FID-50k), `fid_mean` their mean, `fid_values` each one; KID is that of the repeat whose FID is
                reported, `kid_values` each repeat's
    KID         subsets of `eval.kid_subset_size` (1000, torch-fidelity's default), bounded by the sample and
                reference counts (recorded as `kid_subset_size`, with `kid_note` when bounded); none against a
                statistics file

The record keeps the flat keys the report and W&B read (fid, kid_mean, fid_num_samples, fid_sampler, ...) and
adds `protocol` (a dict of everything above) and `fid_protocol`, a one-line label such as
"FID-50k vs cifar10 train (50000 images), heun 18 steps (35 NFE), fp32, min of 3".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

import torch

from diffrun import distributed
from diffrun.data import balanced_labels
from diffrun.evaluation.fid import (SampledImages, compute_fid_against_statistics, compute_fid_kid,
                                    compute_fid_kid_from_sampler)
from diffrun.evaluation.inception import InceptionWeights, InceptionWeightsUnavailable, resolve_inception_weights
from diffrun.evaluation.reference import (SUBSET_SEED, check_reference_count, dataset_size, read_reference_statistics,
                                          reference_images)
from diffrun.sampling import SamplerOptions, autocast_dtype
from diffrun.training.run_view import RunView

log = logging.getLogger(__name__)
KID_SUBSETS = 100                  # torch-fidelity's default number of KID subsets
_said: set[str] = set()            # warnings already logged by this process


def _warn_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("%s", message)


def _finite(value):
    """JSON has no inf/NaN: keep them readable as strings."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def image_seeds(eval_cfg, repeat: int) -> range:
    """The seeds of `repeat`'s images, one per image (see the module docstring)."""
    first = eval_cfg.seed + repeat * eval_cfg.num_samples
    return range(first, first + eval_cfg.num_samples)


def reference_set(data, eval_cfg, dataset_cfg, num_samples: int):
    """(split, statistics file or None, reference images or None, KID subset size or None) the evaluation of
    `num_samples` images compares against (module docstring: reference)."""
    split = dataset_cfg.loader.get("split", "train") if "loader" in dataset_cfg else "train"
    if eval_cfg.reference_stats is not None:
        return split, read_reference_statistics(eval_cfg.reference_stats), None, None
    count = check_reference_count(data, eval_cfg.num_reference, dataset_cfg.name)
    reference = reference_images(data, count, SUBSET_SEED)
    return split, None, reference, min(eval_cfg.kid_subset_size, num_samples, reference.shape[0])


def reference_name(dataset_cfg, split: str) -> str:
    return f"{dataset_cfg.name}-{split}-{dataset_cfg.image_size}px"


def evaluate_images(images: torch.Tensor, data, eval_cfg, dataset_cfg, device: str = "cpu") -> dict:
    """FID (and KID against images) of the uint8 `images` against the reference a run of `dataset_cfg` is scored
    against (EDM's `fid.py calc`): the same reference, Inception weights and KID settings as `evaluate`."""
    weights = resolve_inception_weights(eval_cfg.inception_weights, cache_dir=eval_cfg.cache_dir)
    split, stats, reference, kid_subset = reference_set(data, eval_cfg, dataset_cfg, images.shape[0])
    common = dict(weights_path=weights, batch_size=eval_cfg.batch_size, device=device, cache_dir=eval_cfg.cache_dir)
    if stats is not None:
        return {**compute_fid_against_statistics(images, stats, **common), "reference": str(eval_cfg.reference_stats)}
    result = compute_fid_kid(images, reference, kid_subset_size=kid_subset, kid_subsets=KID_SUBSETS,
                             reference_name=reference_name(dataset_cfg, split), **common)
    return {**result, "reference": f"{dataset_cfg.name} {split} ({reference.shape[0]} images)"}


def sampled_in_shares(generate: Callable[[range, torch.Tensor | None], torch.Tensor], seeds: range,
                      labels: torch.Tensor | None, per_rank: int, rank: int = 0, world_size: int = 1,
                      gather: Callable[[object], list] = lambda images: [images]) -> Iterator[torch.Tensor]:
    """The images of `seeds` (uint8, CPU), in seed order, in rounds: in round k rank r samples the `per_rank` seeds
    from (k·world_size + r)·per_rank by `generate(seeds, labels)`, and `gather` (an all-gather over the ranks)
    hands every rank the round's images. With per-image seeds the result is that of one process."""
    per_round = per_rank * world_size
    for start in range(0, len(seeds), per_round):
        lo = min(start + rank * per_rank, len(seeds))
        hi = min(lo + per_rank, len(seeds))
        mine = generate(seeds[lo:hi], None if labels is None else labels[lo:hi]) if hi > lo else None
        yield torch.cat([images for images in gather(mine) if images is not None])


class _Taken:
    """`take(n)`: the next n images of an iterator of image batches (torch-fidelity asks in its own batch sizes)."""

    def __init__(self, batches: Iterator[torch.Tensor]):
        self.batches, self.held = batches, None

    def take(self, n: int) -> torch.Tensor:
        parts = [] if self.held is None else [self.held]
        while sum(p.shape[0] for p in parts) < n:
            parts.append(next(self.batches))
        images = torch.cat(parts)
        self.held = images[n:]
        return images[:n]


def _prepare_on_rank0(run: RunView, eval_cfg, dataset_cfg):
    """(weights, statistics, reference) on rank 0, None elsewhere. Under DDP every rank learns whether rank 0
    could prepare, and fails the same way if not (no rank samples for an evaluation that will not happen)."""
    prepared = None
    if run.rank == 0:
        try:
            weights = resolve_inception_weights(eval_cfg.inception_weights, cache_dir=eval_cfg.cache_dir)
            _, stats, reference, _ = reference_set(run.data, eval_cfg, dataset_cfg, eval_cfg.num_samples)
            prepared = (weights, stats, reference)
        except Exception as exc:
            if run.world_size > 1:
                distributed.gather_objects((type(exc).__name__, str(exc)))
            raise
    if run.world_size > 1:
        outcome = distributed.gather_objects(None)[0]   # rank 0's: None when it is ready
        if outcome is not None:
            kind, message = outcome
            raise (InceptionWeightsUnavailable if kind == InceptionWeightsUnavailable.__name__ else RuntimeError)(
                f"rank 0 could not prepare the evaluation ({kind}): {message}")
    return prepared


def evaluate(run: RunView, eval_cfg, dataset_cfg, source: str = "training") -> dict | None:
    """FID/KID of the run's EMA model under `eval_cfg` against the training images of `dataset_cfg`, as one record
    (module docstring); None on ranks other than 0, which only sample their share. Raises
    InceptionWeightsUnavailable when no Inception weights are found, ConfigError for a bad reference."""
    weights, stats, reference = _prepare_on_rank0(run, eval_cfg, dataset_cfg) or (None, None, None)
    kid_subset = None if reference is None else min(eval_cfg.kid_subset_size, eval_cfg.num_samples, reference.shape[0])
    split = dataset_cfg.loader.get("split", "train") if "loader" in dataset_cfg else "train"
    gather = distributed.gather_objects if run.world_size > 1 else (lambda images: [images])

    start = time.perf_counter()
    runs, nfe = [], []
    num_classes = run.data.num_classes    # conditional: every class equally often over all the samples
    for repeat in range(eval_cfg.repeats):
        seeds = image_seeds(eval_cfg, repeat)
        labels = balanced_labels(eval_cfg.num_samples, num_classes, seeds.start) if num_classes else None

        def generate(share: range, share_labels: torch.Tensor | None) -> torch.Tensor:
            images, evaluations = run.generate(len(share), share, eval_cfg, "eval", share_labels)
            nfe.append(evaluations)
            return images.cpu()

        shares = sampled_in_shares(generate, seeds, labels, eval_cfg.batch_size, run.rank, run.world_size, gather)
        if run.rank != 0:
            for _ in shares:   # this rank's share, handed to rank 0
                pass
            continue
        sample_fn = _Taken(shares).take
        common = dict(weights_path=weights, batch_size=eval_cfg.batch_size, device=str(run.device),
                      cache_dir=eval_cfg.cache_dir)
        if stats is None:
            runs.append(compute_fid_kid_from_sampler(
                sample_fn, eval_cfg.num_samples, reference, kid_subset_size=kid_subset, kid_subsets=KID_SUBSETS,
                reference_name=reference_name(dataset_cfg, split), **common))
        else:
            runs.append(compute_fid_against_statistics(SampledImages(sample_fn, eval_cfg.num_samples), stats,
                                                       **common))
    if run.rank != 0:
        return None

    fids = [r["fid"] for r in runs]
    best = min(range(len(fids)), key=fids.__getitem__)
    protocol = describe(run, eval_cfg, dataset_cfg.name, weights, stats, reference, split, kid_subset,
                        nfe[0] if nfe else None)
    record = {
        "step": run.step,
        "images_seen": run.images_seen,
        "source": source,
        "fid": fids[best],
        "fid_mean": sum(fids) / len(fids),
        "fid_values": fids,
        "fid_num_samples": eval_cfg.num_samples,
        "fid_num_reference": None if reference is None else int(reference.shape[0]),
        "fid_repeats": eval_cfg.repeats,
        "fid_sampler": f"{protocol['sampler']}-{protocol['steps']}",
        "fid_nfe": protocol["nfe"],
        "fid_precision": protocol["precision"],
        "fid_cfg_scale": protocol["guidance"]["cfg_scale"],
        "inception_weights": weights.source,
        "fid_protocol": protocol["label"],
        "protocol": protocol,
    }
    if stats is None:
        record.update(kid_mean=runs[best]["kid_mean"], kid_std=runs[best]["kid_std"],
                      kid_values=[r["kid_mean"] for r in runs], kid_subset_size=kid_subset)
        if kid_subset < eval_cfg.kid_subset_size:
            record["kid_note"] = (f"eval.kid_subset_size={eval_cfg.kid_subset_size} bounded to {kid_subset} by the "
                                  f"{eval_cfg.num_samples} samples / {reference.shape[0]} reference images")
            _warn_once(f"KID: {record['kid_note']}; KID values with other subset sizes are not comparable")
    else:
        record["kid_note"] = "no KID: eval.reference_stats holds statistics, not features"
    record["eval_seconds"] = time.perf_counter() - start
    return record


def describe(run: RunView, eval_cfg, dataset: str, weights: InceptionWeights, stats, reference, split: str,
             kid_subset, nfe) -> dict:
    """Everything that decides the numbers, as a dict, with a one-line `label`."""
    options = SamplerOptions.from_config(eval_cfg, "eval")
    dtype = autocast_dtype(eval_cfg.precision, run.autocast_dtype, "eval")
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if stats is None:
        total = dataset_size(run.data)
        count = int(reference.shape[0])
        described = {"kind": "training images", "dataset": dataset, "split": split, "count": count, "of": total,
                     "selection": "all" if count == total else f"seeded subset (seed {SUBSET_SEED})"}
        against = f"{dataset} {split} ({count} images{'' if count == total else f' of {total}'})"
    else:
        described = {"kind": "statistics file", "path": str(stats.path), "sha256": stats.sha256,
                     "format": stats.format}
        against = f"{stats.path.name} (sha256 {stats.sha256[:12]})"
    samples = eval_cfg.num_samples
    size = f"{samples // 1000}k" if samples % 1000 == 0 else str(samples)
    label = f"FID-{size} vs {against}, {options.sampler} {options.steps} steps ({nfe} NFE), {precision}"
    if options.cfg_scale != 1.0:
        label += f", guidance {options.cfg_scale:g}"
    if eval_cfg.repeats > 1:
        label += f", min of {eval_cfg.repeats}"
    return {
        "label": label,
        "num_samples": samples,
        "repeats": eval_cfg.repeats,
        "reported": "min" if eval_cfg.repeats > 1 else "single",
        "seeds": [[image_seeds(eval_cfg, r)[0], image_seeds(eval_cfg, r)[-1]] for r in range(eval_cfg.repeats)],
        "seed_per": "image",
        "reference": described,
        "sampler": options.sampler,
        "steps": options.steps,
        "nfe": nfe,
        "precision": precision,
        "guidance": {"cfg_scale": options.cfg_scale, "sigma_min": options.guidance_sigma_min,
                     "sigma_max": _finite(options.guidance_sigma_max)},
        "sampler_options": {k: _finite(v) for k, v in options.to_dict().items()},
        "inception": {"source": weights.source, "sha256": weights.digest, "extractor": weights.feature_extractor},
        "kid": None if kid_subset is None else {"subset_size": kid_subset, "subsets": KID_SUBSETS},
    }
