"""W&B (docs/wandb.md): never a prompt, a bounded online attempt then a syncable offline run, groups per
strategy, images seen as the x-axis, per-band scalars, evaluation jobs resuming the training run.

Runs are read back with W&B's own decoder (`wandb leet inspect`). No test reaches the internet: the
W&B server is a local port that never answers, or the runs are offline.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omegaconf import OmegaConf

from diffrun.building import build
from diffrun.files import try_lock, unlock
from diffrun.training.logsnr_stats import LogSNRStats
from diffrun.monitoring.wandb_logger import WandbLogger
from diffrun.monitoring.wandb_mode import resolve_mode
from diffrun.monitoring.wandb_run import (ID_FILE, STEP_METRIC, WRITER_LOCK, group_name, restore_environment, run_id,
                                          start_run)
from diffrun.monitoring.wandb_stats import band_scalars
from diffrun.training.run_view import recorded_config

from conftest import FAST, compose_config, run_view

REPO = Path(__file__).resolve().parents[1]
STATS = ["stats.bins=16", "stats.logsnr_min=-12", "stats.logsnr_max=12"]


def read_wandb(path: Path) -> list[dict]:
    """Records of a run-*.wandb transaction log, decoded by wandb's own reader (wandb-core)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WANDB_SILENT": "true", "WANDB_DIR": str(path.parent)})
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def offline_runs(run_dir: Path) -> list[Path]:
    """`offline-run-<time>-<id>[-<n>]` folders, oldest first (W&B adds `-<n>` to a second start in the same second)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def holds(offline_dir: Path, wandb_id: str) -> bool:
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(wandb_id)}(-\d+)?", offline_dir.name) is not None


def records_of(offline_dir: Path) -> list[dict]:
    return read_wandb(next(offline_dir.glob("run-*.wandb")))


def run_record(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


def final_summary(records: list[dict]) -> dict:
    summary: dict = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def step_metric_of(records: list[dict]):
    """key → the step metric its define_metric record gives it (exact names, then `prefix*` globs)."""
    exact, globs = {}, []
    for r in records:
        if r["type"] == "metric":
            m = r["metric"]
            if "name" in m:
                exact[m["name"]] = m.get("step_metric")
            else:
                globs.append((m["glob_name"].rstrip("*"), m.get("step_metric")))

    def lookup(key: str):
        if key in exact:
            return exact[key]
        return next((metric for prefix, metric in globs if key.startswith(prefix)), None)

    return lookup


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B offline by default, its settings and credentials in a private home, a dead server address."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _reset_wandb()
    yield home
    _reset_wandb()


def _reset_wandb():
    """A fresh W&B singleton, so that it reads the environment the test set."""
    import wandb

    wandb.teardown()


class BlackHole:
    """A local W&B server address that accepts connections and never answers (a firewalled compute node)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def _hold(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)                     # kept open, never read, never answered

    def close(self):
        self._stop = True
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


def fake_run(cfg, run_dir: Path, step: int = 0, job_type: str = "train", bins: int = 16, **fields):
    return run_view(run_dir, cfg, step=step, job_type=job_type, stats=LogSNRStats(bins, -12.0, 12.0), **fields)


def logger_of(cfg) -> WandbLogger:
    """The W&B callback as a run builds it, from its node `callbacks.wandb`."""
    return build(cfg.callbacks.wandb)


def start(cfg, run_dir: Path):
    """(run, saved environment, writer lock) of a training's W&B start."""
    return start_run(cfg.wandb, recorded_config(cfg), run_dir, "train", 0, fresh=False)


