"""diffrun-eval's door: a short --help of its own, and `ckpt=` given a run folder (its latest checkpoint) or a
sweep folder (the latest checkpoint of every run, as a multirun)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from diffrun.errors import ConfigError
from diffrun.evaluation.checkpoint_eval import checkpoints_in
from diffrun.evaluation.cli import USAGE, checkpoint_arguments
from diffrun.training.checkpoint import CheckpointManager


def write_run(run_dir, steps=(3, 6)):
    manager = CheckpointManager(run_dir / "checkpoints")
    return [manager.save({"config": {}}, step) for step in steps]


def test_ckpt_of_a_run_folder_is_its_latest_checkpoint(tmp_path):
    paths = write_run(tmp_path / "run")
    assert checkpoints_in(str(tmp_path / "run")) == [paths[-1]]
    assert checkpoint_arguments([f"ckpt={tmp_path}/run", "eval.num_samples=10"]) == [
        f"ckpt={paths[-1]}", "eval.num_samples=10"]
    assert checkpoint_arguments([f"ckpt={paths[0]}"]) == [f"ckpt={paths[0]}"]   # a file stays as it is


def test_ckpt_of_a_sweep_folder_is_a_multirun_over_its_runs(tmp_path):
    first, second = write_run(tmp_path / "sweep" / "0_uniform_seed0")[-1], write_run(tmp_path / "sweep" / "1_min_snr_seed0")[-1]
    (tmp_path / "sweep" / "report").mkdir()     # not a run: skipped
    assert checkpoint_arguments([f"ckpt={tmp_path}/sweep"]) == ["-m", f"ckpt={first},{second}"]


def test_ckpt_of_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt='.*': a folder without checkpoints; allowed a checkpoint file"):
        checkpoints_in(str(tmp_path))


def test_help_is_short_and_its_own(capsys, monkeypatch):
    from diffrun.evaluation import cli

    monkeypatch.setattr(sys, "argv", ["diffrun-eval", "--help"])
    cli.main()
    out = capsys.readouterr().out
    assert out.strip() == USAGE and len(out.splitlines()) <= 20 and "ckpt=<run>" in out


@pytest.mark.slow
def test_cli_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffrun.evaluation.cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == USAGE, proc.stdout + proc.stderr
