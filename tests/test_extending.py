"""docs/extending.md's examples, run as the page says. The weighting: its files written from the page, composed
with `-cd`, its weight checked in closed form, trained end to end, and its W(λ) plotted with diffrun-plot. The
callback: built from its own node, its argument checked at the door, its events seen in a run."""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffrun.cli import CONF_DIR, train
from diffrun.building import build
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.training.callbacks import build_callbacks

from conftest import FAST, compose_config

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "extending.md"


def example_files(folder: Path, names=("my_weightings.py", "my_conf/weighting/capped_snr.yaml")) -> dict[str, Path]:
    """The page's code blocks whose first line is `# <path>` of one of `names`, written under `folder`."""
    written = {}
    for lang, body in re.findall(r"```(python|yaml)\n(.*?)```", PAGE.read_text(), flags=re.S):
        first = body.splitlines()[0]
        name = first[2:].strip()
        if name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(body)
            written[name] = folder / name
    assert len(written) == len(names), written
    return written


def page_commands() -> list[str]:
    """The lines of the page's plain ``` blocks (commands) that use the example."""
    commands, fence = [], None
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:]
        elif fence == "" and "capped_snr" in line:
            commands.append(line)
    return commands


@pytest.fixture
def example(tmp_path, monkeypatch):
    example_files(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_weighting_composes_checks_and_weighs_as_written(example):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["debug=fast", f"hydra.searchpath=[file://{example}/my_conf]",
                                               "weighting=capped_snr", "device=cpu"])
    finally:
        GlobalHydra.instance().clear()
    strategy = build(cfg.weighting)
    logsnr = torch.tensor([-4.0, 0.0, math.log(5.0), 4.0], dtype=torch.float64)
    snr = logsnr.exp()
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / torch.sqrt(1 + snr)   # w in x0 space
    torch.testing.assert_close(strategy.log_weight(logsnr).exp(), expected)


@pytest.mark.slow
def test_the_page_commands_run(tmp_path):
    example_files(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    modules = {"diffrun": "diffrun.cli", "diffrun-plot": "diffrun.monitoring.plots"}
    commands = page_commands()
    assert len(commands) == 3, commands
    for line in (commands[0], commands[2]):       # the run and the plot (the sweep's jobs are that run, 6 times)
        words = shlex.split(line)
        assert words[0] == "PYTHONPATH=."
        proc = subprocess.run([sys.executable, "-m", modules[words[1]], *words[2:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "capped.png").stat().st_size > 10_000
    assert list((tmp_path / "outputs" / "debug" / "runs").glob("*capped_snr*/checkpoints/ckpt_*.pt"))


def test_the_callback_gets_its_arguments_from_its_node(tmp_path, monkeypatch, capsys):
    example_files(tmp_path, ("my_callbacks.py",))
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = ["+callbacks.mine._target_=my_callbacks.PrintLoss", "+callbacks.mine.every=5"]
    cfg = compose_config([*FAST, "train.steps=10", "train.log_every=1", "sample.num_images=0", *mine])
    (callback,) = [cb for cb in build_callbacks(cfg) if type(cb).__name__ == "PrintLoss"]
    assert callback.every == 5
    with pytest.raises(ConfigError, match=r"^callbacks.mine.every=0: allowed an integer >= 1$"):
        validate(compose_config([*mine[:1], "+callbacks.mine.every=0"]), environment=False)
    with pytest.raises(ConfigError, match=r"callbacks.mine.every='often': expected int"):
        validate(compose_config([*mine[:1], "+callbacks.mine.every=often"]), environment=False)
    train(cfg, tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if ": loss " in line]
    assert [line.split(":")[0] for line in lines] == [f"{cfg.name} step 5", f"{cfg.name} step 10"]


def test_the_dataset_checks_itself_and_trains(tmp_path, monkeypatch):
    """The page's loader: its own checks refuse before any work, its folder is not part of the run's identity,
    and it trains."""
    from diffrun.errors import DataError
    from diffrun.fingerprint import fingerprint

    example_files(tmp_path, ("my_data.py", "my_conf/dataset/mine.yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "mine"
    folder.mkdir()
    torch.save(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), folder / "images.pt")

    def composed(*overrides):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                return compose("config", overrides=[*FAST, f"hydra.searchpath=[file://{tmp_path}/my_conf]",
                                                    "dataset=mine", "sample.num_images=0", *overrides])
        finally:
            GlobalHydra.instance().clear()

    with pytest.raises(ConfigError, match=r"^dataset.channels=1: mine is RGB; allowed 3$"):
        validate(composed(f"dataset.root={folder}", "dataset.channels=1"))
    with pytest.raises(DataError, match=r"dataset.root='.*elsewhere' holds no images.pt"):
        validate(composed(f"dataset.root={tmp_path / 'elsewhere'}"))
    cfg = composed(f"dataset.root={folder}")
    validate(cfg)
    assert fingerprint(cfg) == fingerprint(composed(f"dataset.root={tmp_path / 'moved'}"))
    assert train(cfg, tmp_path / "run")["step"] == 6
