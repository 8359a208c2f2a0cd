"""The conventions a user expects of the command line: the job name and log file, `--help`, `--cfg hydra
--resolve`, the debug presets, the warm-up that fits the run, CPU threads, progress in logs, the closing
summary, and srun / submitit rendezvous through submitit's helper."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from diffrun.cli import closing_summary
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun import distributed
from diffrun.launching.hydra_node import header_line, option_lines
from diffrun.launching.sweep import planned_jobs
from diffrun.monitoring.progress import Progress
from diffrun.training.environment import available_cpus, busy_cores_warning, cpu_threads

from conftest import compose_config, run_view

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "diffrun.cli"]


def cli(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# ------------------------------------------------------------------------------------------------
# help, --cfg hydra --resolve, the job name
# ------------------------------------------------------------------------------------------------
def test_help_lists_every_group_option_with_its_header_line(tmp_path):
    out = cli("--help", "weighting=min_snr", cwd=tmp_path, COLUMNS="160")   # not the terminal pytest runs in
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("diffrun: train image diffusion models")
    for group in ("dataset", "schedule", "weighting", "model", "optimizer", "experiment", "debug", "hydra/launcher"):
        assert f"{group}=" in text
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            assert f" {path.stem} " in text, f"{group}/{path.stem} missing from --help"
    # the composition's choices are marked; each option's line is the start of its file's header comment
    assert "* min_snr " in text and "* digits " in text and "* basic " in text and "* uniform " not in text
    assert "Min-SNR-γ (Hang et al., ICCV 2023, arXiv:2303.09556)." in text
    assert "fast " in text and "slurm_multinode" in text


def test_option_lines_cut_to_width_and_escape_dollars(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.yaml").write_text("# @package _global_\n# Costs $5 — a long line " + "x" * 200 + "\nk: 1\n")
    (tmp_path / "g" / "b.yaml").write_text("k: 1\n")
    assert header_line(tmp_path / "g" / "b.yaml") == ""
    lines = option_lines("g", chosen="b", root=tmp_path, width=60).splitlines()
    assert lines[0].startswith("      a  Costs $$5 — a long line") and lines[0].endswith("…")
    assert len(lines[0].replace("$$", "$")) <= 60 and lines[1] == "    * b"


def test_cfg_hydra_resolve_and_the_job_name(tmp_path):
    out = cli("--cfg", "hydra", "--resolve", "hydra/launcher=slurm", "sweep_name=mine", "seed=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hydra = OmegaConf.create(out.stdout).hydra
    assert hydra.run.dir == "outputs/runs/digits_unet_small_uniform_seed4"
    assert hydra.sweep.dir == "outputs/sweeps/mine"
    assert hydra.job.name == "diffrun" and hydra.launcher.name == "diffrun-mine"


def test_multinode_preset_has_one_task_per_gpu():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffrun.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=slurm_multinode", "hydra.launcher.gpus_per_node=4"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher.nodes == 2 and launcher.gpus_per_node == launcher.tasks_per_node == 4
    assert launcher._target_.endswith("SlurmLauncher") and launcher.additional_parameters.requeue


# ------------------------------------------------------------------------------------------------
# debug=fast and the warm-up that fits the run
# ------------------------------------------------------------------------------------------------
def test_debug_fast_is_tiny_and_valid():
    cfg = compose_config(["debug=fast"], fast=False)
    validate(cfg)
    assert (cfg.model.name, cfg.train.steps, cfg.train.batch_size, cfg.eval.enabled) == ("unet_tiny", 20, 8, False)
    assert cfg.optimizer.warmup_steps < cfg.train.steps
    # over a paper preset too: the debug group comes last in the defaults list
    cfg = compose_config(["experiment=min_snr_cifar10", "debug=fast"], fast=False)
    assert (cfg.model.name, cfg.train.steps, cfg.eval.enabled) == ("unet_tiny", 20, False)


def test_warmup_longer_than_the_run_is_shortened(tmp_path, caplog):
    """The learning-rate schedule owns the rule: a warm-up not shorter than the run (a quick train.steps=60 with
    the preset's 100) warms up over a tenth of the run and says so; the config and its checks leave it alone."""
    import torch

    from diffrun.training.optim import build_lr_schedule, build_optimizer

    cfg = compose_config(["train.steps=60"], fast=False)
    assert cfg.optimizer.warmup_steps == 100
    validate(cfg)                                             # not refused
    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))], torch.device("cpu"))
    with caplog.at_level("INFO"):
        schedule = build_lr_schedule(cfg.optimizer, optimizer, cfg.train.steps, cfg.train.batch_size)
    assert "optimizer.warmup_steps=100 is not shorter than train.steps=60: the learning rate warms up over 6 " \
           "steps" in caplog.text
    peak, rates = optimizer.param_groups[0]["initial_lr"], []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[5] < peak and rates[6] == pytest.approx(peak) and rates[7] == pytest.approx(peak)
    assert cfg.optimizer.warmup_steps == 100                  # the config says what was asked


