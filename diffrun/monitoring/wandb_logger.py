"""Weights & Biases logging for a run, as a callback of training and of evaluation jobs (docs/wandb.md).

W&B is optional: results never depend on it, and it never stops or blocks a run. Where the rest is:

    which mode, and why             wandb_mode.py    (`wandb.mode`, $WANDB_MODE, credentials)
    the W&B run: id, group, start   wandb_run.py     (`<run>/wandb_id.txt`, the writer lock, offline fallback)
    per-log-SNR values and plots    wandb_stats.py   (histogram, per-band scalars, line plots, heatmap)

Logged at every flush: `train/*`, a histogram of the sampled λ (`stats/logsnr_hist`) and per-band
loss mean and pooled variance (`logsnr_band/*`). Every `wandb.plots_every` flushes and at the last: per-bin
line plots over λ (`stats/*_vs_logsnr`) and the loss-variance heatmap image (`stats/loss_var_heatmap`).
Sample grids (`samples`); evaluations (`eval/*` during training, `eval_<n>/*` from an evaluation job of n
samples) with `eval/fid_min` in the summary.
"""
from __future__ import annotations

import contextlib
import logging
import math

import numpy as np

from diffrun.checks import POSITIVE, Interval, check_number
from diffrun.files import unlock
from diffrun.monitoring.stats_writer import load_stats
from diffrun.monitoring.wandb_mode import mode_reason
from diffrun.monitoring.wandb_run import STEP_METRIC, restore_environment, start_run
from diffrun.monitoring.wandb_stats import plots_data, statistics_data
from diffrun.run_folder.metrics import read_metrics
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

log = logging.getLogger(__name__)

EVAL_PREFIXES = ("fid", "kid", "isc", "is_", "precision", "recall")   # flush record keys logged under eval/


