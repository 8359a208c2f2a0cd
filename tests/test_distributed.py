"""DDP on CPU with gloo and two real processes: one model, a global batch, rank 0 alone writes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffrun.launching import local_ranks
from diffrun.training.setup import communication
from diffrun import distributed
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training.checkpoint import CheckpointManager

from conftest import FAST, compose_config

STEPS, BATCH = 6, 8
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _rank_main(rank, world, port, run_dir, out_dir, overrides=("weighting=min_snr",)):
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
                          "checkpoint.every_steps=3", *overrides])
    import diffrun.training.trainer as trainer_module

    captured = {}
    fit = trainer_module.Trainer.fit

    def fit_and_capture(self):
        out = fit(self)
        captured["model"] = {k: v.clone() for k, v in self.denoiser.state_dict().items()}
        captured["ema"] = {k: v.clone() for k, v in self.ema.model.state_dict().items()}
        captured["ranks"] = (self.rank, self.world_size, self.parts.local_batch_size)
        captured["strategy"] = {k: v.clone() for k, v in self.strategy.state_dict().items() if torch.is_tensor(v)}
        return out

    trainer_module.Trainer.fit = fit_and_capture
    train(cfg, run_dir)  # the CLI's path: distributed.session from the environment, then Trainer
    assert not distributed.info().enabled  # torn down
    torch.save({**captured, "writes": writes}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_ranks_gloo(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(2, local_ranks.free_port(), str(run_dir), str(out_dir)), nprocs=2, join=True)
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
    assert "train.batch_size=9 is the global batch and must be divisible by dist.devices=2" in proc.stdout + proc.stderr
    assert not (tmp_path / "odd").exists()  # refused before Hydra made the run directory


@pytest.mark.slow
@pytest.mark.parametrize("weighting, extra", [
    ("importance", ["weighting.num_timesteps=20", "weighting.history=2"]),
    ("adaptive_timestep", ["weighting.num_timesteps=20", "weighting.update_every=2", "weighting.probe_timesteps=5"]),
])
def test_adaptive_strategy_state_is_one_across_ranks(tmp_path, weighting, extra):
    """The strategy learns from the global batch: its state (histories, policy network, buffers) is
    identical on both ranks after training, and is what rank 0's checkpoint holds."""
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_rank_main, args=(2, local_ranks.free_port(), str(run_dir), str(out_dir), (f"weighting={weighting}", *extra)),
             nprocs=2, join=True)
    r0, r1 = (torch.load(out_dir / f"rank{r}.pt", weights_only=False)["strategy"] for r in (0, 1))
    assert r0.keys() == r1.keys() and r0
    different = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert different == [], f"strategy state differs between ranks: {different}"
    state, _ = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert all(torch.equal(state["strategy"][k].cpu(), r0[k]) for k in r0)
    if weighting == "importance":
        assert int(r0["filled"].sum()) == BATCH * STEPS            # every rank's losses, not half of them
    else:
        assert int(r0["policy_updates"]) == STEPS // 2                # steps 0, 2, 4 (update_every=2)
        assert not torch.equal(r0["policy.head.weight"], torch.zeros_like(r0["policy.head.weight"]))  # it learned


def _factor_rank_main(rank, world, port, out_dir, logsnr, loss):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import diffrun.strategies as S

    half = logsnr.numel() // world
    mine = slice(rank * half, (rank + 1) * half)
    from diffrun.schedules import EDMSchedule

    with distributed.session(torch.device("cpu")):
        comm = communication(distributed.info())   # handed to the strategy at bind: it imports no launching code
        factors = {f"{variant}/{normalize}": S.VarianceAware(variant=variant, alpha=0.3, normalize=normalize)
                   .bind(EDMSchedule(), "edm", 0.5, comm).factor(logsnr[mine], loss[mine])
                   for variant in ("gaussian", "cauchy", "loss_zscore") for normalize in (False, True)}
    torch.save(factors, os.path.join(out_dir, f"factor{rank}.pt"))


@pytest.mark.slow
def test_variance_aware_factor_uses_the_global_batch(tmp_path):
    """μ, the loss z-score and the normaliser are over the global batch: two ranks with half a batch each
    give the factors one process computes on the whole batch."""
    import diffrun.strategies as S

    gen = torch.Generator().manual_seed(0)
    logsnr = torch.randn(16, generator=gen) * 2.4 + 2.4
    loss = torch.rand(16, generator=gen) + torch.linspace(0, 1, 16)       # halves with different means
    mp.spawn(_factor_rank_main, args=(2, local_ranks.free_port(), str(tmp_path), logsnr, loss), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"factor{r}.pt") for r in (0, 1)]
    for key in parts[0]:
        variant, normalize = key.split("/")
        whole = S.VarianceAware(variant=variant, alpha=0.3, normalize=normalize == "True").factor(logsnr, loss)
        torch.testing.assert_close(torch.cat([parts[0][key], parts[1][key]]), whole, rtol=1e-5, atol=1e-6, msg=key)
        half = S.VarianceAware(variant=variant, alpha=0.3, normalize=normalize == "True").factor(logsnr[:8], loss[:8])
        assert not torch.allclose(half, whole[:8]), f"{key}: the test batch does not tell global from local statistics"
