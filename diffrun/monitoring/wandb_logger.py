"""Weights & Biases logging for a run, as a callback of training and of evaluation jobs (docs/wandb.md).

W&B is optional: results never depend on it, and it never stops or blocks a run.

* Mode (`wandb.mode`): online | offline | disabled. Left unset, it is `$WANDB_MODE` if set, else online
  when credentials are found without asking (`WANDB_API_KEY`, or the netrc `wandb login` writes), else
  disabled (no W&B process is started at all). The run's log says which, and why (`mode_reason`).
* Never a prompt: online needs credentials found without asking (`WANDB_API_KEY`, `wandb login`'s
  netrc); without them the run logs offline. The online attempt is bounded by `wandb.init_timeout`
  seconds; after it fails the run logs offline, into a fresh `<run>/wandb/offline-run-*` with the
  same W&B id, which `wandb sync <run>/wandb/offline-run-*` uploads later into the same W&B run.
* An empty or unknown W&B environment variable (`export WANDB_MODE=`) counts as unset, with a warning; if
  W&B still refuses to start (any mode but disabled), the run logs offline without W&B's environment
  variables, so no W&B data is lost.
* One W&B run per diffrun run: its id is kept in `<run>/wandb_id.txt` (`resume="allow"`), so a
  requeued job and an evaluation job (`diffrun-eval`, `job_type = "eval"`) continue it. One writer at a
  time: the process writing to that id holds `<run>/wandb/writer.lock`; an evaluation job that finds it
  held (training still running) writes a sibling W&B run `<id>-eval-<step>` instead, and a training
  job that finds it held (an evaluation writing) logs offline.
* Comparable across strategies: group `<sweep or experiment>/<strategy>` (one chart line per strategy,
  a band over seeds), job_type train | eval, every series against `images_seen` (also `kimg`).

Logged at every flush: `train/*`, a histogram of the sampled λ (`stats/logsnr_hist`) and per-band
loss mean and pooled variance (`logsnr_band/*`, `band_scalars`). Every `wandb.plots_every` flushes and
at the last: per-bin line plots over λ (`stats/*_vs_logsnr`) and the loss-variance heatmap image
(`stats/loss_var_heatmap`). Sample grids (`samples`); evaluations (`eval/*` during training,
`eval_<n>/*` from an evaluation job of n samples) with `eval/fid_min` in the summary.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffrun.config import option
from diffrun.errors import ConfigError
from diffrun.files import atomic_write
from diffrun.training.callbacks import Callback

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
WRITER_LOCK = "writer.lock"                     # in <run>/wandb/: held by the process writing to the W&B id
STEP_METRIC = "images_seen"                     # the x-axis of every series
SERIES = ("train/*", "eval/*", "eval_*", "stats/*", "logsnr_band/*", "samples", "kimg")
BANDS = 8                                       # equal-width λ bands of the per-band scalars
EVAL_PREFIXES = ("fid", "kid", "isc", "is_", "precision", "recall")
TABLE_COLUMNS = ["logsnr", "count", "loss_mean", "loss_var", "wloss_mean", "weight_mean"]
LINE_PLOTS = (("loss_mean", "mean loss E[ℓ | λ]"), ("loss_var", "loss variance Var[ℓ | λ]"),
              ("weight_mean", "effective weight E[w | λ]"))


ENV_MODES = ("online", "offline", "disabled", "dryrun", "run")   # $WANDB_MODE values diffrun reads


def env_mode() -> str | None:
    """$WANDB_MODE when it is one of ENV_MODES; an empty or unknown value counts as unset (`unusable_environment`
    says so)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ENV_MODES else None


def credentials_source() -> str | None:
    """Where W&B will find an API key without asking: `WANDB_API_KEY`, else the netrc entry `wandb login` writes
    for `$WANDB_BASE_URL` (read with W&B's own reader, no network); None when neither has one."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
        from wandb.sdk.lib.wbauth.wbnetrc import _get_netrc_file_path

        host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if read_netrc_auth(host=host):
            return f"{_get_netrc_file_path()} (wandb login)"
    except Exception as exc:  # noqa: BLE001 - no wandb, an unreadable or malformed netrc: no credentials
        log.debug("no W&B credentials from netrc: %s", exc)
    return None


def mode_reason(cfg_mode) -> str:
    """Why `resolve_mode` picks its mode, for the run's log: 'W&B online (credentials from ~/.netrc ...)'."""
    if cfg_mode is not None:
        return f"W&B {resolve_mode(cfg_mode)} (wandb.mode={option(cfg_mode)})"
    if env_mode():
        return f"W&B {resolve_mode(None)} ($WANDB_MODE={os.environ['WANDB_MODE']})"
    source = credentials_source()
    if source:
        return f"W&B online (wandb.mode unset; credentials from {source})"
    return ("W&B off (wandb.mode unset, no $WANDB_MODE, no credentials: set WANDB_API_KEY or run `wandb login` to "
            "log online, or wandb.mode=offline to log for `wandb sync` later)")


