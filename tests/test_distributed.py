"""DDP on CPU with gloo and two real processes: one model, a global batch, rank 0 alone writes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffrun.launching import distributed
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training.checkpoint import CheckpointManager

from conftest import FAST, compose_config

STEPS, BATCH = 6, 8
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _rank_main(rank, world, port, run_dir, out_dir):
    """One rank, as torchrun would start it (RANK/WORLD_SIZE/... in the environment)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    writes = []

    def audit(event, args):  # every file this process creates, opens for writing, renames or deletes in run_dir
        if event == "open" and str(args[0]).startswith(run_dir):
            mode, flags = args[1], args[2] or 0
            if (mode and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS:
                writes.append(f"open {args[0]}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir") and str(args[0]).startswith(run_dir):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(audit)
    from diffrun.cli import train

    cfg = compose_config([f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.log_every=3",
                          "checkpoint.every_steps=3", "weighting=min_snr"])
    import diffrun.training.trainer as trainer_module

    captured = {}
    fit = trainer_module.Trainer.fit

    def fit_and_capture(self):
        out = fit(self)
        captured["model"] = {k: v.clone() for k, v in self.denoiser.state_dict().items()}
        captured["ema"] = {k: v.clone() for k, v in self.ema.model.state_dict().items()}
        captured["ranks"] = (self.rank, self.world_size, self.local_batch_size)
        return out

    trainer_module.Trainer.fit = fit_and_capture
    train(cfg, run_dir)  # the CLI's path: distributed.session from the environment, then Trainer
    assert not distributed.info().enabled  # torn down
    torch.save({**captured, "writes": writes}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_ranks_gloo(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(2, distributed.free_port(), str(run_dir), str(out_dir)), nprocs=2, join=True)
    r0, r1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    assert r0["ranks"] == (0, 2, BATCH // 2) and r1["ranks"] == (1, 2, BATCH // 2)
    assert r0["writes"] and r1["writes"] == []  # only rank 0 touched the run directory
    for key in ("model", "ema"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])  # one model across ranks

    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and records[-1]["images_seen"] == BATCH * STEPS
    stats = np.load(run_dir / "logsnr_stats.npz")
    assert stats["count"].sum() == BATCH * STEPS  # per-bin counts summed over both ranks
    state, _ = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert state["step"] == STEPS and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])  # seed + rank


@pytest.mark.slow
def test_cli_dist_devices_spawns_ranks(tmp_path):
    """`dist.devices=2`: the CLI process is rank 0 and starts rank 1 itself; a batch that does not split fails."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "diffrun.cli", *FAST, "dist.devices=2"]
    proc = subprocess.run([*base, f"hydra.run.dir={run}"], env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rank 0/2 (local 0) joined the gloo process group" in out
    assert json.loads((run / "status.json").read_text())["step"] == 6
    assert np.load(run / "logsnr_stats.npz")["count"].sum() == 8 * 6

    proc = subprocess.run([*base, "train.batch_size=9", f"hydra.run.dir={tmp_path / 'odd'}"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "train.batch_size=9 is the global batch and must be divisible by the 2 ranks" in proc.stdout + proc.stderr
