"""Sweeps that are safe to submit: each job checked against what its launcher gives it before anything is
submitted, a sweep preset or a launcher without `-m` refused with the command that runs it, and a submission
that failed never shown as pending by diffrun-status."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffrun.cli import CONF_DIR
from diffrun.errors import ConfigError, DiffrunError
from diffrun.launching.preflight import ValidateBeforeRun, check_launcher_resources, check_slurm_commands
from diffrun.launching.status import sweep_status, table

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ("min_snr_cifar10", "edm_cifar10", "variance_aware_cifar10", "variance_aware_cifar100",
                 "adaptive_sampling_cifar10", "all_strategies_cifar10")


def hydra_config(overrides: list[str], multirun: bool = False, callback=None):
    """The whole config (hydra node included) as Hydra hands it to the callbacks; `callback(config)` is called
    while Hydra is initialised (a multirun's checks compose its jobs)."""
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            config = GlobalHydra.instance().hydra.compose_config(
                "config", overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
            if callback is not None:
                callback(config)
    finally:
        GlobalHydra.instance().clear()
    return config


def job_and_launcher(overrides: list[str]):
    config = hydra_config(overrides)
    launcher = config.hydra.launcher
    return config, launcher, config.hydra.runtime.choices["hydra/launcher"]


def refusal(callback, overrides, capsys, multirun: bool = False) -> str:
    with pytest.raises(SystemExit) as stop:
        hydra_config(overrides, multirun, callback)
    assert stop.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "[ERROR]" in ln]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------
# each job against its launcher's resources
# ------------------------------------------------------------------------------------------------
def test_cpu_slurm_preset_refuses_fp16():
    job, launcher, name = job_and_launcher(["experiment=min_snr_cifar10", "hydra/launcher=slurm"])
    with pytest.raises(ConfigError, match=r"precision=fp16 .*hydra/launcher=slurm gives each job no GPU.*"
                                          r"use hydra/launcher=slurm_gpu .*or precision=fp32"):
        check_launcher_resources(job, launcher, name)
    for suggestion in (["hydra/launcher=slurm_gpu"], ["hydra/launcher=slurm", "precision=fp32"]):
        check_launcher_resources(*job_and_launcher(["experiment=min_snr_cifar10", *suggestion]))   # both pass


@pytest.mark.parametrize("overrides, expected", [
    (["hydra/launcher=slurm", "device=cuda"], r"device=cuda needs a GPU"),
    (["hydra/launcher=slurm", "precision=bf16"], r"precision=bf16 is a GPU precision"),
    (["hydra/launcher=slurm_gpu", "hydra.launcher.tasks_per_node=2"], r"tasks_per_node=2 .*gpus_per_node=1"),
    (["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=3", "hydra.launcher.tasks_per_node=3",
      "train.batch_size=64"], r"train.batch_size=64 .*divisible by the 3 ranks"),
    (["hydra/launcher=slurm_gpu", "dist.devices=2"], r"dist.devices=2: one GPU per rank.*allowed dist.devices <= 1"),
    (["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=2", "hydra.launcher.tasks_per_node=2",
      "dist.devices=2"], r"dist.devices=2 .*the launcher starts the ranks.*allowed dist.devices=1"),
    (["hydra/launcher=slurm_gpu", "device=mps"], r"device=mps"),
    (["hydra/launcher=slurm_gpu", "dataset=image_folder", "dataset.root=/no/such/folder"],
     r"dataset.root='/no/such/folder' is not a directory"),
    (["hydra/launcher=slurm_gpu", "eval.enabled=true", "eval.inception_weights=/no/such.pth"],
     r"eval.inception_weights='/no/such.pth': no such file"),
])
def test_job_against_its_launcher(overrides, expected):
    with pytest.raises(DiffrunError, match=expected):
        check_launcher_resources(*job_and_launcher(["debug=fast", *overrides]))


def test_a_gres_gpu_counts_as_a_gpu():
    job, launcher, name = job_and_launcher(["debug=fast", "hydra/launcher=slurm", "precision=fp16",
                                            "+hydra.launcher.gres=gpu:a100:2"])
    check_launcher_resources(job, launcher, name)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_pass_on_the_gpu_preset(preset):
    check_launcher_resources(*job_and_launcher([f"experiment={preset}", "hydra/launcher=slurm_gpu"]))


def test_every_paper_command_names_the_gpu_slurm_preset():
    """README, docs and the presets' headers: a paper sweep (an `experiment=` other than smoke) is submitted with
    `-m` and `hydra/launcher=slurm_gpu`."""
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "conf" / "experiment").glob("*.yaml")]
    commands = [line for path in texts for line in re.findall(r"diffrun (?:-m )?experiment=[^`\n]*", path.read_text())]
    on_this_machine = ("smoke", "calibration", "digits_study", "<")    # digits presets, run locally by design
    paper = [c for c in commands if not c.split("experiment=")[1].startswith(on_this_machine)]
    assert len(paper) >= 8, paper
    wrong = [c for c in paper if not c.startswith("diffrun -m ") or "hydra/launcher=slurm_gpu" not in c]
    assert not wrong, wrong


