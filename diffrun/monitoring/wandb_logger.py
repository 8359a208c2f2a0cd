"""Weights & Biases logging for a run, as a Trainer callback. W&B is optional: results never depend on it.

Mode (`wandb.mode`): online | offline | disabled. Left unset, it is `$WANDB_MODE` if set, else
online when `WANDB_API_KEY` is set, else disabled (no W&B process is started at all). Offline runs
live in `<run>/wandb/offline-run-*/` (upload later with `wandb sync <run>/wandb/offline-run-*`).

Never fatal: if `wandb.init` fails online (no login, no network, server outage) the run continues
logging offline, with a warning; if a later call to W&B fails, the run continues and W&B is dropped.

One W&B run per diffrun run: its id is derived from the run name and directory and kept in
`<run>/wandb_id.txt`, and `resume="allow"`, so a resumed or requeued job continues the same W&B run
(steps that W&B already has are ignored by W&B). `close()` calls `finish()`, also on failure, so
the next job of a multirun never logs into this one. Only rank 0 logs.

Logged at every flush: the flush record (`train/*`; FID/KID keys as `eval/*`) and a histogram of
sampled λ (`stats/logsnr_hist`, from the per-bin counts). Every `wandb.plots_every` flushes and at the
last: the mean loss, loss variance and effective weight per bin as line plots over λ
(`stats/*_vs_logsnr`, from one `wandb.Table`, one row per bin, None where a bin is empty) and a
loss-variance heatmap image over λ × step (`stats/loss_var_heatmap`). Sample grids (`samples`), and
every evaluation record (`eval/*`, the `on_eval` event) at its step.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffrun.errors import ConfigError
from diffrun.training.callbacks import Callback

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
EVAL_PREFIXES = ("fid", "kid", "isc", "is_", "precision", "recall")
TABLE_COLUMNS = ["logsnr", "count", "loss_mean", "loss_var", "wloss_mean", "weight_mean"]
LINE_PLOTS = (("loss_mean", "mean loss E[ℓ | λ]"), ("loss_var", "loss variance Var[ℓ | λ]"),
              ("weight_mean", "effective weight E[w | λ]"))


def resolve_mode(cfg_mode) -> str:
    """online | offline | disabled: the config, else $WANDB_MODE, else online iff WANDB_API_KEY is set."""
    mode = getattr(cfg_mode, "value", cfg_mode)
    if mode is None:
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "disabled")
    mode = {"dryrun": "offline", "run": "online"}.get(str(mode), str(mode))
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={mode!r} (or $WANDB_MODE): allowed online, offline, disabled")
    return mode


def run_id(run_dir: Path, name: str, fresh: bool = False) -> str:
    """The W&B run id kept in `<run_dir>/wandb_id.txt`; created from the name and directory the first time.

    `fresh` (resume=never: the run is trained again from scratch) starts a new W&B run instead.
    """
    path = run_dir / ID_FILE
    if path.exists() and not fresh:
        text = path.read_text().strip()
        if text:
            return text
    digest_of = str(run_dir.resolve()) + (f"@{time.time_ns()}-{os.getpid()}" if fresh else "")
    digest = hashlib.sha1(digest_of.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:48] or "run"
    value = f"{slug}-{digest}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def default_group(cfg: DictConfig) -> str | None:
    if cfg.wandb.get("group"):
        return str(cfg.wandb.group)
    if cfg.get("experiment"):
        return str(cfg.experiment)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return str(cfg.sweep_name)
    except (ValueError, ImportError):  # outside a Hydra app
        pass
    return None


def default_tags(cfg: DictConfig) -> list[str]:
    def name(key):
        return OmegaConf.select(cfg, f"{key}.name", default=None)

    tags = [f"strategy:{name('weighting')}", f"dataset:{name('dataset')}", f"seed:{cfg.seed}",
            f"schedule:{name('schedule')}", f"model:{name('model')}", *map(str, cfg.wandb.get("tags") or [])]
    return [t[:64] for t in dict.fromkeys(tags)]


class WandbLogger(Callback):
    """Logs a run to W&B (rank 0). Starts at `on_start`; without a mode or key (wandb.*) it does nothing."""

    def __init__(self):
        self.run = None
        self._rows: dict[str, list] = {"step": [], "loss_var": []}   # heatmap history, from logsnr_stats.npz on resume
        self._flushes = 0
        self._restore_env: dict = {}

    def on_start(self, trainer) -> None:
        self.run_dir = Path(trainer.run_dir)
        self.total_steps = int(trainer.cfg.train.steps)
        self.plots_every = max(1, int(trainer.cfg.wandb.get("plots_every", 5)))
        self.run, self._restore_env = self.create(trainer.cfg, trainer)
        if self.run is not None and trainer.step > 0:
            self._load_history(trainer.step)

    def _load_history(self, up_to_step: int) -> None:
        from diffrun.monitoring.stats_writer import load_stats

        try:
            old = load_stats(self.run_dir)
        except Exception:  # noqa: BLE001 - no earlier statistics file: the heatmap starts at the resume
            return
        keep = old["step"] <= up_to_step
        self._rows = {"step": list(old["step"][keep]), "loss_var": list(old["loss_var"][keep])}

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: DictConfig, trainer):
        """(run, saved environment) in online/offline mode; (None, {}) when disabled or if W&B is unusable."""
        mode = resolve_mode(cfg.wandb.mode)
        if mode == "disabled":
            return None, {}
        try:
            import wandb
        except ImportError:
            log.warning("wandb.mode=%s but wandb is not installed; not logging to W&B", mode)
            return None, {}
        run_dir = Path(trainer.run_dir)
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # Artifacts (tables) are staged before upload; keep them with the run instead of ~/.local/share.
        restore = {key: os.environ.get(key) for key in ("WANDB_DIR", "WANDB_DATA_DIR")}
        os.environ["WANDB_DIR"] = str(wandb_dir.parent)
        os.environ["WANDB_DATA_DIR"] = str(wandb_dir / "data")
        kwargs = dict(
            project=cfg.wandb.project,
            entity=cfg.wandb.get("entity"),
            name=str(cfg.name),
            id=run_id(run_dir, str(cfg.name), fresh=str(cfg.resume) == "never"),
            resume="allow",
            group=default_group(cfg),
            job_type=str(OmegaConf.select(cfg, "weighting.name", default="train")),
            tags=default_tags(cfg),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            dir=str(run_dir),
        )
        timeout = float(cfg.wandb.get("init_timeout", 60.0))
        try:
            run = cls._init(wandb, mode, kwargs, timeout)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            if mode != "online":
                log.warning("W&B (%s) could not start (%s: %s); training without W&B", mode, type(exc).__name__, exc)
                cls._restore(restore)
                return None, {}
            log.warning("W&B online init failed (%s: %s); logging offline to %s instead — upload later with "
                        "`wandb sync %s/offline-run-*`", type(exc).__name__, exc, wandb_dir, wandb_dir)
            try:
                run = cls._init(wandb, "offline", kwargs, timeout)
            except Exception as exc2:  # noqa: BLE001
                log.warning("W&B offline init failed too (%s: %s); training without W&B", type(exc2).__name__, exc2)
                cls._restore(restore)
                return None, {}
        try:
            run.define_metric("eval/*", summary="last")
        except Exception:  # noqa: BLE001
            pass
        return run, restore

    @staticmethod
    def _init(wandb, mode: str, kwargs: dict, timeout: float):
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
        log.info("W&B run %s (%s): %s", run.id, mode, getattr(run, "url", None) or Path(run.dir).parent)
        return run

    @staticmethod
    def _restore(saved: dict) -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # --- guarded logging -------------------------------------------------------------------------------
    def _log(self, data: dict, step: int) -> None:
        if self.run is None or not data:
            return
        try:
            self.run.log(data, step=int(step))
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning("W&B log failed at step %d (%s: %s); no more W&B logging for this run", step, type(exc).__name__, exc)
            self.close()

    def on_eval(self, trainer, record: dict) -> None:
        """Evaluation numbers (FID, KID, ...) at their step, also kept in the run summary."""
        if self.run is None:
            return
        values = {f"eval/{k}": float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._log(values, int(record.get("step", self._last_step())))
        try:
            self.run.summary.update(values)
        except Exception:  # noqa: BLE001
            pass

    def _last_step(self) -> int:
        try:
            return int(self.run.step)
        except Exception:  # noqa: BLE001
            return 0

    # --- trainer callbacks -----------------------------------------------------------------------------
    def on_flush(self, trainer, record: dict, stats: dict) -> None:
        if self.run is None:
            return
        try:
            data = self._flush_data(trainer, record, stats)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning("could not prepare W&B data at step %s (%s: %s)", record.get("step"), type(exc).__name__, exc)
            return
        self._log(data, int(record["step"]))

    def _flush_data(self, trainer, record: dict, stats: dict) -> dict:
        import wandb

        step = int(record["step"])
        self._flushes += 1
        data: dict = {}
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            data[f"eval/{key}" if key.startswith(EVAL_PREFIXES) else f"train/{key}"] = value
        arrays = {k: np.asarray(v.cpu().numpy() if hasattr(v, "cpu") else v, dtype=np.float64) for k, v in stats.items()}
        edges = trainer.stats.edges.numpy().astype(np.float64)
        centers = 0.5 * (edges[1:] + edges[:-1])
        count = arrays["count"]
        data["stats/logsnr_hist"] = wandb.Histogram(np_histogram=(count, edges))
        self._rows["step"].append(step)
        self._rows["loss_var"].append(arrays["loss_var"])
        if self._flushes % self.plots_every == 0 or step >= self.total_steps:
            rows = [[float(centers[i]), int(count[i]), *(_num(arrays[k][i]) for k in TABLE_COLUMNS[2:])]
                    for i in range(len(centers))]                     # one row per bin; None where empty
            table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
            for key, title in LINE_PLOTS:
                data[f"stats/{key}_vs_logsnr"] = wandb.plot.line(table, "logsnr", key, title=f"{title} at step {step}")
            image = self._heatmap(trainer, edges)
            if image is not None:
                data["stats/loss_var_heatmap"] = wandb.Image(image, caption=f"Var[ℓ | λ] up to step {step}")
        return data

    def on_sample(self, trainer, images, path) -> None:
        import wandb

        if self.run is None:
            return
        try:
            image = wandb.Image(str(path), caption=f"EMA samples, step {trainer.step}")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read the sample grid %s for W&B (%s)", path, exc)
            return
        self._log({"samples": image}, trainer.step)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s: %s)", type(exc).__name__, exc)
        finally:
            self._restore(self._restore_env)

    # --- helpers ---------------------------------------------------------------------------------------
    def _heatmap(self, trainer, edges: np.ndarray):
        """RGB array of the variance heatmap (bins × steps) from the run's full history (incl. before a resume)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from diffrun.monitoring.plots import draw_variance_heatmap

        steps, var = np.asarray(self._rows["step"]), np.stack(self._rows["loss_var"])
        try:
            fig = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
            canvas = FigureCanvasAgg(fig)
            ax = fig.subplots()
            draw_variance_heatmap(ax, steps, edges, var, colorbar_fig=fig)
            ax.set_title(f"{trainer.cfg.name}: loss variance over λ and training", fontsize=9)
            canvas.draw()
            return np.asarray(canvas.buffer_rgba())[..., :3].copy()
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            log.warning("could not render the loss-variance heatmap: %s", exc)
            return None


def _num(value: float):
    value = float(value)
    return value if np.isfinite(value) else None
