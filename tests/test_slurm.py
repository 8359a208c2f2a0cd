"""Sweeps on a real SLURM cluster (scripts/slurm_local_cluster.sh): submitit arrays, the index, preemption.

Skipped with the reason when no usable cluster answers (slurm_utils.slurm_available).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffrun.launching.status import sweep_status
from diffrun.run_folder import INDEX
from diffrun.monitoring.metrics import read_jsonl
from diffrun.reporting.collect import collect_sweep
from diffrun.training.checkpoint import CheckpointManager

from conftest import FAST
from slurm_utils import list_jobs, release_held_jobs, require_slurm, skip_or_fail, slurm_job_scope

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
# Jobs inherit this environment (sbatch --export=ALL): one torch thread per 1-CPU job.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BATCH = 8


@pytest.fixture(autouse=True)
def _slurm():
    require_slurm()


def launch(sweep: Path, name: str, *overrides: str) -> subprocess.Popen:
    """A SLURM multirun; the process blocks until every job is done (or the test gives up)."""
    args = [sys.executable, "-m", "diffrun.cli", "-m", *FAST, "hydra/launcher=slurm", f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={sweep}", *overrides]
    return subprocess.Popen(args, cwd=sweep.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# submitit 1.5.4 can read a requeued job's accounting record as FAILED in the moment between `scontrol
# requeue` and the restart; its launcher then stops although the job goes on (docs/sweeps.md).
REQUEUE_MISREAD = "has not produced any output (state: FAILED)"


def finish(proc: subprocess.Popen, timeout: float, release_prefix: str | None = None,
           job_after_misread: Path | None = None) -> str:
    """Wait for the launching process; with `release_prefix`, start requeued jobs without the requeue delay.
    With `job_after_misread`, a launcher stopped by submitit's requeue misread is tolerated: the job folder is
    then followed to the end instead (the checks that follow read the folder, not the launcher)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if release_prefix:
            release_held_jobs(release_prefix)
        time.sleep(1)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    if proc.returncode != 0 and job_after_misread is not None and REQUEUE_MISREAD in out:
        while status(job_after_misread).get("state") != "finished" and time.monotonic() < deadline:
            if release_prefix:
                release_held_jobs(release_prefix)
            time.sleep(1)
        return ""
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_until(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the multirun ended before {what}:\n{proc.communicate()[0][-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def index_lines(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / INDEX).read_text().splitlines()]


def status(job_dir: Path) -> dict:
    try:
        return json.loads((job_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_slurm_sweep_strategies_x_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    with slurm_job_scope("diffrun-test-sweep") as name:
        finish(launch(sweep, name, "weighting=uniform,min_snr", "seed=0,1"), timeout=300)
    folders = {"0_uniform_seed0": ("uniform", 0), "1_uniform_seed1": ("uniform", 1),
               "2_min_snr_seed0": ("min_snr", 0), "3_min_snr_seed1": ("min_snr", 1)}
    for folder in folders:
        job = sweep / folder
        assert status(job)["state"] == "finished", folder
        assert read_jsonl(job / "metrics.jsonl")[-1]["step"] == 6
        assert np.load(job / "logsnr_stats.npz")["count"].sum() == BATCH * 6
        assert (job / "samples" / "step_00000006.png").exists()

    lines = index_lines(sweep)
    assert {e["dir"]: (e["weighting"], e["seed"]) for e in lines} == folders and len(lines) == 4
    array_ids = {e["slurm_job_id"].split("_")[0] for e in lines}
    assert len(array_ids) == 1  # one SLURM array; task i is job num i
    assert all(e["slurm_job_id"] == f"{next(iter(array_ids))}_{e['job_num']}" for e in lines)
    assert all(e["restart_count"] == 0 for e in lines)
    assert all(r.finished for r in collect_sweep(sweep).runs)


def test_slurm_usr2_checkpoints_requeues_and_resumes(tmp_path):
    """SIGUSR2 (what SLURM sends at --signal=USR2@<s> before the time limit, and at preemption) mid-run:
    GracefulInterrupt checkpoints, then chains to submitit's handler, which requeues the job; the
    requeued job reruns the same Hydra job in the same folder and resumes (resume=auto)."""
    steps = 800
    sweep = tmp_path / "sweep"
    job = sweep / "0_uniform_seed0"
    with slurm_job_scope("diffrun-test-preempt") as name:
        proc = launch(sweep, name, f"train.steps={steps}", "train.log_every=20", "checkpoint.every_steps=0")
        wait_until(lambda: (job / "metrics.jsonl").exists() and (job / "metrics.jsonl").stat().st_size > 0,
                   180, proc, "the job's first metrics")
        (slurm_job,) = list_jobs(name)
        subprocess.run(["scancel", "--signal=USR2", slurm_job.job_id], check=True)  # to the job's tasks
        wait_until(lambda: status(job).get("state") == "interrupted", 60, proc, "the checkpoint on SIGUSR2")
        stopped = status(job)["step"]
        assert 0 < stopped < steps and status(job)["signal"] == 12
        assert CheckpointManager(job / "checkpoints").list()[-1].name == f"ckpt_{stopped:08d}.pt"
        out = finish(proc, timeout=240, release_prefix=name, job_after_misread=job)

    final = status(job)
    assert final["state"] == "finished" and final["step"] == steps
    log = (job / "diffrun.log").read_text()
    assert f"resumed from {job}/checkpoints/ckpt_{stopped:08d}.pt at step {stopped}" in log
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit" / slurm_job.job_id).glob("*_0_log.*"))
    assert "Calling checkpoint method" in submitit_log and f"Requeued job {slurm_job.job_id}" in submitit_log

    lines = index_lines(sweep)  # same job, same folder, started twice
    assert [(e["dir"], e["slurm_job_id"], e["restart_count"], e["previous_state"]) for e in lines] == [
        (job.name, slurm_job.job_id, 0, None), (job.name, slurm_job.job_id, 1, "interrupted")]
    (row,) = sweep_status(sweep)  # diffrun-status after the requeue
    assert (row.job, row.state, row.step, row.restarts, row.slurm_job_id) == (
        job.name, "finished", steps, 1, slurm_job.job_id)

    records = read_jsonl(job / "metrics.jsonl")  # exactly train.steps steps: no step lost or trained twice
    assert [r["step"] for r in records] == list(range(20, steps + 1, 20))
    assert records[-1]["images_seen"] == BATCH * steps
    assert np.load(job / "logsnr_stats.npz")["count"].sum() == BATCH * steps
    assert "Error" not in out


def test_slurm_scancel_sigterm_checkpoints_and_rerun_resumes(tmp_path):
    """Plain `scancel` (SIGTERM; submitit ignores it, so no requeue): the run checkpoints and exits, the
    launcher reports the cancelled job, and the same command (same sweep dir) resumes it."""
    if subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30).returncode != 0:
        skip_or_fail("needs SLURM accounting (slurm_local_cluster.sh --accounting): without sacct, submitit "
                    "never learns that a cancelled job ended and the launcher waits forever")
    steps = 400
    sweep = tmp_path / "sweep"
    job = sweep / "0_uniform_seed0"
    overrides = (f"train.steps={steps}", "train.log_every=20", "checkpoint.every_steps=0")
    with slurm_job_scope("diffrun-test-term") as name:
        proc = launch(sweep, name, *overrides)
        wait_until(lambda: (job / "metrics.jsonl").exists() and (job / "metrics.jsonl").stat().st_size > 0,
                   180, proc, "the job's first metrics")
        (slurm_job,) = list_jobs(name)
        subprocess.run(["scancel", slurm_job.job_id], check=True)
        out = proc.communicate(timeout=120)[0]  # with accounting, submitit sees CANCELLED and gives up
        assert proc.returncode != 0 and "CANCELLED" in out, out[-3000:]
        stopped = status(job)["step"]
        assert status(job)["state"] == "interrupted" and status(job)["signal"] == 15 and 0 < stopped < steps
        finish(launch(sweep, name, *overrides), timeout=240)
    assert status(job)["state"] == "finished" and status(job)["step"] == steps
    assert f"at step {stopped}" in (job / "diffrun.log").read_text()
    assert [e["previous_state"] for e in index_lines(sweep)] == [None, "interrupted"]
    assert np.load(job / "logsnr_stats.npz")["count"].sum() == BATCH * steps
