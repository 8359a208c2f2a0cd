"""diffrun-status: a synthetic sweep (a SLURM-requeued job, a finished one, a failed one, a pending one), the
backwards reading of metrics files, the command line, and a real local multirun watched while it runs."""
from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from diffrun.launching.status import JobStatus, main as status_main, sweep_status, table
from diffrun.run_folder.metrics import tail_metrics

from conftest import FAST

NOW = 1_800_000_000.0
BATCH = 32


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def start_line(num: int, weighting: str, seed: int, restart: int = 0, previous=None, when: float = NOW - 600,
               slurm: str | None = None) -> dict:
    return {"event": "start", "job_num": num, "dir": f"{num}_{weighting}_seed{seed}", "weighting": weighting,
            "seed": seed, "slurm_job_id": slurm, "restart_count": restart, "previous_state": previous,
            "start_time": iso(when)}


def write_job(sweep: Path, num: int, weighting: str, seed: int, state: str, steps: list[int], total: int = 1000,
              rates=(), fids=(), error: str | None = None, mtime: float = NOW - 30) -> Path:
    job = sweep / f"{num}_{weighting}_seed{seed}"
    job.mkdir(parents=True)
    lines = []
    for i, step in enumerate(steps):
        lines.append({"step": step, "images_seen": step * BATCH, "loss": 0.1, "images_per_sec": rates[i],
                      "time": NOW - 10 * (len(steps) - i)})
        lines += [{"step": s, "fid": f, "kid_mean": 0.01} for s, f in fids if s == step]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 99')  # torn
    status = {"state": state, "step": steps[0] if state == "running" else steps[-1], "total_steps": total}
    if error:
        status["error"] = error
    (job / "status.json").write_text(json.dumps(status))
    for name in ("metrics.jsonl", "status.json"):
        os.utime(job / name, (mtime, mtime))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    # job 0 ran under SLURM, was preempted at step 300 and requeued: two index lines, the second a restart
    write_job(sweep, 0, "uniform", 0, "running", [300, 350, 400, 450, 500], rates=[500, 400, 100, 300, 200])
    write_job(sweep, 1, "uniform", 1, "finished", [500, 1000], rates=[450, 460], fids=[(500, 40.0), (1000, 31.25)])
    write_job(sweep, 2, "min_snr", 0, "failed", [100], rates=[300],
              error="RuntimeError: CUDA out of memory.\nTraceback (most recent call last): ...")
    lines = [start_line(0, "uniform", 0, slurm="412_0"), start_line(1, "uniform", 1, slurm="412_1"),
             start_line(2, "min_snr", 0, slurm="412_2"),
             start_line(0, "uniform", 0, restart=1, previous="interrupted", when=NOW - 120, slurm="412_0"),
             start_line(1, "uniform", 1, previous="finished", when=NOW - 100, slurm="412_1")]   # a rerun skipped it
    (sweep / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (sweep / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params: null\n  overrides:\n    task:\n"
                                         "    - weighting=uniform,min_snr\n    - seed=0,1\n")
    return sweep


def test_requeued_running_finished_failed_pending(sweep):
    jobs = {j.job: j for j in sweep_status(sweep, now=NOW)}
    assert list(jobs) == ["0_uniform_seed0", "1_uniform_seed1", "2_min_snr_seed0", "job 3"]

    requeued = jobs["0_uniform_seed0"]
    assert (requeued.state, requeued.step, requeued.total_steps) == ("running", 500, 1000)
    assert requeued.restarts == 1 and requeued.slurm_job_id == "412_0"
    assert requeued.images_per_sec == 200          # median of the last 3 records (100, 300, 200)
    # 500 steps left × 32 images ÷ 200 images/s, less the 10 s since the last record
    assert requeued.eta_s == pytest.approx(500 * BATCH / 200 - 10)
    assert requeued.updated_s == pytest.approx(30, abs=1)

    done = jobs["1_uniform_seed1"]
    assert (done.state, done.step, done.fid, done.fid_step, done.eta_s) == ("finished", 1000, 31.25, 1000, None)
    assert done.restarts == 0                      # the rerun that skipped a finished job is no restart

    failed = jobs["2_min_snr_seed0"]
    assert failed.state == "failed" and failed.error == "RuntimeError: CUDA out of memory."

    pending = jobs["job 3"]
    assert (pending.state, pending.job_num, pending.strategy, pending.seed) == ("pending", 3, "min_snr", 1)

    text = table(list(jobs.values()))
    assert "4 jobs: 1 running, 1 finished, 1 failed, 1 pending" in text
    assert "2_min_snr_seed0: failed: RuntimeError: CUDA out of memory." in text
    assert "31.25 @1000" in text and "412_0" in text and "500/1000" in text


def test_restarted_job_not_yet_training_and_a_lost_one(sweep):
    job = sweep / "0_uniform_seed0"
    (job / "status.json").write_text(json.dumps({"state": "interrupted", "step": 450, "total_steps": 1000}))
    os.utime(job / "status.json", (NOW - 300, NOW - 300))   # before the requeued start logged at NOW - 120
    assert sweep_status(sweep, now=NOW)[0].state == "starting"

    (job / "status.json").write_text(json.dumps({"state": "running", "step": 450, "total_steps": 1000}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (job / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (row,) = [j for j in sweep_status(sweep, now=NOW) if j.job == job.name]
    assert row.state == "lost" and row.eta_s is None
    assert "rerun the sweep's command" in table([row])


def test_tail_metrics_reads_backwards_like_a_full_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": s / 7, "images_per_sec": s} for s in range(1, 400)]
    records.insert(120, {"step": 120, "fid": 12.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 400, "lo')
    train, evaluation = tail_metrics(tmp_path, train=3, block=97)       # blocks split lines everywhere
    assert [r["step"] for r in train] == [397, 398, 399] and evaluation == {"step": 120, "fid": 12.5}
    assert tail_metrics(tmp_path / "absent") == ([], None)


def test_single_run_directory(tmp_path):
    run = tmp_path / "outputs" / "runs" / "digits_unet_small_uniform_seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 3\nweighting:\n  name: p2\n")
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 6, "total_steps": 6, "fid": 50.5}))
    (row,) = sweep_status(run, now=NOW)
    assert (row.strategy, row.seed, row.state, row.step, row.fid) == ("p2", 3, "finished", 6, 50.5)


def test_command_line_outputs_and_errors(sweep, capsys, tmp_path):
    assert status_main([str(sweep), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["state"] for r in rows] == ["running", "finished", "failed", "pending"]
    assert rows[0]["restarts"] == "1" and rows[1]["fid"] == "31.25"

    assert status_main([str(sweep), "--json", "--watch", "0.01", "--count", "2"]) == 0
    refreshes = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(refreshes) == 2 and refreshes[0]["jobs"][0]["slurm_job_id"] == "412_0"

    assert status_main([str(sweep)]) == 0
    assert "restarts" in capsys.readouterr().out

    assert status_main([str(tmp_path / "nowhere")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert status_main([str(tmp_path / "empty")]) == 1
    assert "holds no job folders" in capsys.readouterr().err
    for bad in (["--watch", "0"], ["--csv", "--watch", "5"], ["--count", "2"]):
        with pytest.raises(SystemExit):
            status_main([str(sweep), *bad])
        assert "diffrun-status: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_status_of_a_local_multirun_while_it_runs(tmp_path):
    """The basic launcher runs job 0 while job 1 waits: status sees one running (with a step) and one pending,
    then both finished."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffrun.cli", "-m", *FAST, "train.steps=30", "checkpoint.every_steps=15",
                             "weighting=uniform,min_snr", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[JobStatus] = []
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (sweep / "multirun.yaml").exists():
            jobs = sweep_status(sweep)
            if jobs[0].state == "running" and (jobs[0].step or 0) > 0:
                seen = jobs
                break
        time.sleep(0.2)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert seen, "never saw job 0 running"
    assert [j.state for j in seen] == ["running", "pending"] and seen[1].strategy == "min_snr"
    final = sweep_status(sweep)
    assert [(j.job, j.state, j.step, j.restarts) for j in final] == [
        ("0_uniform_seed0", "finished", 30, 0), ("1_min_snr_seed0", "finished", 30, 0)]