def resolve_mode(cfg_mode) -> str:
    """online | offline | disabled: the config, else $WANDB_MODE (`env_mode`), else online iff credentials are
    found."""
    if cfg_mode is None:
        cfg_mode = env_mode() or ("online" if credentials_source() else "disabled")
    mode = option(cfg_mode)
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={mode!r} (or $WANDB_MODE): allowed online, offline, disabled")
    return mode


def unusable_environment() -> dict[str, str]:
    """W&B's environment variables that W&B would refuse, stopping even an offline run: empty ones
    (`export WANDB_MODE=`), and a $WANDB_MODE it does not know. diffrun treats them as unset."""
    bad = {key: value for key, value in os.environ.items() if key.startswith("WANDB_") and not value.strip()}
    mode = os.environ.get("WANDB_MODE", "")
    if mode.strip() and mode.strip().lower() not in ENV_MODES:
        bad["WANDB_MODE"] = mode
    return bad


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
    atomic_write(path, value + "\n")
    return value


def strategy_of(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "weighting.name", default=None) or "unknown")


def sweep_label(cfg: DictConfig) -> str | None:
    """What the runs being compared share: `wandb.group`, else the experiment preset, else the sweep name
    in a multirun; None for a lone run."""
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


def group_name(cfg: DictConfig) -> str | None:
    """`<sweep or experiment>/<strategy>`: W&B's grouped charts then draw one line per strategy (mean and
    a band over its seeds) instead of averaging every strategy of the sweep into one."""
    label = sweep_label(cfg)
    return f"{label}/{strategy_of(cfg)}" if label else None


def default_tags(cfg: DictConfig) -> list[str]:
    def name(key):
        return OmegaConf.select(cfg, f"{key}.name", default=None)

    tags = [f"strategy:{name('weighting')}", f"dataset:{name('dataset')}", f"seed:{cfg.seed}",
            f"schedule:{name('schedule')}", f"model:{name('model')}", *map(str, cfg.wandb.get("tags") or [])]
    return [t[:64] for t in dict.fromkeys(tags)]


def eval_section(job_type: str, num_samples) -> str:
    """`eval` for the evaluations during training; `eval_<n>` (e.g. `eval_50k`) for an evaluation job of n
    samples, kept apart because FID is biased by the sample count (a 50k FID is lower than a 10k one)."""
    if job_type != "eval" or not num_samples:
        return "eval"
    n = int(num_samples)
    return f"eval_{n // 1000}k" if n % 1000 == 0 else f"eval_{n}"


def band_scalars(edges: np.ndarray, stats: dict, bands: int = BANDS) -> dict[str, float]:
    """Per-band loss mean and pooled variance from one flush's per-bin statistics.

    The bins are grouped into `bands` equal-width intervals of λ (by bin centre). With n_b, m_b, s²_b
    the count, mean and unbiased variance of bin b in band B:
        loss_mean = Σ n_b m_b / Σ n_b                       (the mean of every loss drawn in the band)
        loss_var  = Σ (n_b − 1) s²_b / Σ (n_b − 1)          (pooled within-bin variance: Var[ℓ | λ]
                                                             averaged over the band, without the spread
                                                             of the bin means along λ)
    A key is left out when its band has no sample (mean) or no bin with two samples (variance).
    Names: `logsnr_band/b<k>_<lo>_<hi>/loss_mean`, λ written with `m` for minus and `p` for the point.
    """
    edges = np.asarray(edges, dtype=np.float64)
    count = np.asarray(stats["count"], dtype=np.float64)
    mean = np.nan_to_num(np.asarray(stats["loss_mean"], dtype=np.float64))
    var = np.nan_to_num(np.asarray(stats["loss_var"], dtype=np.float64))
    lo, hi = edges[0], edges[-1]
    centers = 0.5 * (edges[1:] + edges[:-1])
    band_of = np.clip(np.floor((centers - lo) / (hi - lo) * bands), 0, bands - 1).astype(int)
    out: dict[str, float] = {}
    for band in np.unique(band_of):
        inside = np.flatnonzero(band_of == band)
        key = f"logsnr_band/b{band}_{_lambda_label(edges[inside[0]])}_{_lambda_label(edges[inside[-1] + 1])}"
        n, m, s2 = count[inside], mean[inside], var[inside]
        if n.sum() > 0:
            out[f"{key}/loss_mean"] = float((n * m).sum() / n.sum())
        dof = np.clip(n - 1, 0, None)
        if dof.sum() > 0:
            out[f"{key}/loss_var"] = float((dof * s2).sum() / dof.sum())
    return out


