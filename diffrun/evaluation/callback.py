"""FID/KID of the EMA model during and at the end of training (a Trainer callback).

Samples come from `Trainer.generate` with a fixed seed per batch, so every evaluation of every run
scores the same noise. The reference side is a fixed, seeded subset of the run's training images,
whose Inception statistics torch-fidelity caches after the first evaluation.
"""
from __future__ import annotations

import logging
import time

import torch

from diffrun.data import balanced_labels
from diffrun.evaluation.fid import compute_fid_kid_from_sampler
from diffrun.evaluation.inception import InceptionWeightsUnavailable, resolve_inception_weights
from diffrun.training.callbacks import Callback

log = logging.getLogger(__name__)


def reference_images(trainer, num_reference: int | None, num_samples: int) -> torch.Tensor:
    """A seeded subset of the training images (uint8 pixels, CPU): min(num_reference or num_samples, N)."""
    return trainer.data.reference_images(num_reference or num_samples, seed=0)


def evaluate(trainer, eval_cfg) -> dict:
    """Sample `eval.num_samples` images from the EMA model and score them. Raises on missing weights."""
    weights = resolve_inception_weights(eval_cfg.inception_weights, cache_dir=eval_cfg.cache_dir)
    reference = reference_images(trainer, eval_cfg.num_reference, eval_cfg.num_samples)
    batch_counter = iter(range(10**9))
    nfe, done = [], [0]
    num_classes = trainer.data.num_classes   # conditional: every class equally often over all the samples
    labels = balanced_labels(eval_cfg.num_samples, num_classes, eval_cfg.seed) if num_classes else None

    def sample_fn(n: int) -> torch.Tensor:
        batch_labels = labels[done[0]:done[0] + n] if labels is not None else None
        images, evaluations = trainer.generate(n, eval_cfg.seed + next(batch_counter), "eval", batch_labels)
        nfe.append(evaluations)
        done[0] += n
        return images.cpu()

    dataset_cfg = trainer.cfg.dataset
    start = time.perf_counter()
    metrics = compute_fid_kid_from_sampler(
        sample_fn, eval_cfg.num_samples, reference,
        reference_name=f"{dataset_cfg.name}-train-{dataset_cfg.image_size}px",
        weights_path=weights, batch_size=eval_cfg.batch_size, device=str(trainer.device),
        kid_subset_size=min(eval_cfg.kid_subset_size, eval_cfg.num_samples, reference.shape[0]),
        cache_dir=eval_cfg.cache_dir,
    )
    return {
        "step": trainer.step,
        "images_seen": trainer.images_seen,
        "fid": metrics["fid"],
        "kid_mean": metrics["kid_mean"],
        "kid_std": metrics["kid_std"],
        "fid_num_samples": metrics["num_samples"],
        "fid_num_reference": metrics["num_reference"],
        "fid_sampler": f"{getattr(eval_cfg.sampler, 'value', eval_cfg.sampler)}-{eval_cfg.steps}",
        "fid_nfe": nfe[0] if nfe else None,
        "fid_precision": str(getattr(eval_cfg.precision, "value", eval_cfg.precision)),
        "fid_cfg_scale": eval_cfg.cfg_scale,
        "inception_weights": weights.source,
        "eval_seconds": time.perf_counter() - start,
    }


class FIDCallback(Callback):
    """FID/KID of the EMA model every `eval.every_steps` steps and at the end (`eval.enabled`), as `on_eval`
    events for the other callbacks (metrics file, W&B); the final numbers join the run summary."""

    def __init__(self):
        self.last_step = -1
        self.skipped_reason: str | None = None
        self.last_record: dict = {}

    def every_steps(self, trainer) -> int:
        return trainer.cfg.eval.every_steps if trainer.cfg.eval.enabled else 0

    def _run(self, trainer) -> dict:
        settings = trainer.cfg.eval
        if self.skipped_reason is not None:
            return {}
        try:
            record = evaluate(trainer, settings)
        except InceptionWeightsUnavailable as exc:
            if str(getattr(settings.on_unavailable, "value", settings.on_unavailable)) == "fail":
                raise
            self.skipped_reason = str(exc).splitlines()[0]
            log.warning("FID skipped (eval.on_unavailable=skip): %s", exc)
            return {}
        self.last_step, self.last_record = trainer.step, record
        log.info("step %d: FID %.3f, KID %.5f ± %.5f (%d EMA samples, %s, vs %d training images; %.0fs)",
                 record["step"], record["fid"], record["kid_mean"], record["kid_std"], record["fid_num_samples"],
                 record["fid_sampler"], record["fid_num_reference"], record["eval_seconds"])
        trainer.events.emit_eval(trainer, record)
        return record

    def on_step(self, trainer) -> None:
        self._run(trainer)

    def on_end(self, trainer) -> dict:
        if not trainer.cfg.eval.enabled:
            return {}
        record = self._run(trainer) if self.last_step != trainer.step else self.last_record
        if self.skipped_reason is not None:
            return {"fid_skipped": self.skipped_reason}
        return {k: record[k] for k in ("fid", "kid_mean", "kid_std", "fid_num_samples") if k in record}