def test_no_sbatch_here(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"no sbatch or srun on PATH.*hydra/launcher=local"):
        check_slurm_commands("slurm_gpu")


# ------------------------------------------------------------------------------------------------
# a sweep without -m
# ------------------------------------------------------------------------------------------------
def test_sweep_preset_without_multirun_is_refused(capsys):
    line = refusal(ValidateBeforeRun().on_run_start, ["experiment=min_snr_cifar10"], capsys)
    assert "experiment=min_snr_cifar10 is a sweep (weighting: uniform,min_snr × seed: 0,1,2)" in line, line
    command = line.split("run every job with: ")[1].split(" (or")[0]
    assert shlex.split(command) == ["diffrun", "-m", "experiment=min_snr_cifar10", "hydra/launcher=slurm_gpu"]
    # the command it names composes, and one job of the preset is a single run
    ValidateBeforeRun().on_run_start(hydra_config(["experiment=min_snr_cifar10", "weighting=min_snr", "seed=1",
                                                   "device=cpu", "precision=fp32"]))


def test_launcher_without_multirun_is_refused(capsys):
    line = refusal(ValidateBeforeRun().on_run_start, ["debug=fast", "hydra/launcher=slurm_gpu"], capsys)
    assert "hydra/launcher=slurm_gpu launches the jobs of a sweep and is ignored without -m" in line, line
    assert line.endswith("run: diffrun -m hydra/launcher=slurm_gpu debug=fast"), line


@pytest.mark.slow
def test_multirun_of_the_cpu_preset_with_fp16_refused_in_one_line(capsys, tmp_path):
    line = refusal(ValidateBeforeRun().on_multirun_start, ["experiment=min_snr_cifar10", "hydra/launcher=slurm",
                                                           f"hydra.sweep.dir={tmp_path}/sweep"], capsys, multirun=True)
    assert "every job of the sweep: precision=fp16" in line, line
    assert not (tmp_path / "sweep").exists()


def fake_slurm(bin_dir: Path, sbatch_exit: int = 1) -> Path:
    """srun that answers --version and an sbatch that records its call and fails as a bad partition does."""
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text("#!/bin/sh\necho slurm 23.02\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho called >> {bin_dir}/sbatch.calls\n"
                                    f"echo 'sbatch: error: invalid partition specified: gpu' >&2\nexit {sbatch_exit}\n")
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_cli_refuses_the_cpu_preset_with_fp16_before_sbatch(tmp_path):
    bin_dir = fake_slurm(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "diffrun.cli", "-m", "experiment=min_snr_cifar10",
                           "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out and "precision=fp16" in out, out
    assert not (tmp_path / "sweep").exists() and not (bin_dir / "sbatch.calls").exists()


# ------------------------------------------------------------------------------------------------
# a submission that failed
# ------------------------------------------------------------------------------------------------
def planned_slurm_sweep(sweep: Path) -> Path:
    """The files a SLURM sweep has once Hydra planned it and submitit wrote its pickles, before sbatch answered."""
    config = hydra_config(["debug=fast", "hydra/launcher=slurm_gpu", "seed=0,1"], multirun=True)
    (sweep / ".submitit").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(config))
    (sweep / ".submitit" / "0123abcd.pkl").write_bytes(b"")
    return sweep


