"""diffrun.run_folder: each file of a run folder and a sweep folder read back as written, by the one reader."""
from __future__ import annotations

import math

from diffrun.launching import status as diffrun_status
from diffrun.reporting import collect
from diffrun.run_folder import INDEX, JOB_FOLDER, METRICS, STATUS, holds_run
from diffrun.run_folder.index import append_entry, read_entries, starts_by_folder
from diffrun.run_folder.metrics import open_metrics, read_metrics, record_line, tail_metrics
from diffrun.run_folder.status import FINISHED, RUNNING, STATUS_PADDING, read_status, write_status


def test_status_round_trip(tmp_path):
    assert read_status(tmp_path) is None and not holds_run(tmp_path)
    write_status(tmp_path, RUNNING, 3, 10, fingerprint="abc")
    assert (tmp_path / STATUS).stat().st_size == STATUS_PADDING and holds_run(tmp_path)
    assert read_status(tmp_path) == {"state": RUNNING, "step": 3, "total_steps": 10, "fingerprint": "abc"}
    write_status(tmp_path, FINISHED, 10, 10, fid=12.5)
    assert read_status(tmp_path) == {"state": FINISHED, "step": 10, "total_steps": 10, "fid": 12.5}
    (tmp_path / STATUS).write_text("[1, 2]")
    assert read_status(tmp_path) is None


def test_metrics_round_trip_with_a_torn_line_and_a_resume(tmp_path):
    written = [{"step": s, "loss": s / 3, "images_per_sec": 100.0} for s in (1, 2, 3)]
    written.insert(2, {"step": 2, "fid": 9.5, "fid_protocol": "FID-1k"})
    with open_metrics(tmp_path) as fh:
        for record in written:
            fh.write(record_line(record))
        fh.write(record_line({"step": 4, "loss": math.nan, "grad_norm": math.inf}))
    with open(tmp_path / METRICS, "a") as fh:
        fh.write('{"step": 5, "lo')                                   # killed mid-line
    records = read_metrics(tmp_path)
    assert records == [*written, {"step": 4, "loss": "nan", "grad_norm": "inf"}]
    assert tail_metrics(tmp_path, train=2) == (records[-2:], written[2])

    open_metrics(tmp_path, resumed_at=2).close()                       # a resume from the step-2 checkpoint
    assert read_metrics(tmp_path) == written[:3]
    open_metrics(tmp_path).close()                                     # an evaluation only appends
    assert read_metrics(tmp_path) == written[:3]
    assert read_metrics(tmp_path / "absent") == []


def test_index_round_trip(tmp_path):
    first = {"event": "start", "job_num": 0, "dir": "0_uniform_seed0", "weighting": "uniform", "seed": 0}
    requeued = {**first, "restart_count": 1, "previous_state": "interrupted"}
    other = {**first, "job_num": 1, "dir": "sub/1_p2_seed0", "weighting": "p2"}
    assert read_entries(tmp_path) == []
    for entry in (first, other, requeued):
        assert append_entry(tmp_path, entry) == tmp_path / INDEX
    with open(tmp_path / INDEX, "a") as fh:
        fh.write('{"event": "sta')
    assert read_entries(tmp_path) == [first, other, requeued]
    assert starts_by_folder(tmp_path) == {"0_uniform_seed0": [first, requeued], "1_p2_seed0": [other]}


def test_one_job_folder_pattern_for_status_and_report():
    assert diffrun_status.JOB_FOLDER is JOB_FOLDER and collect.JOB_FOLDER is JOB_FOLDER
    assert not hasattr(diffrun_status, "JOB_DIR") and not hasattr(collect, "JOB_DIR")
    match = JOB_FOLDER.match("12_min_snr_gamma5_seed-1")
    assert (match["num"], match["strategy"], match["seed"]) == ("12", "min_snr_gamma5", "-1")
    assert JOB_FOLDER.match("report") is None


def test_sits_below_training_launching_and_reporting():
    import subprocess
    import sys

    code = ("import sys, diffrun.run_folder.status, diffrun.run_folder.metrics, diffrun.run_folder.index; "
            "print(sorted(m for m in sys.modules if m.startswith(('diffrun.', 'torch', 'omegaconf'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {m for m in eval(loaded) if not m.startswith("diffrun.run_folder")} <= {"diffrun.errors", "diffrun.files"}
