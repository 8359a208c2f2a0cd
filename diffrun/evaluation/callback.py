"""FID/KID of the EMA model during and at the end of training (a Trainer callback).

The evaluation itself, its reference set and the protocol recorded beside the numbers are in
protocol.py; `diffrun-eval` (cli.py) runs the same evaluation on a checkpoint afterwards.
"""
from __future__ import annotations

import logging

from diffrun.config import option
from diffrun.evaluation.inception import InceptionWeightsUnavailable, resolve_inception_weights
from diffrun.evaluation.protocol import evaluate
from diffrun.evaluation.reference import check_reference_count
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

log = logging.getLogger(__name__)


class FIDCallback(Callback):
    """FID/KID of the EMA model every `settings.every_steps` steps and at the end (`settings.enabled`), as `on_eval`
    events for the other callbacks (metrics file, W&B); the final numbers join the run summary. Under DDP it runs
    on every rank: each samples its share, rank 0 computes and reports the numbers (protocol.py).
    `settings`: the `eval` node; `dataset`: the `dataset` node, whose training images are the reference."""

    all_ranks = True

    def __init__(self, settings, dataset):
        self.settings, self.dataset = settings, dataset
        self.last_step = -1
        self.skipped_reason: str | None = None
        self.last_record: dict = {}

    def on_start(self, run: RunView) -> None:
        settings = self.settings
        if not settings.enabled:
            return
        if settings.reference_stats is None and run.rank == 0:   # a too large reference fails now, not at the end
            check_reference_count(run.data, settings.num_reference, self.dataset.name)
        # Before step 0, not at the first evaluation (step 10,000 of a paper preset). Every rank decides, from the
        # same files, so that all of them skip or all take part in the evaluation's collectives.
        try:
            weights = resolve_inception_weights(settings.inception_weights, cache_dir=settings.cache_dir)
        except InceptionWeightsUnavailable as exc:
            self._skip_or_raise(exc, run, "FID will be skipped (eval.on_unavailable=skip; =fail stops instead)")
            return
        if run.rank == 0:
            log.info("Inception weights for FID: %s (%s)", weights.path, weights.source)

    def _skip_or_raise(self, exc: InceptionWeightsUnavailable, run: RunView, what: str) -> None:
        """`eval.on_unavailable`: fail raises `exc`; skip remembers why, for the summary, and says so once."""
        if option(self.settings.on_unavailable) == "fail":
            raise exc
        self.skipped_reason = str(exc).splitlines()[0]
        if run.rank == 0:
            log.warning("%s: %s", what, exc)

    def every_steps(self) -> int:
        return self.settings.every_steps if self.settings.enabled else 0

    def _run(self, run: RunView) -> dict:
        if self.skipped_reason is not None:
            return {}
        try:
            record = evaluate(run, self.settings, self.dataset)
        except InceptionWeightsUnavailable as exc:
            self._skip_or_raise(exc, run, "FID skipped (eval.on_unavailable=skip)")
            return {}
        if record is None:   # a rank other than 0: its share is sampled, rank 0 reports
            self.last_step = run.step
            return {}
        self.last_step, self.last_record = run.step, record
        log.info("step %d: %s (%s; %.0fs)", record["step"], summary_line(record), record["fid_protocol"],
                 record["eval_seconds"])
        run.events.emit_eval(record)
        return record

    def on_step(self, run: RunView) -> None:
        self._run(run)

    def on_end(self, run: RunView) -> dict:
        if not self.settings.enabled:
            return {}
        record = self._run(run) if self.last_step != run.step else self.last_record
        if self.skipped_reason is not None:
            return {"fid_skipped": self.skipped_reason}
        return {k: record[k] for k in ("fid", "fid_mean", "kid_mean", "kid_std", "fid_num_samples", "fid_protocol")
                if k in record}


def summary_line(record: dict) -> str:
    """"FID 12.345 (mean 12.5 of 3), KID 0.01234 ± 0.00050" from an evaluation record."""
    text = f"FID {record['fid']:.3f}"
    if len(record.get("fid_values", ())) > 1:
        text += f" (mean {record['fid_mean']:.3f} of {len(record['fid_values'])})"
    if "kid_mean" in record:
        text += f", KID {record['kid_mean']:.5f} ± {record['kid_std']:.5f}"
    return text