def _lambda_label(value: float) -> str:
    text = f"{round(float(value), 2) + 0.0:g}"                  # + 0.0: no "-0"
    return text.replace("-", "m").replace(".", "p")


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class WriterLock:
    """`<run>/wandb/writer.lock`: an exclusive `flock` held while this process writes to the run's W&B id
    (released by the kernel if the process dies). Never waits."""

    def __init__(self, wandb_dir: Path):
        self.path = wandb_dir / WRITER_LOCK
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


class WandbLogger(Callback):
    """Logs a training run or an evaluation job to W&B (rank 0). Starts at `on_start`; without a mode or key
    (wandb.*) it does nothing. Reads `job_type` ("train" unless the caller says "eval") from the object
    it is started with, which has `.cfg`, `.run_dir`, `.step`, `.images_seen` (and `.stats` in training)."""

    def __init__(self):
        self.run = None
        self.job_type = "train"
        self._rows: dict[str, list] = {"step": [], "loss_var": []}   # heatmap history, from logsnr_stats.npz on resume
        self._flushes = 0
        self._restore_env: dict = {}
        self._lock: WriterLock | None = None
        self._fid_min: tuple[float, float] | None = None             # (FID, images seen) of the best evaluation

    def on_start(self, trainer) -> None:
        self.job_type = str(getattr(trainer, "job_type", "train"))
        self.run_dir = Path(trainer.run_dir)
        self.total_steps = int(trainer.cfg.train.steps)
        self.plots_every = max(1, int(trainer.cfg.wandb.get("plots_every", 5)))
        log.info("%s", mode_reason(trainer.cfg.wandb.mode))
        self.run, self._restore_env, self._lock = self.create(trainer.cfg, trainer)
        if self.run is not None and self.job_type == "train" and trainer.step > 0:
            self._load_history(trainer.step, trainer.cfg.eval.get("num_samples"))

    def _load_history(self, up_to_step: int, fid_samples) -> None:
        """The heatmap rows and the best FID of the run before this resume (also when W&B was offline, so
        the summary of a requeued offline piece covers the whole run)."""
        from diffrun.monitoring.metrics import FILENAME as METRICS
        from diffrun.monitoring.metrics import read_jsonl
        from diffrun.monitoring.stats_writer import load_stats

        with contextlib.suppress(Exception):     # no earlier statistics file: the heatmap starts at the resume
            old = load_stats(self.run_dir)
            keep = old["step"] <= up_to_step
            self._rows = {"step": list(old["step"][keep]), "loss_var": list(old["loss_var"][keep])}
        with contextlib.suppress(OSError):
            for record in read_jsonl(self.run_dir / METRICS):
                same_estimator = record.get("fid_num_samples", fid_samples) == fid_samples
                if int(record.get("step", 0)) <= up_to_step and _scalar(record.get("fid")) and same_estimator:
                    self._note_fid(float(record["fid"]), float(record.get("images_seen", 0)))

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: DictConfig, trainer):
        """(run, saved environment, writer lock); (None, {}, None) when disabled or if W&B is unusable."""
        mode = resolve_mode(cfg.wandb.mode)
        if mode == "disabled":
            return None, {}, None
        try:
            import wandb
        except ImportError:
            log.warning("wandb.mode=%s but wandb is not installed; not logging to W&B", mode)
            return None, {}, None
        run_dir = Path(trainer.run_dir)
        job_type = str(getattr(trainer, "job_type", "train"))
        wandb_dir = run_dir / "wandb"
        lock = WriterLock(wandb_dir)
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
            writer = lock.acquire()
            kwargs = cls._init_kwargs(cfg, run_dir, job_type, int(getattr(trainer, "step", 0)), writer)
        except OSError as exc:                   # e.g. evaluating a run directory this user cannot write
            lock.release()
            log.warning("W&B needs a writable %s (%s); continuing without W&B", wandb_dir, exc)
            return None, {}, None
        if not writer:
            lock = None
            if job_type != "eval" and mode == "online":
                log.warning("an evaluation job is writing to W&B run %s; this training logs offline to %s — upload "
                            "later with `wandb sync %s/offline-run-*`", kwargs["id"], wandb_dir, wandb_dir)
                mode = "offline"
        # Artifacts (tables) are staged before upload; keep them with the run instead of ~/.local/share.
        restore = {key: os.environ.get(key) for key in ("WANDB_DIR", "WANDB_DATA_DIR")}
        for key, value in unusable_environment().items():
            why = "empty" if not value.strip() else f"not a W&B mode (allowed {', '.join(ENV_MODES)})"
            log.warning("$%s=%r is %s; treated as unset", key, value, why)
            restore.setdefault(key, os.environ.pop(key))
        os.environ["WANDB_DIR"] = str(wandb_dir.parent)
        os.environ["WANDB_DATA_DIR"] = str(wandb_dir / "data")
        if mode == "online" and not cls._has_credentials(wandb):
            log.warning("wandb.mode=online but no W&B credentials were found (WANDB_API_KEY, or `wandb login`); "
                        "logging offline to %s — upload later with `wandb login && wandb sync %s/offline-run-*`",
                        wandb_dir, wandb_dir)
            mode = "offline"
        timeout = float(cfg.wandb.get("init_timeout", 10.0))
        run = error = None
        before = set(wandb_dir.glob("*run-*"))          # earlier pieces' folders (offline-run-* too) stay
        try:
            run = cls._init(wandb, mode, kwargs, timeout)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            error = exc
        if run is None and mode == "online":
            log.warning("W&B online start failed (%s: %s; wandb.init_timeout=%g s); logging offline to %s — "
                        "upload later with `wandb sync %s/offline-run-*`", type(error).__name__,
                        (str(error).splitlines() or [""])[0], timeout, wandb_dir, wandb_dir)
            cls._abandon_online_attempt(wandb, set(wandb_dir.glob("run-*")) - before)
            try:
                run = cls._init(wandb, "offline", kwargs, timeout)
            except Exception as exc:  # noqa: BLE001
                error = exc
        others = [key for key in os.environ if key.startswith("WANDB_") and key not in ("WANDB_DIR", "WANDB_DATA_DIR")]
        if run is None and others:   # no W&B data lost to a setting W&B refuses: offline, under its defaults
            log.warning("W&B could not start (%s: %s); logging offline to %s without the W&B environment variables "
                        "%s — upload later with `wandb sync %s/offline-run-*`", type(error).__name__,
                        (str(error).splitlines() or [""])[0], wandb_dir, ", ".join(sorted(others)), wandb_dir)
            for key in others:
                restore.setdefault(key, os.environ.pop(key))
            cls._abandon_online_attempt(wandb, set(wandb_dir.glob("*run-*")) - before)
            try:
                run = cls._init(wandb, "offline", kwargs, timeout)
            except Exception as exc:  # noqa: BLE001
                error = exc
        if run is None:
            log.warning("W&B could not start (%s: %s); continuing without W&B", type(error).__name__, error)
            if lock is not None:
                lock.release()
            cls._restore(restore)
            return None, {}, None
        cls._define_metrics(run)
        return run, restore, lock

    @staticmethod
    def _init_kwargs(cfg: DictConfig, run_dir: Path, job_type: str, step: int, writer: bool) -> dict:
        """wandb.init arguments. Training: the run's own W&B id. Evaluation: the training run's id when no
        other process writes to it (`writer`: this process holds its writer lock; config, job_type and tags
        stay the training's), else a sibling W&B run in the same group."""
        name = str(cfg.name)
        common = dict(project=cfg.wandb.project, entity=cfg.wandb.get("entity"), resume="allow",
                      group=group_name(cfg), dir=str(run_dir))
        config = {**OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "strategy": strategy_of(cfg)}
        if job_type != "eval":
            wandb_id = run_id(run_dir, name, fresh=str(cfg.resume) == "never")
            return dict(common, id=wandb_id, name=name, job_type="train", tags=default_tags(cfg), config=config)
        exists = (run_dir / ID_FILE).exists()
        training_id = run_id(run_dir, name)
        if writer and exists:
            return dict(common, id=training_id)
        if writer:                # no training W&B run yet: this evaluation starts it
            return dict(common, id=training_id, name=name, job_type="eval", tags=default_tags(cfg), config=config)
        log.warning("W&B run %s is being written by another process (training still running); this evaluation "
                    "goes to the sibling W&B run %s-eval-%d in the same group", training_id, training_id, step)
        return dict(common, id=f"{training_id}-eval-{step}", name=f"{name}-eval-{step}", job_type="eval",
                    tags=default_tags(cfg), config=config)

    @staticmethod
    def _has_credentials(wandb) -> bool:
        """Whether W&B finds credentials without asking: never an interactive prompt, and no network. W&B's
        early account query (for the "logged in as" line; 5 s per try without network, tried up to three
        times during login and init) is turned off with `x_disable_viewer`."""
        try:
            wandb.setup(settings=wandb.Settings(mode="online", x_disable_viewer=True))   # over $WANDB_MODE
            return bool(wandb.login(prompt=False, verify=False))
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed key
            log.warning("W&B credentials unusable (%s: %s)", type(exc).__name__, exc)
            return False

    @staticmethod
    def _init(wandb, mode: str, kwargs: dict, timeout: float):
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
        log.info("W&B run %s (%s): %s", run.id, mode, getattr(run, "url", None) or Path(run.dir).parent)
        return run

    @staticmethod
    def _abandon_online_attempt(wandb, leftovers: set[Path]) -> None:
        """Stop W&B's service, which still holds the failed run's id (the offline retry would otherwise fail
        with "run ID … is in use"), and remove the folder the attempt made (earlier runs' folders stay)."""
        try:
            wandb.teardown()
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B teardown after the failed online attempt: %s: %s", type(exc).__name__, exc)
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _define_metrics(run) -> None:
        """Every series against images seen; `kimg` is logged beside it as a second choice of x-axis."""
        try:
            run.define_metric(STEP_METRIC)
            for pattern in SERIES:
                run.define_metric(pattern, step_metric=STEP_METRIC)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B define_metric failed: %s: %s", type(exc).__name__, exc)

    @staticmethod
    def _restore(saved: dict) -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

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

    def on_eval(self, trainer, record: dict) -> None:
        """Evaluation numbers (FID, KID, ...) at the images seen; during training also the best FID so far
        (`eval/fid_min`) in the summary, where `eval/fid` is the last."""
        if self.run is None:
            return
        section = eval_section(self.job_type, record.get("fid_num_samples"))
        values = {f"{section}/{k}": float(v) for k, v in record.items()
                  if k not in ("step", "images_seen") and _scalar(v)}
        images_seen = int(record.get("images_seen", getattr(trainer, "images_seen", 0)))
        step = None if self.job_type == "eval" else int(record.get("step", getattr(trainer, "step", 0)))
        self._log(values, images_seen, step)
        summary = {f"{section}/{k}": v for k, v in record.items() if isinstance(v, str)}   # sampler, weights
        if section == "eval" and f"{section}/fid" in values:
            summary.update(self._note_fid(values[f"{section}/fid"], images_seen))
        self._summarize(summary)

    # --- trainer callbacks -----------------------------------------------------------------------------
    def on_flush(self, trainer, record: dict, stats: dict) -> None:
        if self.run is None:
            return
        try:
            data = self._flush_data(trainer, record, stats)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning("could not prepare W&B data at step %s (%s: %s)", record.get("step"), type(exc).__name__, exc)
            return
        self._log(data, int(record.get("images_seen", trainer.images_seen)), int(record["step"]))
        if _scalar(record.get("fid")):
            self._summarize(self._note_fid(float(record["fid"]), float(record.get("images_seen", 0))))

    def _flush_data(self, trainer, record: dict, stats: dict) -> dict:
        import wandb

        step = int(record["step"])
        self._flushes += 1
        data: dict = {}
        for key, value in record.items():
            if key in ("step", "time", "images_seen") or not _scalar(value):
                continue
            data[f"eval/{key}" if key.startswith(EVAL_PREFIXES) else f"train/{key}"] = value
        arrays = {k: np.asarray(v.cpu().numpy() if hasattr(v, "cpu") else v, dtype=np.float64) for k, v in stats.items()}
        edges = trainer.stats.edges.numpy().astype(np.float64)
        centers = 0.5 * (edges[1:] + edges[:-1])
        count = arrays["count"]
        data["stats/logsnr_hist"] = wandb.Histogram(np_histogram=(count, edges))
        data.update(band_scalars(edges, arrays))
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
        self._log({"samples": image}, trainer.images_seen, None if self.job_type == "eval" else trainer.step)

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
                self._lock.release()
                self._lock = None
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