# ------------------------------------------------------------------------------------------------
# CPU threads
# ------------------------------------------------------------------------------------------------
def test_cpu_threads_rule(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert available_cpus() == 8
    assert cpu_threads(1, {}) == (8, "the 8 CPU(s) this process may run on")
    assert cpu_threads(3, {}) == (2, "the 8 CPU(s) this process may run on, shared by 3 processes")
    assert cpu_threads(16, {})[0] == 1
    assert cpu_threads(4, {"OMP_NUM_THREADS": "3", "SLURM_CPUS_PER_TASK": "6"}) == (3, "OMP_NUM_THREADS=3")
    assert cpu_threads(1, {"OMP_NUM_THREADS": "4,2"})[0] == 4
    assert cpu_threads(1, {"SLURM_CPUS_PER_TASK": "6"}) == (6, "SLURM_CPUS_PER_TASK=6")
    assert cpu_threads(2, {"SLURM_CPUS_PER_TASK": "6"})[0] == 3    # torchrun / dist.devices ranks inside one task
    assert cpu_threads(1, {"OMP_NUM_THREADS": ""})[0] == 8
    assert busy_cores_warning(1, load=30.0) is None and busy_cores_warning(4, load=7.5) is None
    assert busy_cores_warning(4, load=8.5).startswith("the load average (8.5) is above the 8 CPU(s)")
    for bad in ("0", "abc", "-2"):
        with pytest.raises(ConfigError, match=f"OMP_NUM_THREADS='{bad}': expected a positive whole number"):
            cpu_threads(1, {"OMP_NUM_THREADS": bad})


def test_local_launchers_share_the_cores(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from diffrun.launching.sweep import concurrent_jobs

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      seed: 0,1,2\n  overrides:\n    task:\n    - weighting=uniform,min_snr\n"
        "    - train.steps=5\n")
    plan = planned_jobs(tmp_path)
    assert len(plan) == 6 and plan[0] == ["seed=0", "weighting=uniform", "train.steps=5"]
    assert planned_jobs(tmp_path / "absent") is None

    def hydra_node(target: str, **launcher) -> SimpleNamespace:
        return OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path)},
                                 "launcher": {"_target_": target, **launcher}})

    for target, launcher, expected in [
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", {"tasks_per_node": 1}, 6),
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", {"tasks_per_node": 2}, 12),
        ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 4}, 4),
        ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", {}, 1),
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", {}, 1),
    ]:
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_node(target, **launcher)))
        assert concurrent_jobs()[0] == expected, target


# ------------------------------------------------------------------------------------------------
# a run as a SLURM job sees it: output to files, not a terminal
# ------------------------------------------------------------------------------------------------
def test_run_logs_without_carriage_returns(tmp_path):
    run = tmp_path / "run"
    out = cli("debug=fast", "train.steps=6", "optimizer.warmup_steps=100", "train.progress=true", "device=cpu",
              f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (run / "diffrun.log").read_text()            # hydra.job.name=diffrun
    for text in (out.stdout, out.stderr, log):
        assert "\r" not in text
    assert "torch uses 1 CPU thread (OMP_NUM_THREADS=1)" in log
    assert "optimizer.warmup_steps=100 is not shorter than train.steps=6" in log
    assert "step 5/6 (83%)" in log and "step 6/6 (100%)" in log and "ETA" in log
    assert f"finished {OmegaConf.load(run / 'config.yaml').name}: 6 steps; no FID (eval.enabled=false)" in log
    assert "samples        run/samples/step_00000006.png" in log        # relative to the working directory
    assert OmegaConf.load(run / "config.yaml").optimizer.warmup_steps == 100   # what was asked; the log says what ran


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_of(stream, enabled: bool = True) -> Progress:
    return Progress(enabled=enabled, total_steps=100, batch_size=10, stream=stream)


def test_progress_bar_only_on_a_terminal(caplog):
    record = {"step": 50, "loss": 0.25, "images_per_sec": 200.0}
    terminal = Terminal()
    run = run_view("r")
    bar = progress_of(terminal)
    bar.on_start(run)
    with caplog.at_level(logging.INFO, logger="diffrun"):
        bar.on_flush(run, record, {})
        logging.getLogger("diffrun").info("a log line while the bar is drawn")
    bar.close()
    assert "\r" in terminal.getvalue() and "50/100" in terminal.getvalue()
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]

    caplog.clear()
    file = io.StringIO()
    lines = progress_of(file)
    lines.on_start(run)
    with caplog.at_level(logging.INFO, logger="diffrun"):
        lines.on_flush(run, record, {})
    lines.close()
    assert file.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["step 50/100 (50%)  loss 0.2500  200 img/s  ETA 0m02s"]

    quiet = progress_of(Terminal(), enabled=False)
    quiet.on_start(run)
    with caplog.at_level(logging.INFO, logger="diffrun"):
        quiet.on_flush(run, record, {})
    assert quiet.bar is None and len(caplog.records) == 1


