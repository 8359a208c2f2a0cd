"""Per-log-SNR statistics, `logsnr_stats.npz`, W&B of a resumed run (offline, read back with wandb's own
reader) and plots. The other W&B tests are in test_wandb.py.

No test touches the network: W&B runs offline with no API key and its base URL pointed at a local
socket that counts connections (asserted to stay at zero).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffrun.cli import train
from diffrun.training.logsnr_stats import LogSNRStats
from diffrun.monitoring.metrics import read_jsonl
from diffrun.monitoring.plots import DPI, main as plot_main
from diffrun.files import atomic_write
from diffrun.monitoring.stats_writer import FILENAME, PER_BIN, load_stats
from diffrun.monitoring.wandb_run import ID_FILE

from conftest import compose_config

BINS = 16
BATCH = 8
STATS = [f"stats.bins={BINS}", "stats.logsnr_min=-12", "stats.logsnr_max=12", f"train.batch_size={BATCH}"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a shared 2-core machine: 2 OpenMP threads are ~100× slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# the accumulator against numpy
# ---------------------------------------------------------------------------------------------------
def test_accumulator_matches_numpy():
    rng = np.random.default_rng(0)
    bins, lo, hi = 10, -5.0, 5.0
    stats = LogSNRStats(bins, lo, hi)
    batches = [(rng.normal(0, 4, n), rng.gamma(2.0, 0.5, n), rng.uniform(0.1, 3.0, n)) for n in (50, 70)]
    batches[0][0][:3] = [-100.0, 100.0, 5.0]                     # out of range → edge bins; λ = hi → last bin
    for lam, loss, w in batches:
        stats.update(torch.tensor(lam, dtype=torch.float32), torch.tensor(loss), torch.tensor(w))
    got = {k: v.numpy() for k, v in stats.flush().items()}

    lam, loss, w = (np.concatenate(x) for x in zip(*batches))
    index = np.clip(np.floor((lam.astype(np.float32) - lo) / (hi - lo) * bins), 0, bins - 1).astype(int)
    assert index[0] == 0 and index[1] == bins - 1 and index[2] == bins - 1
    for b in range(bins):
        sel = index == b
        n = sel.sum()
        assert got["count"][b] == n
        if n == 0:
            assert np.isnan(got["loss_mean"][b]) and np.isnan(got["weight_mean"][b])
            continue
        np.testing.assert_allclose(got["loss_mean"][b], loss[sel].mean(), rtol=1e-10)
        np.testing.assert_allclose(got["wloss_mean"][b], (w * loss)[sel].mean(), rtol=1e-10)
        np.testing.assert_allclose(got["weight_mean"][b], w[sel].mean(), rtol=1e-10)
        if n > 1:
            np.testing.assert_allclose(got["loss_var"][b], loss[sel].var(ddof=1), rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(got["wloss_var"][b], (w * loss)[sel].var(ddof=1), rtol=1e-8, atol=1e-12)
        else:
            assert np.isnan(got["loss_var"][b])
    assert got["count"].sum() == len(lam)                        # nothing dropped, out-of-range included
    assert stats.flush()["count"].sum() == 0                     # flush resets the window


def test_stats_range_from_schedule(make_cfg, tmp_path):
    from diffrun.training.trainer import Trainer

    cfg = make_cfg(["schedule=edm", "stats.range=schedule", "stats.write=false", "wandb.mode=disabled"])
    trainer = Trainer(cfg, tmp_path / "run", callbacks=[])
    assert trainer.stats.lo == pytest.approx(trainer.schedule.logsnr_min)    # −2 log 80
    assert trainer.stats.hi == pytest.approx(trainer.schedule.logsnr_max)    # −2 log 0.002


# ---------------------------------------------------------------------------------------------------
# a short real run, resumed, logging to W&B offline (shared by the tests below)
# ---------------------------------------------------------------------------------------------------
class ConnectionCounter:
    """A local TCP socket that counts connection attempts (stands in for the W&B server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port, self.count, self._stop = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.count += 1
            conn.close()

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def offline_env():
    server = ConnectionCounter()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        mp.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.port}")
        yield server
    server.close()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, offline_env):
    """10 steps (flushes 5, 10), a stale row at step 15 as if killed after flushing it, then resumed to 20."""
    out = tmp_path_factory.mktemp("run") / "job"
    common = [*STATS, "train.log_every=5", "checkpoint.every_steps=0", "wandb.mode=offline", "wandb.plots_every=1"]
    train(compose_config(["train.steps=10", *common]), out)
    first_id = (out / ID_FILE).read_text().strip()
    stale = load_stats(out)
    for key in ("step", "images_seen", *PER_BIN):
        stale[key] = np.concatenate([stale[key], stale[key][-1:]])
    stale["step"][-1], stale["loss_mean"][-1] = 15, 999.0
    atomic_write(out / FILENAME, lambda fh: np.savez(fh, **stale))
    train(compose_config(["train.steps=20", *common]), out)
    return SimpleNamespace(dir=out, first_id=first_id, server=offline_env)