def eval_section(job_type: str, num_samples) -> str:
    """`eval` for the evaluations during training; `eval_<n>` (e.g. `eval_50k`) for an evaluation job of n
    samples, kept apart because FID is biased by the sample count (a 50k FID is lower than a 10k one)."""
    if job_type != "eval" or not num_samples:
        return "eval"
    n = int(num_samples)
    return f"eval_{n // 1000}k" if n % 1000 == 0 else f"eval_{n}"


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class WandbLogger(Callback):
    """Logs a training run or an evaluation job to W&B (rank 0). Starts at `on_start`; without a mode or key it
    does nothing. Its node (conf/callbacks/default.yaml):

        settings          the `wandb` node: mode, project, entity, group, tags, plots_every, init_timeout
        total_steps       `train.steps`: the last flush always gets the plots
        resume            `resume`: `never` (trained again from scratch) starts a new W&B run
        fid_num_samples   `eval.num_samples`: a resumed run's best FID counts evaluations of this size only
    """

    def __init__(self, settings, total_steps: int, resume: str = "auto", fid_num_samples: int | None = None):
        check_number("wandb.plots_every", settings.plots_every, POSITIVE, integer=True)
        check_number("wandb.init_timeout", settings.init_timeout, Interval(0, low_open=True, note="seconds"))
        self.settings, self.total_steps, self.fresh = settings, total_steps, str(resume) == "never"
        self.fid_num_samples = fid_num_samples
        self.run = None
        self._rows: dict[str, list] = {"step": [], "loss_var": []}   # heatmap history, from logsnr_stats.npz on resume
        self._flushes = 0
        self._restore_env: dict = {}
        self._lock: int | None = None                                # the writer lock's descriptor
        self._fid_min: tuple[float, float] | None = None             # (FID, images seen) of the best evaluation

    def on_start(self, run: RunView) -> None:
        log.info("%s", mode_reason(self.settings.mode))
        self.run, self._restore_env, self._lock = start_run(self.settings, run.config, run.run_dir, run.job_type,
                                                            run.step, self.fresh)
        if self.run is not None and run.job_type == "train" and run.step > 0:
            self._load_history(run, run.step)

    def _load_history(self, run: RunView, up_to_step: int) -> None:
        """The heatmap rows and the best FID of the run before this resume (also when W&B was offline, so
        the summary of a requeued offline piece covers the whole run)."""
        with contextlib.suppress(Exception):     # no earlier statistics file: the heatmap starts at the resume
            old = load_stats(run.run_dir)
            keep = old["step"] <= up_to_step
            self._rows = {"step": list(old["step"][keep]), "loss_var": list(old["loss_var"][keep])}
        for record in read_metrics(run.run_dir):
            same_estimator = record.get("fid_num_samples", self.fid_num_samples) == self.fid_num_samples
            if int(record.get("step", 0)) <= up_to_step and _scalar(record.get("fid")) and same_estimator:
                self._note_fid(float(record["fid"]), float(record.get("images_seen", 0)))

    # --- guarded logging -------------------------------------------------------------------------------
    def _log(self, data: dict, images_seen: int, step: int | None) -> None:
        """One history row with its x-axis values. `step` None (an evaluation job) appends after what the W&B
        run already has; a training step below it (a resume replaying steps) is ignored by W&B."""
        if self.run is None or not data:
            return
        row = {STEP_METRIC: int(images_seen), "kimg": images_seen / 1000, **data}
        try:
            if step is None:
                self.run.log(row)
            else:
                self.run.log(row, step=int(step))
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B log failed (%s: %s); no more W&B logging for this run", type(exc).__name__, exc)
            self.close()

    def _summarize(self, values: dict) -> None:
        if self.run is None or not values:
            return
        try:
            self.run.summary.update(values)
        except Exception:  # noqa: BLE001
            pass

    def _note_fid(self, fid: float, images_seen: float) -> dict:
        if self._fid_min is None or fid < self._fid_min[0]:
            self._fid_min = (fid, images_seen)
        return {"eval/fid_min": self._fid_min[0], "eval/fid_min_kimg": self._fid_min[1] / 1000}

    # --- events ----------------------------------------------------------------------------------------
    def on_eval(self, run: RunView, record: dict) -> None:
        """Evaluation numbers (FID, KID, ...) at the images seen; during training also the best FID so far
        (`eval/fid_min`) in the summary, where `eval/fid` is the last."""
        if self.run is None:
            return
        section = eval_section(run.job_type, record.get("fid_num_samples"))
        values = {f"{section}/{k}": float(v) for k, v in record.items()
                  if k not in ("step", "images_seen") and _scalar(v)}
        images_seen = int(record.get("images_seen", run.images_seen))
        step = None if run.job_type == "eval" else int(record.get("step", run.step))
        self._log(values, images_seen, step)
        summary = {f"{section}/{k}": v for k, v in record.items() if isinstance(v, str)}   # sampler, weights
        if section == "eval" and f"{section}/fid" in values:
            summary.update(self._note_fid(values[f"{section}/fid"], images_seen))
        self._summarize(summary)

    def on_flush(self, run: RunView, record: dict, stats: dict) -> None:
        if self.run is None:
            return
        try:
            data = self._flush_data(run, record, stats)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning("could not prepare W&B data at step %s (%s: %s)", record.get("step"), type(exc).__name__, exc)
            return
        self._log(data, int(record.get("images_seen", run.images_seen)), int(record["step"]))
        if _scalar(record.get("fid")):
            self._summarize(self._note_fid(float(record["fid"]), float(record.get("images_seen", 0))))

    def _flush_data(self, run: RunView, record: dict, stats: dict) -> dict:
        import wandb

        step = int(record["step"])
        self._flushes += 1
        data = {f"eval/{key}" if key.startswith(EVAL_PREFIXES) else f"train/{key}": value
                for key, value in record.items() if key not in ("step", "time", "images_seen") and _scalar(value)}
        arrays = {k: np.asarray(v.cpu().numpy() if hasattr(v, "cpu") else v, dtype=np.float64) for k, v in stats.items()}
        edges = run.stats.edges.numpy().astype(np.float64)
        data.update(statistics_data(wandb, edges, arrays))
        self._rows["step"].append(step)
        self._rows["loss_var"].append(arrays["loss_var"])
        if self._flushes % self.settings.plots_every == 0 or step >= self.total_steps:
            data.update(plots_data(wandb, edges, arrays, step, self._rows, run.name))
        return data

    def on_sample(self, run: RunView, images, path) -> None:
        import wandb

        if self.run is None:
            return
        try:
            image = wandb.Image(str(path), caption=f"EMA samples, step {run.step}")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read the sample grid %s for W&B (%s)", path, exc)
            return
        self._log({"samples": image}, run.images_seen, None if run.job_type == "eval" else run.step)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s: %s)", type(exc).__name__, exc)
        finally:
            if self._lock is not None:
                unlock(self._lock)
                self._lock = None
            restore_environment(self._restore_env)