def test_closing_summary():
    cfg = OmegaConf.create({"name": "digits_x", "train": {"steps": 100}, "eval": {"enabled": True}})
    run = Path("outputs/runs/digits_x")
    text = closing_summary(cfg, run, {"step": 100, "fid": 36.61, "kid_mean": 0.005, "kid_std": 0.0021,
                                      "fid_num_samples": 200, "samples": f"{run}/samples/step_00000100.png"})
    assert text.splitlines() == [
        "finished digits_x: 100 steps; FID 36.61, KID 0.0050 ± 0.0021 (200 EMA samples)",
        "  run directory  outputs/runs/digits_x",
        "  samples        outputs/runs/digits_x/samples/step_00000100.png",
        "  metrics        outputs/runs/digits_x/metrics.jsonl",
        "  checkpoints    outputs/runs/digits_x/checkpoints"]
    skipped = closing_summary(cfg, run, {"step": 100, "fid_skipped": "no Inception weights"})
    assert skipped.splitlines()[0] == "finished digits_x: 100 steps; FID skipped: no Inception weights"
    stopped = closing_summary(cfg, run, {"step": 40, "interrupted": True})
    assert stopped.startswith("stopped digits_x at step 40/100 after a signal")


# ------------------------------------------------------------------------------------------------
# ranks: srun and submitit's local tasks, rendezvous through submitit's TorchDistributedEnvironment
# ------------------------------------------------------------------------------------------------
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NTASKS": "16",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_STEP_NUM_TASKS": "16"}


def test_srun_ranks_and_rendezvous(monkeypatch):
    for key in (*distributed.RANK_ENV, "SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    assert distributed.env_info() == distributed.DistInfo(rank=9, local_rank=1, world_size=16)
    host, port = distributed.submitit_rendezvous()
    assert host == "gpu-07" and 20000 <= port <= 60000
    assert distributed.submitit_rendezvous() == (host, port)          # the same on every task of the job
    assert "SUBMITIT_EXECUTOR" not in os.environ                       # srun by hand: the environment is left as it was
    monkeypatch.setenv("MASTER_PORT", "23456")
    assert distributed.submitit_rendezvous() == ("gpu-07", 23456)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.submitit_rendezvous() is None                   # torchrun sets its own


def test_submitit_local_tasks_are_ranks(monkeypatch):
    for key in (*distributed.RANK_ENV, *SLURM_STEP, "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in {"SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                       "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.env_info() == distributed.DistInfo(rank=1, local_rank=1, world_size=2)
    host, port = distributed.submitit_rendezvous()
    assert host and 20000 <= port <= 60000
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    assert distributed.env_info() == distributed.DistInfo()
    assert distributed.local_processes() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")                        # torchrun / dist.devices=4
    assert distributed.local_processes() == 4


@pytest.mark.slow
def test_submitit_local_tasks_train_as_ddp_ranks(tmp_path):
    """`hydra/launcher=local hydra.launcher.tasks_per_node=2`: two processes, one DDP job, rendezvous from
    submitit's TorchDistributedEnvironment (the code path of an srun step)."""
    from conftest import FAST

    sweep = tmp_path / "sweep"
    out = cli("-m", *FAST, "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "dist.backend=gloo",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = sweep / "0_uniform_seed0"
    log = (job / "diffrun.log").read_text()
    assert "rank 0/2 (local 0) joined the gloo process group at" in log
    assert "2 tasks each" in log
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["images_seen"] == 6 * 8     # the global batch
    assert json.loads((job / "status.json").read_text())["state"] == "finished"
    results = sorted(p.name for p in (sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2 and results[0].endswith("_0_result.pkl") and results[1].endswith("_1_result.pkl")
