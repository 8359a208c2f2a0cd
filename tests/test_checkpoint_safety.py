"""A checkpoint is data, never code: pickled objects are refused before they run, an earlier checkpoint of one's
own converts to data and resumes exactly, and targets named by a file stay inside diffrun (issue 28)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from diffrun.cli import train
from diffrun.errors import CheckpointError
from diffrun.training import checkpoint as ckpt
from diffrun.training.checkpoint import CheckpointManager, PickledCheckpointError

QUIET = ["sample.num_images=0", "checkpoint.every_steps=0"]


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path, marker, config=None):
    """A file in diffrun's on-disk format (torch.save + a valid SHA-256 trailer) whose pickle runs a command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ckpt.encode({"config": config or {}, "step": 3, "payload": RunsCode(marker)}))
    return path


def as_earlier_format(state: dict) -> dict:
    """The state as diffrun wrote it before data-only checkpoints: Python's and NumPy's RNG states as the tuples
    random.getstate() and np.random.get_state() return (an ndarray inside: only pickle rebuilds it)."""
    rng = state["rng"]
    python, numpy = rng["python"], rng["numpy"]
    legacy = {**rng,
              "python": (python["version"], tuple(python["internal"].tolist()), python["gauss_next"]),
              "numpy": ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                        numpy["gauss"])}
    return {**state, "rng": legacy}


def test_rng_state_is_data_and_restores_every_stream():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()                    # a cached Gaussian in both
    from diffrun.training.environment import rng_state, set_rng_state

    state = rng_state()
    draws = random.random(), random.gauss(0, 1), np.random.randn(), float(torch.rand(()))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(ckpt.decode(ckpt.encode({"rng": state}), "memory")["rng"])   # through weights_only=True
    assert (random.random(), random.gauss(0, 1), np.random.randn(), float(torch.rand(()))) == draws


def test_crafted_pickle_runs_nothing_under_resume(make_cfg, tmp_path):
    marker = tmp_path / "ran"
    run_dir = tmp_path / "run"
    crafted_checkpoint(run_dir / "checkpoints" / "ckpt_00000003.pt", marker)
    with pytest.raises(PickledCheckpointError) as refused:
        train(make_cfg(["train.steps=6", "resume=auto", *QUIET]), run_dir)
    assert not marker.exists()
    message = str(refused.value)
    assert "posix.system" in message or "nt.system" in message
    assert "could run any code" in message and "diffrun-convert" in message and "checkpoint.allow_pickle=true" in message
    assert make_cfg(["checkpoint.allow_pickle=true"]).checkpoint.allow_pickle is True   # the key it names exists


def test_crafted_pickle_runs_nothing_under_diffrun_eval(tmp_path, capsys):
    from test_eval_app import compose_eval

    from diffrun.evaluation.cli import ValidateBeforeEvaluation

    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt", marker)
    with pytest.raises(SystemExit) as stop:
        ValidateBeforeEvaluation().on_run_start(compose_eval([f"ckpt={path}"], hydra_node=True))
    assert stop.value.code == 1 and not marker.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds pickled Python objects" in lines[0] and "diffrun-convert" in lines[0], lines
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.slow
def test_earlier_format_converts_and_resumes_bit_identically(make_cfg, tmp_path, capsys):
    common = ["deterministic=true", "train.steps=6", *QUIET]
    train(make_cfg(common), tmp_path / "straight")
    train(make_cfg([*common, "train.steps=4"]), tmp_path / "split")
    path = CheckpointManager(tmp_path / "split" / "checkpoints").list()[-1]
    path.write_bytes(ckpt.encode(as_earlier_format(ckpt.load(path))))
    with pytest.raises(PickledCheckpointError, match="diffrun-convert"):
        train(make_cfg(common), tmp_path / "split")
    assert ckpt.load(path, allow_pickle=True)["step"] == 4              # the way on for one's own file

    assert ckpt.main([str(tmp_path / "split")]) == 0
    assert "rewritten as data" in capsys.readouterr().out
    assert path.with_name(path.name + ".pickled").exists()
    ckpt.load(path)                                                     # data now: weights_only=True reads it
    train(make_cfg(common), tmp_path / "split")
    a = CheckpointManager(tmp_path / "straight" / "checkpoints").load_latest()[0]
    b = CheckpointManager(tmp_path / "split" / "checkpoints").load_latest()[0]
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        weights_a, weights_b = (a[part] if part == "model" else a[part]["model"]), (b[part] if part == "model" else b[part]["model"])
        for key in weights_a:
            assert torch.equal(weights_a[key], weights_b[key]), (part, key)
    assert ckpt.main([str(path)]) == 0 and "already data" in capsys.readouterr().out


def test_a_file_that_is_not_data_is_not_converted(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    path.write_bytes(ckpt.encode({"rng": None, "other": print}))        # a function: not data, not diffrun's format
    with pytest.raises(CheckpointError, match=r"not data \(print\)"):
        ckpt.convert(path)


# ----------------------------------------------------------------------------- targets named by a file

@pytest.mark.parametrize("key, target", [
    ("model", "os.system"),
    ("model", "diffrun.training.environment.os.system"),     # a path through a diffrun module to another's
    ("optimizer", "subprocess.Popen"),
    ("dataset.loader", "diffrun.files.atomic_write"),        # diffrun's, but a function no config file names
])
def test_a_foreign_target_in_a_checkpoint_config_runs_nothing(tmp_path, capsys, key, target):
    from omegaconf import OmegaConf
    from test_eval_app import compose_eval

    from conftest import compose_config
    from diffrun.evaluation.cli import ValidateBeforeEvaluation

    marker = tmp_path / "ran"
    config = OmegaConf.to_container(compose_config(), resolve=True, enum_to_str=True)
    node = config
    for part in key.split("."):
        node = node[part]
    node.clear()
    node.update({"_target_": target, "_args_": [f"touch {marker}"]})
    path = tmp_path / "run" / "checkpoints" / "ckpt_00000003.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(ckpt.encode({"config": config, "step": 3}))                  # data only: it loads
    with pytest.raises(SystemExit) as stop:
        ValidateBeforeEvaluation().on_run_start(compose_eval([f"ckpt={path}"], hydra_node=True))
    assert stop.value.code == 1 and not marker.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{key}._target_='{target}' in the config embedded in {path}" in lines[0], lines
    assert "nothing of it was imported or run" in lines[0]


def test_trusted_targets_come_from_diffrun_and_its_config_files():
    from conftest import compose_config
    from diffrun.targets import check_targets, config_folder_targets, is_diffrun_class

    assert {"torch.optim.AdamW", "torch.optim.Adam", "diffrun.data.load_cifar"} <= config_folder_targets()
    assert is_diffrun_class("diffrun.models.unet.UNet") and is_diffrun_class("diffrun.strategies.MinSNR")
    assert not is_diffrun_class("diffrun.training.environment.os.system") and not is_diffrun_class("os.system")
    for experiment in ("edm_cifar10", "variance_aware_cifar100", "adaptive_sampling_cifar10"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(compose_config([f"experiment={experiment}"]), resolve=True, enum_to_str=True)
        check_targets(config, "a shipped experiment")                             # nothing refused
    check_targets({"model": {"_target_": "my.Model"}}, "x", replaced=["model._target_"])  # the command line's
    check_targets({"model": {"_target_": "my.Model"}}, "x", replaced=["model"])           # a group chosen anew