def flush_stats(stats: LogSNRStats, n: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    stats.update(torch.empty(n).uniform_(-12, 12, generator=g), torch.rand(n, generator=g), torch.ones(n))
    return stats.flush()


# ---------------------------------------------------------------------------------------------------
# never blocks: a key and no network; a terminal and no key
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow   # waits out W&B's init timeout: the full tier
def test_key_without_network_leaves_a_syncable_offline_run_within_30s(wandb_env, monkeypatch, tmp_path, caplog):
    """The default `wandb.init_timeout`, a server that never answers: offline within 30 s, same W&B id."""
    server = BlackHole()
    try:
        monkeypatch.delenv("WANDB_MODE")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.port}")
        _reset_wandb()
        cfg = compose_config([*STATS])
        assert cfg.wandb.mode is None and resolve_mode(cfg.wandb.mode) == "online"
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        earlier = run_dir / "wandb" / f"run-20260101_000000-{run_id(run_dir, str(cfg.name))}"   # an earlier online job
        earlier.mkdir(parents=True)
        trainer = fake_run(cfg, run_dir)
        logger = logger_of(cfg)
        start = time.monotonic()
        logger.on_start(trainer)
        started_in = time.monotonic() - start
        assert logger.run is not None and started_in < 30, started_in
        assert server.held, "no online attempt was made"
        trainer.progress.step, trainer.progress.images_seen = 3, 24
        logger.on_flush(trainer, {"step": 3, "images_seen": 24, "loss": 0.5}, flush_stats(trainer.stats))
        logger.close()
    finally:
        server.close()
    assert "logging offline" in caplog.text
    wandb_id = (run_dir / ID_FILE).read_text().strip()
    (offline,) = offline_runs(run_dir)
    assert holds(offline, wandb_id)
    assert list((run_dir / "wandb").glob("run-*")) == [earlier]  # the failed attempt's folder removed, no other
    records = records_of(offline)
    assert run_record(records)["run_id"] == wandb_id
    (row,) = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert row["train/loss"] == 0.5 and row["images_seen"] == 24


def _controlling_terminal():
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_in_terminal(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str, float]:
    """Run `cmd` with a pseudo-terminal as its controlling terminal and stdin/stdout/stderr, typing nothing:
    a prompt would wait forever. Returns (exit code or None if killed at `timeout`, output, seconds)."""
    import pty

    master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                            preexec_fn=_controlling_terminal)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    elapsed = time.monotonic() - start
    reader.join(5)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace"), elapsed