def test_stats_npz_after_resume(resumed_run):
    out = resumed_run.dir
    a = load_stats(out)
    assert a["step"].tolist() == [5, 10, 15, 20]                 # stale row 15 replaced, nothing twice
    assert a["edges"].shape == (BINS + 1,) and a["centers"].shape == (BINS,)
    for key in PER_BIN:
        assert a[key].shape == (4, BINS), key
    count = a["count"]
    assert (count.sum(axis=1) == 5 * BATCH).all()                # every sample of every window, in some bin
    has = count > 0
    for key in ("loss_mean", "wloss_mean", "weight_mean"):
        assert np.isfinite(a[key][has]).all() and np.isnan(a[key][~has]).all(), key
    assert np.isfinite(a["loss_var"][count > 1]).all() and (a["loss_var"][count > 1] >= 0).all()
    assert (a["loss_mean"] != 999.0).all()
    # the per-bin means recombine to the loss the trainer logged for the same window
    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    for i, step in enumerate(a["step"]):
        pooled = np.nansum(a["loss_mean"][i] * count[i]) / count[i].sum()
        assert pooled == pytest.approx(records[step]["loss"], rel=1e-5)
    assert str(a["strategy"]) == "uniform"
    assert not list(out.glob("*.tmp"))


def _read_wandb(path: Path) -> list[dict]:
    """Records of a run-*.wandb transaction log, decoded by wandb's own reader (wandb-core)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WANDB_SILENT": "true", "WANDB_DIR": str(path.parent)})
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_reads_back(resumed_run):
    out = resumed_run.dir
    wandb_id = (out / ID_FILE).read_text().strip()
    assert wandb_id == resumed_run.first_id                       # the resumed job continues the same W&B run
    offline = sorted((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(wandb_id) for d in offline)

    records = _read_wandb(next(offline[0].glob("run-*.wandb")))
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_id"] == wandb_id and run["job_type"] == "train"
    assert {"strategy:uniform", "dataset:digits", "seed:0", "schedule:cosine", "model:unet_tiny"} <= set(run["tags"])
    config = run["config"]["update"]
    assert config["train"]["steps"] == 10 and config["stats"]["bins"] == BINS

    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [5, 10]
    counts = load_stats(out)["count"]
    for row, step in enumerate((5, 10)):
        item = history[step]
        assert item["stats/logsnr_hist._type"] == "histogram"
        assert len(item["stats/logsnr_hist.bins"]) == BINS + 1 and len(item["stats/logsnr_hist.values"]) == BINS
        assert item["stats/logsnr_hist.values"] == counts[row].tolist()
        for key in ("loss_mean", "loss_var", "weight_mean"):
            assert item[f"stats/{key}_vs_logsnr_table._type"] == "table-file"
            assert item[f"stats/{key}_vs_logsnr_table.nrows"] == BINS
            assert item[f"stats/{key}_vs_logsnr_table.ncols"] == 6
        assert item["stats/loss_var_heatmap._type"] == "image-file"
        assert "train/loss" in item and "train/lr" in item
    assert history[10]["samples._type"] == "image-file"
    table = json.loads((offline[0] / "files" / history[10]["stats/loss_mean_vs_logsnr_table.path"]).read_text())
    assert table["columns"][:3] == ["logsnr", "count", "loss_mean"] and len(table["data"]) == BINS
    assert any(r["type"] == "config" and "_wandb.visualize.stats/loss_mean_vs_logsnr" in json.dumps(r)
               for r in records)                                  # the line-plot panel spec

    resumed = _read_wandb(next(offline[1].glob("run-*.wandb")))
    assert sorted(r["history"]["step"]["num"] for r in resumed if r["type"] == "history") == [15, 20]
    assert resumed_run.server.count == 0                          # never contacted the (local stand-in) server
    assert os.environ.get("WANDB_DATA_DIR") is None or "job" not in os.environ["WANDB_DATA_DIR"]


# ---------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------
SIZES = {"loss_vs_logsnr.png": (12, 4.6), "loss_var_heatmap.png": (9, 5.5), "density_weight.png": (16, 4.8),
         "loss_vs_logsnr_final.png": (12, 4.6)}


def _check_png(path: Path):
    from PIL import Image

    assert path.stat().st_size > 10_000, path
    w, h = SIZES[path.name]
    assert Image.open(path).size == (round(w * DPI), round(h * DPI)), path


def test_plot_run(resumed_run, tmp_path, capsys):
    assert plot_main([str(resumed_run.dir), "--steps", "5", "20", "--out", str(tmp_path / "p")]) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert sorted(p.name for p in written) == ["density_weight.png", "loss_var_heatmap.png", "loss_vs_logsnr.png"]
    for path in written:
        _check_png(path)


def test_plot_sweep(make_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = tmp_path / "sweep"
    for i, weighting in enumerate(("uniform", "min_snr")):
        cfg = make_cfg(["train.steps=10", "train.log_every=5", f"weighting={weighting}", *STATS])
        train(cfg, sweep / f"{i}_{weighting}_seed0")
    assert plot_main([str(sweep)]) == 0                                          # default --out: <sweep>/plots
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(written) == 2 * 2 + 2
    assert (sweep / "plots" / "0_uniform_seed0" / "loss_var_heatmap.png") in written
    assert (sweep / "plots" / "1_min_snr_seed0" / "loss_vs_logsnr.png") in written
    for path in written:
        _check_png(path)
    assert plot_main([str(tmp_path / "nothing_here")]) == 2