def test_failed_submission_is_not_pending(tmp_path):
    sweep = planned_slurm_sweep(tmp_path / "sweep")
    jobs = sweep_status(sweep)
    assert [j.state for j in jobs] == ["unsubmitted", "unsubmitted"]
    assert "never queued: no SLURM job id" in table(jobs)
    (sweep / ".submitit" / "4242_0").mkdir()        # sbatch answered: the jobs are queued
    assert [j.state for j in sweep_status(sweep)] == ["pending", "pending"]


@pytest.mark.slow
def test_cli_failed_submission_is_not_pending(tmp_path):
    bin_dir = fake_slurm(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "diffrun.cli", "-m", "debug=fast", "seed=0,1", "hydra/launcher=slurm",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 1 and "invalid partition" in proc.stderr, proc.stdout + proc.stderr
    assert (bin_dir / "sbatch.calls").exists() and (sweep / "multirun.yaml").exists()
    out = subprocess.run([sys.executable, "-m", "diffrun.launching.status", str(sweep)], capture_output=True,
                         text=True, timeout=60).stdout
    assert "2 jobs: 2 unsubmitted" in out and "pending" not in out, out


# ------------------------------------------------------------------------------------------------
# --dry-run
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_lists_the_jobs_and_checks_and_trains_nothing(tmp_path, capsys, monkeypatch):
    from diffrun.launching import dry_run

    monkeypatch.setattr(ValidateBeforeRun, "dry_run", True)
    argv = ["diffrun", "-m", "debug=fast", "--dry-run"]
    assert dry_run.take_flag(argv) and argv == ["diffrun", "-m", "debug=fast"]
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        hydra_config(["debug=fast", "weighting=uniform,min_snr", "eval.enabled=true", "wandb.mode=offline",
                      "sweep_name=try", f"hydra.sweep.dir={sweep}"], multirun=True,
                     callback=ValidateBeforeRun().on_multirun_start)
    out = capsys.readouterr().out
    assert stop.value.code in (0, 1), out     # 1 only where no Inception weights can be had here
    assert f"2 job(s) → {sweep}" in out, out
    for num, weighting in enumerate(("uniform", "min_snr")):
        assert f"job {num}  {sweep}/{num}_{weighting}_seed0" in out, out
        assert f"W&B        offline, group try/{weighting}" in out, out
    assert "FID        FID-" in out and "data       digits" in out and "Inception  " in out, out
    assert "W&B        offline (wandb.mode=offline)" in out, out
    assert not sweep.exists() and not (tmp_path / "outputs").exists()


def test_dry_run_of_a_refused_job_says_why(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(ValidateBeforeRun, "dry_run", True)
    with pytest.raises(SystemExit) as stop:
        hydra_config(["debug=fast", "optimizer.optim.lr=-1", f"hydra.run.dir={tmp_path}/run"],
                     callback=ValidateBeforeRun().on_run_start)
    out = capsys.readouterr().out
    assert stop.value.code == 1 and "REFUSED    optimizer.optim.lr=-1" in out and "NOT READY" in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffrun.cli", "-m", "experiment=smoke", "--dry-run",
                           f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "4 job(s)" in proc.stdout and proc.stdout.count("\njob ") == 4, proc.stdout
    assert list(tmp_path.iterdir()) == []