@pytest.mark.slow
def test_terminal_without_key_never_prompts(wandb_env, tmp_path):
    """wandb.mode=online in an interactive terminal with no credentials: no account prompt, training runs
    (logging offline). Without the credential check W&B asks "Enter your choice" and waits forever."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_SILENT", None)
    cmd = [sys.executable, "-m", "diffrun.cli", *FAST, "wandb.mode=online", "sample.num_images=0",
           f"hydra.run.dir={run_dir}"]
    code, output, elapsed = run_in_terminal(cmd, env, timeout=240)
    assert "Enter your choice" not in output and "Create a W&B account" not in output, output[-3000:]
    assert code == 0, f"exit {code} after {elapsed:.0f}s:\n{output[-3000:]}"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert "no W&B credentials were found" in output
    (offline,) = offline_runs(run_dir)
    assert holds(offline, (run_dir / ID_FILE).read_text().strip())
    assert [r["history"]["step"]["num"] for r in records_of(offline) if r["type"] == "history"] == [3, 6]


# ---------------------------------------------------------------------------------------------------
# a sweep as W&B shows it: one group per strategy, images seen on x, per-band scalars
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real multirun (2 strategies × 2 seeds) logging offline."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9", "HOME": str(root),
           "WANDB_CONFIG_DIR": str(root / "wandb-config")}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "diffrun.cli", "-m", *FAST, *STATS, "sample.num_images=0",
           "weighting=uniform,min_snr", "seed=0,1", "sweep_name=wb", f"hydra.sweep.dir={root / 'wb'}"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (root / "wb").iterdir() if (p / ID_FILE).exists())
    assert len(jobs) == 4
    return {job.name: records_of(offline_runs(job)[0]) for job in jobs}


@pytest.mark.slow
def test_sweep_groups_one_line_per_strategy(sweep):
    runs = {name: run_record(records) for name, records in sweep.items()}
    groups = {name: run["run_group"] for name, run in runs.items()}
    assert groups == {"0_uniform_seed0": "wb/uniform", "1_uniform_seed1": "wb/uniform",
                      "2_min_snr_seed0": "wb/min_snr", "3_min_snr_seed1": "wb/min_snr"}
    for name, run in runs.items():
        strategy, seed = name.split("_", 1)[1].rsplit("_seed", 1)
        assert run["job_type"] == "train"
        assert {f"strategy:{strategy}", f"seed:{seed}"} <= set(run["tags"])
        assert run["config"]["update"]["strategy"] == strategy and run["config"]["update"]["seed"] == int(seed)


@pytest.mark.slow
def test_sweep_every_series_is_plotted_against_images_seen(sweep):
    for name, records in sweep.items():
        step_metric = step_metric_of(records)
        rows = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert [row[STEP_METRIC] for row in rows] == [24, 48] and [row["kimg"] for row in rows] == [0.024, 0.048]
        keys = {key.split(".")[0] for row in rows for key in row} - {STEP_METRIC, "_step", "_runtime", "_timestamp"}
        assert {"train/loss", "stats/logsnr_hist", "stats/loss_var_heatmap", "kimg"} <= keys
        for key in keys:
            assert step_metric(key) == STEP_METRIC, (name, key)


@pytest.mark.slow
def test_sweep_logs_band_scalars(sweep):
    """Per-band loss mean/variance as plain scalars (W&B can average them over seeds), 8 bands of 2 bins."""
    for records in sweep.values():
        row = [r["history"]["item"] for r in records if r["type"] == "history"][-1]
        band_keys = sorted(k for k in row if k.startswith("logsnr_band/"))
        assert band_keys and all(isinstance(row[k], float) for k in band_keys)
        names = {k.split("/")[1] for k in band_keys}
        assert names <= {"b0_m12_m9", "b1_m9_m6", "b2_m6_m3", "b3_m3_0", "b4_0_3", "b5_3_6", "b6_6_9", "b7_9_12"}
        assert {k.rsplit("/", 1)[1] for k in band_keys} == {"loss_mean", "loss_var"}


# ---------------------------------------------------------------------------------------------------
# the band scalars, in closed form
# ---------------------------------------------------------------------------------------------------
def test_band_scalars_match_numpy():
    """loss_mean = the mean of every loss in the band; loss_var = the pooled within-bin variance."""
    rng = np.random.default_rng(0)
    bins, lo, hi = 64, -10.0, 14.0
    stats = LogSNRStats(bins, lo, hi)
    lam = rng.uniform(lo, hi, 3000)
    loss = rng.gamma(2.0, 0.5, 3000) * (1 + 0.1 * lam**2)   # the mean varies along λ within a band
    stats.update(torch.tensor(lam, dtype=torch.float32), torch.tensor(loss), torch.ones(3000))
    out = band_scalars(stats.edges.numpy(), {k: v.numpy() for k, v in stats.flush().items()})

    index = np.clip(np.floor((lam.astype(np.float32) - lo) / (hi - lo) * bins), 0, bins - 1).astype(int)
    band = index // (bins // 8)
    width = (hi - lo) / 8
    for b in range(8):
        key = f"logsnr_band/b{b}_{_label(lo + b * width)}_{_label(lo + (b + 1) * width)}"
        sel = band == b
        assert out[f"{key}/loss_mean"] == pytest.approx(loss[sel].mean(), rel=1e-9)
        within = sum(((loss[sel & (index == i)] - loss[sel & (index == i)].mean()) ** 2).sum()
                     for i in np.unique(index[sel]))
        dof = sel.sum() - len(np.unique(index[sel]))
        assert out[f"{key}/loss_var"] == pytest.approx(within / dof, rel=1e-6)
    assert len(out) == 16


def _label(x: float) -> str:
    return f"{round(x, 2):g}".replace("-", "m").replace(".", "p")


def test_band_scalars_leave_out_empty_bands():
    edges = np.linspace(-12, 12, 17)
    count = np.zeros(16)
    count[[0, 1, 15]] = [1, 1, 5]
    stats = {"count": count, "loss_mean": np.where(count > 0, 2.0, np.nan),
             "loss_var": np.where(count > 1, 0.5, np.nan)}
    assert band_scalars(edges, stats) == {"logsnr_band/b0_m12_m9/loss_mean": 2.0,
                                          "logsnr_band/b7_9_12/loss_mean": 2.0,
                                          "logsnr_band/b7_9_12/loss_var": 0.5}
    # 10 bins into 8 bands of λ: a band holds the bins whose centre falls in it, named by their edges
    names = {k.split("/")[1] for k in band_scalars(np.linspace(0, 10, 11),
                                                    {"count": np.full(10, 3.0), "loss_mean": np.ones(10),
                                                     "loss_var": np.ones(10)})}
    assert names == {"b0_0_1", "b1_1_2", "b2_2_4", "b3_4_5", "b4_5_6", "b5_6_7", "b6_7_9", "b7_9_10"}


# ---------------------------------------------------------------------------------------------------
# FID in the summary; evaluation jobs
# ---------------------------------------------------------------------------------------------------
def test_fid_summary_is_min_and_last_as_plain_scalars(wandb_env, tmp_path):
    cfg = compose_config([*STATS, "experiment=smoke"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = fake_run(cfg, run_dir)
    logger = logger_of(cfg)
    logger.on_start(trainer)
    for step, fid in ((4, 40.0), (8, 25.0), (12, 31.0)):
        trainer.progress.step, trainer.progress.images_seen = step, step * 32
        logger.on_flush(trainer, {"step": step, "images_seen": step * 32, "loss": 1.0}, flush_stats(trainer.stats))
        logger.on_eval(trainer, {"step": step, "images_seen": step * 32, "fid": fid, "kid_mean": 0.01,
                                 "fid_num_samples": 100, "fid_sampler": "ddim-10"})
    logger.close()
    records = records_of(offline_runs(run_dir)[0])
    assert run_record(records)["run_group"] == "smoke/uniform"
    summary = final_summary(records)
    assert summary["eval/fid"] == 31.0 and summary["eval/fid_min"] == 25.0 and summary["eval/fid_min_kimg"] == 0.256
    assert summary["eval/fid_sampler"] == "ddim-10"
    fid_rows = [r["history"]["item"] for r in records if r["type"] == "history" and "eval/fid" in r["history"]["item"]]
    assert [(row[STEP_METRIC], row["eval/fid"]) for row in fid_rows] == [(128, 40.0), (256, 25.0), (384, 31.0)]
    assert all("train/loss" in row for row in fid_rows)      # one row per step: the flush and its evaluation


def test_fid_min_survives_a_requeue(wandb_env, tmp_path):
    """An offline piece after a requeue starts with an empty summary: the best FID comes from metrics.jsonl."""
    cfg = compose_config([*STATS, "eval.num_samples=100"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": 4, "images_seen": 32, "fid": 20.0, "fid_num_samples": 100},
             {"step": 6, "images_seen": 48, "fid": 5.0, "fid_num_samples": 50000},   # an evaluation job: not this series
             {"step": 8, "images_seen": 64, "fid": 18.0, "fid_num_samples": 100},
             {"step": 12, "images_seen": 96, "fid": 1.0, "fid_num_samples": 100}]    # after the checkpoint: replayed
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    trainer = fake_run(cfg, run_dir, step=8)
    logger = logger_of(cfg)
    logger.on_start(trainer)
    logger.on_eval(trainer, {"step": 12, "images_seen": 96, "fid": 19.0, "fid_num_samples": 100})
    logger.close()
    summary = final_summary(records_of(offline_runs(run_dir)[0]))
    assert summary["eval/fid"] == 19.0 and summary["eval/fid_min"] == 18.0 and summary["eval/fid_min_kimg"] == 0.064


def _train_offline(run_dir: Path, cfg) -> str:
    trainer = fake_run(cfg, run_dir)
    logger = logger_of(cfg)
    logger.on_start(trainer)
    for step in (3, 6):
        trainer.progress.step, trainer.progress.images_seen = step, step * 8
        logger.on_flush(trainer, {"step": step, "images_seen": step * 8, "loss": 1.0}, flush_stats(trainer.stats))
    logger.close()
    return (run_dir / ID_FILE).read_text().strip()


def test_evaluation_job_resumes_the_training_run(wandb_env, tmp_path):
    cfg = compose_config([*STATS, "sweep_name=wb", "experiment=smoke"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wandb_id = _train_offline(run_dir, cfg)
    eval_cfg = compose_config([*STATS, "experiment=smoke", "eval.num_samples=50000"])
    evaluator = fake_run(eval_cfg, run_dir, step=6, job_type="eval")
    logger = logger_of(eval_cfg)
    logger.on_start(evaluator)
    logger.on_eval(evaluator, {"step": 6, "images_seen": 48, "fid": 3.5, "kid_mean": 0.001,
                               "fid_num_samples": 50000, "fid_sampler": "heun-18"})
    logger.close()
    training, evaluation = offline_runs(run_dir)
    assert holds(training, wandb_id) and holds(evaluation, wandb_id)   # the same W&B run, continued
    records = records_of(evaluation)
    run = run_record(records)
    assert run["run_id"] == wandb_id and run["run_group"] == "smoke/uniform"
    assert not run.get("job_type") and set(run["config"]["update"]) <= {"_wandb"}   # the training's stay
    (row,) = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert row == {**row, "eval_50k/fid": 3.5, "eval_50k/kid_mean": 0.001, STEP_METRIC: 48, "kimg": 0.048}
    assert step_metric_of(records)("eval_50k/fid") == STEP_METRIC
    summary = final_summary(records)
    assert summary["eval_50k/fid"] == 3.5 and summary["eval_50k/fid_sampler"] == "heun-18"
    assert "eval/fid_min" not in summary                           # a 50k FID is not a point of the 10k curve


def test_evaluation_while_training_runs_goes_to_a_sibling_run(wandb_env, tmp_path):
    """One writer per W&B run: with the training still writing (its writer lock held), the evaluation logs
    to `<id>-eval-<step>` in the same group, job_type eval."""
    cfg = compose_config([*STATS, "experiment=smoke"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wandb_id = _train_offline(run_dir, cfg)
    training = try_lock(run_dir / "wandb" / WRITER_LOCK)
    assert training is not None
    try:
        evaluator = fake_run(cfg, run_dir, step=6, job_type="eval")
        logger = logger_of(cfg)
        logger.on_start(evaluator)
        logger.on_eval(evaluator, {"step": 6, "images_seen": 48, "fid": 30.0, "fid_num_samples": 100})
        logger.close()
        assert try_lock(run_dir / "wandb" / WRITER_LOCK) is None    # still the training's
    finally:
        unlock(training)
    sibling = next(d for d in offline_runs(run_dir) if holds(d, f"{wandb_id}-eval-6"))
    run = run_record(records_of(sibling))
    assert run["job_type"] == "eval" and run["run_group"] == "smoke/uniform"
    assert try_lock(run_dir / "wandb" / WRITER_LOCK) is not None   # released by every closed logger


def test_training_while_an_evaluation_writes_logs_offline(wandb_env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    cfg = compose_config([*STATS, "wandb.mode=online"])
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    evaluation = try_lock(run_dir / "wandb" / WRITER_LOCK)
    assert evaluation is not None
    try:
        run, restore, lock = start(cfg, run_dir)
        assert run is not None and lock is None
        run.finish()
        restore_environment(restore)
    finally:
        unlock(evaluation)
    assert "an evaluation job is writing" in caplog.text
    (offline,) = offline_runs(run_dir)
    assert holds(offline, (run_dir / ID_FILE).read_text().strip())


def test_online_failure_falls_back_to_offline(wandb_env, monkeypatch, tmp_path, caplog):
    """Any failure of the online attempt (here a simulated outage) ends in an offline run with the same id."""
    import wandb

    real_init, modes = wandb.init, []

    def init(*args, mode=None, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("simulated W&B outage")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    from diffrun.cli import train

    cfg = compose_config(["train.steps=4", "train.log_every=2", "sample.num_images=0", "wandb.mode=online", *STATS])
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 4 and modes == ["online", "offline"]
    assert "logging offline" in caplog.text
    (offline,) = offline_runs(tmp_path / "run")
    assert holds(offline, (tmp_path / "run" / ID_FILE).read_text().strip())


# ---------------------------------------------------------------------------------------------------
# small pieces, without a W&B process
# ---------------------------------------------------------------------------------------------------
def test_group_name():
    def group(overrides):
        cfg = compose_config(overrides)
        return group_name(cfg, cfg.wandb.group)

    assert group(["experiment=smoke", "weighting=min_snr"]) == "smoke/min_snr"
    assert group(["wandb.group=ablation", "weighting=p2"]) == "ablation/p2"
    assert group([]) is None                                      # a lone run, outside a sweep


def test_wandb_settings_are_checked_only_with_its_callback():
    """The W&B callback checks wandb.* when it is built; without it (`~callbacks.wandb`) they are not its run's."""
    from diffrun.validation import validate
    from diffrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^wandb.plots_every=0 is out of range: allowed"):
        validate(compose_config(["wandb.plots_every=0"]), environment=False)
    with pytest.raises(ConfigError, match=r"^wandb.init_timeout=-1.0 is out of range: allowed .*seconds"):
        validate(compose_config(["wandb.init_timeout=-1"]), environment=False)
    validate(compose_config(["wandb.plots_every=0", "wandb.init_timeout=-1", "~callbacks.wandb"]), environment=False)


