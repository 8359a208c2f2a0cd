"""Real multiruns in subprocesses: one folder per job, the sweep index, idempotent reruns, a failing job."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffrun.run_folder import INDEX
from diffrun.reporting.collect import collect_sweep, read_index
from diffrun.training.checkpoint import CheckpointManager

from conftest import FAST

# One torch thread per process: the CPU is shared, and two busy-waiting OpenMP pools make a tiny run 5x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def multirun(sweep_dir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "diffrun.cli", "-m", *FAST, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run(args, cwd=sweep_dir.parent, env=ENV, capture_output=True, text=True, timeout=timeout)


def index_lines(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / INDEX).read_text().splitlines()]


def status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


@pytest.mark.slow
def test_local_sweep_index_rerun_skips_finished_resumes_unfinished(tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "weighting=uniform,min_snr", "seed=0,1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = {"0_uniform_seed0": ("uniform", 0), "1_uniform_seed1": ("uniform", 1),
                "2_min_snr_seed0": ("min_snr", 0), "3_min_snr_seed1": ("min_snr", 1)}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(expected)
    for folder in expected:
        assert status(sweep / folder)["state"] == "finished" and status(sweep / folder)["step"] == 6

    lines = index_lines(sweep)
    assert len(lines) == 4
    for e in lines:
        assert expected[e["dir"]] == (e["weighting"], e["seed"])
        assert e["job_num"] == int(e["dir"].split("_")[0])
        assert e["dataset"] == "digits" and e["restart_count"] == 0 and e["previous_state"] is None
        assert f"weighting={e['weighting']}" in e["overrides"] and e["start_time"]
    assert len({e["sweep_name"] for e in lines}) == 1  # one name for the whole sweep (the folder's)
    index = read_index(sweep)  # the report reads it
    assert {k: (v["strategy"], v["seed"]) for k, v in index.items()} == expected
    assert all(r.finished for r in collect_sweep(sweep).runs)

    # job 3 "was preempted" after its step-3 checkpoint: the same command resumes it and skips the others
    job3 = sweep / "3_min_snr_seed1"
    manager = CheckpointManager(job3 / "checkpoints")
    for path in manager.list()[1:]:
        path.unlink()
    (job3 / "status.json").write_text(json.dumps({"state": "interrupted", "step": 3, "total_steps": 6}))
    finished_ckpt = CheckpointManager(sweep / "0_uniform_seed0" / "checkpoints").list()[-1]
    mtime = finished_ckpt.stat().st_mtime_ns

    proc = multirun(sweep, "weighting=uniform,min_snr", "seed=0,1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("already finished") == 3
    assert f"resumed from {job3}/checkpoints/ckpt_00000003.pt at step 3" in out
    assert status(job3)["state"] == "finished" and status(job3)["step"] == 6
    assert finished_ckpt.stat().st_mtime_ns == mtime  # skipped jobs did not train again
    rerun = index_lines(sweep)[4:]
    assert sorted(e["dir"] for e in rerun) == sorted(expected)  # same job numbers -> same folders
    assert {e["dir"]: e["previous_state"] for e in rerun} == {**{k: "finished" for k in expected}, job3.name: "interrupted"}


@pytest.mark.slow
def test_failing_job_does_not_stop_the_others(tmp_path):
    # A batch larger than the dataset is known only once the data is read: the job starts, then fails.
    # (A value the checks can see, e.g. weighting.gamma=-1, refuses the sweep before any job: test_validation.py.)
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "train.batch_size=5000,8")
    assert proc.returncode != 0  # the multirun reports the failure at the end...
    good, bad = status(sweep / "1_uniform_seed0"), status(sweep / "0_uniform_seed0")
    assert good["state"] == "finished" and good["step"] == 6  # ...after the other job ran
    assert bad["state"] == "failed" and "train.batch_size=5000 is larger than dataset digits" in bad["error"]
    runs = {r.name: r for r in collect_sweep(sweep).runs}
    assert runs["0_uniform_seed0"].state == "failed" and "batch_size" in runs["0_uniform_seed0"].error


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, "hydra/launcher=local", "weighting=uniform,min_snr")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for folder in ("0_uniform_seed0", "1_min_snr_seed0"):
        assert status(sweep / folder)["state"] == "finished"
    lines = index_lines(sweep)
    assert sorted(e["dir"] for e in lines) == ["0_uniform_seed0", "1_min_snr_seed0"]
    assert all(e["launcher_job_id"] for e in lines)  # submitit's job id (the local process id)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