def test_wandb_mode_default(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(None) == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(None) == "offline" and resolve_mode("disabled") == "disabled"
    with pytest.raises(Exception, match="wandb.mode='sometimes'"):
        resolve_mode("sometimes")
    assert start(compose_config(["wandb.mode=disabled"]), Path("/nonexistent")) == (None, {}, None)


class RecordingRun:
    def __init__(self):
        self.step, self.summary, self.logged, self.finished = 0, {}, [], False

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def logger_with(run, total_steps, plots_every):
    settings = OmegaConf.create({"mode": None, "plots_every": plots_every, "init_timeout": 10.0})
    logger = WandbLogger(settings, total_steps)
    logger.run = run
    return logger


def test_wandb_log_failure_does_not_stop_training(caplog):
    class BrokenRun(RecordingRun):
        def log(self, *args, **kwargs):
            raise ConnectionError("simulated")

    stats = LogSNRStats(4, -1, 1)
    stats.update(torch.zeros(3), torch.ones(3), torch.ones(3))
    trainer = run_view("/nonexistent", step=2, images_seen=16, stats=stats)
    logger = logger_with(BrokenRun(), total_steps=10, plots_every=1)
    logger.on_flush(trainer, {"step": 2, "images_seen": 16, "loss": 1.0}, stats.flush())
    assert logger.run is None and "no more W&B logging" in caplog.text
    logger.on_flush(trainer, {"step": 4, "images_seen": 32, "loss": 1.0}, stats.flush())   # silently nothing
    logger.close()


def test_wandb_eval_metrics_reach_the_run(tmp_path):
    """FID/KID: from the flush record and from the `on_eval` events other callbacks emit (no status.json reading)."""
    run = RecordingRun()
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished", "step": 8, "fid": 99.0}))
    logger = logger_with(run, total_steps=8, plots_every=100)
    stats = LogSNRStats(4, -1, 1)
    trainer = run_view(tmp_path, step=4, images_seen=32, stats=stats)
    logger.on_flush(trainer, {"step": 4, "images_seen": 32, "loss": 1.0, "fid": 30.0, "time": 1.0}, stats.flush())
    logger.on_eval(trainer, {"step": 6, "images_seen": 48, "kid_mean": 0.02, "fid_sampler": "ddim-10"})
    logger.on_eval(trainer, {"step": 8, "images_seen": 64, "fid": 12.5})
    logger.close()
    assert run.logged[0][1]["eval/fid"] == 30.0 and run.logged[0][1]["train/loss"] == 1.0
    assert "train/time" not in run.logged[0][1] and "train/images_seen" not in run.logged[0][1]
    assert run.logged[1] == (6, {STEP_METRIC: 48, "kimg": 0.048, "eval/kid_mean": 0.02})
    assert run.logged[2] == (8, {STEP_METRIC: 64, "kimg": 0.064, "eval/fid": 12.5})
    assert len(run.logged) == 3 and run.finished        # status.json is never read
    assert run.summary["eval/fid_min"] == 12.5 and run.summary["eval/fid_min_kimg"] == 0.064


def test_evaluation_job_appends_after_the_training_steps():
    """An evaluation job logs without `step=` (W&B appends after what the run has; an explicit step at or
    below the training's last would be dropped), into a section named by its sample count."""
    run = RecordingRun()
    logger = logger_with(run, total_steps=8, plots_every=100)
    evaluator = run_view("/nonexistent", step=8, images_seen=64, job_type="eval")
    logger.on_eval(evaluator, {"step": 8, "images_seen": 64, "fid": 3.0, "fid_num_samples": 50000})
    logger.on_eval(evaluator, {"step": 8, "images_seen": 64, "fid": 4.0, "fid_num_samples": 1234})
    assert run.logged == [(None, {STEP_METRIC: 64, "kimg": 0.064, "eval_50k/fid": 3.0, "eval_50k/fid_num_samples": 50000.0}),
                          (None, {STEP_METRIC: 64, "kimg": 0.064, "eval_1234/fid": 4.0, "eval_1234/fid_num_samples": 1234.0})]


@pytest.mark.parametrize("env_mode, config", [("", "wandb.mode=offline"), ("", None), ("sometimes", None)])
def test_empty_or_unknown_wandb_mode_is_unset_and_the_run_logs_offline(wandb_env, monkeypatch, tmp_path, caplog,
                                                                        env_mode, config):
    """`export WANDB_MODE=` (W&B itself refuses it, even offline): treated as unset with a warning, and the run
    logs offline; with a key and no wandb.mode the default is online, which falls back to offline here."""
    import wandb

    real_init, modes = wandb.init, []

    def init(*args, mode=None, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("no network here")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", env_mode)
    if config is None:
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = compose_config([*STATS, *([config] if config else [])])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run, restore, lock = start(cfg, run_dir)
    assert run is not None and modes[-1] == "offline"
    run.finish()
    restore_environment(restore)
    unlock(lock)
    assert f"$WANDB_MODE={env_mode!r} is" in caplog.text and "treated as unset" in caplog.text
    assert os.environ["WANDB_MODE"] == env_mode                       # the environment given back as it was
    (offline,) = offline_runs(run_dir)
    assert holds(offline, (run_dir / ID_FILE).read_text().strip())


def test_a_setting_wandb_refuses_still_leaves_an_offline_run(wandb_env, monkeypatch, tmp_path, caplog):
    """Whatever W&B refuses in the environment, the run logs offline under W&B's defaults."""
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")                 # not a number: W&B's settings refuse it
    cfg = compose_config([*STATS, "wandb.mode=offline"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run, restore, lock = start(cfg, run_dir)
    assert run is not None
    run.finish()
    restore_environment(restore)
    unlock(lock)
    assert "without the W&B environment variables" in caplog.text and "WANDB_INIT_TIMEOUT" in caplog.text
    assert os.environ["WANDB_INIT_TIMEOUT"] == "soon"
    (offline,) = offline_runs(run_dir)
    assert holds(offline, (run_dir / ID_FILE).read_text().strip())
