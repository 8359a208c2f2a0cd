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

    from diffrun.launching.eval_cli import ValidateBeforeEvaluation

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
    from diffrun.launching.eval_cli import ValidateBeforeEvaluation

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


# ----------------------------------------------------------------------------- shareable weights

@pytest.mark.slow
def test_export_holds_the_ema_weights_config_and_provenance_and_starts_a_run(make_cfg, tmp_path):
    import yaml

    from diffrun.training import export
    from diffrun.training.trainer import Trainer

    train(make_cfg(["train.steps=3", *QUIET]), tmp_path / "a")
    path = CheckpointManager(tmp_path / "a" / "checkpoints").list()[-1]
    state = ckpt.load(path)
    assert export.main([str(path), "-o", str(tmp_path / "ema.safetensors")]) == 0
    tensors, meta = export.read(tmp_path / "ema.safetensors")
    assert tensors.keys() == state["ema"]["model"].keys()
    assert all(torch.equal(tensors[k], state["ema"]["model"][k]) for k in tensors)
    assert (meta["format"], meta["step"], meta["fingerprint"]) == ("diffrun-ema-1", "3", state["fingerprint"])
    assert yaml.safe_load(meta["config"]) == state["config"] and yaml.safe_load(meta["model"]) == state["config"]["model"]
    provenance = (tmp_path / "a" / "provenance.json").read_text()
    assert meta["git_commit"] in provenance and "fid" not in meta                 # no FID measured: none claimed

    trainer = Trainer(make_cfg(["train.steps=3", *QUIET, f"+model.init_from={tmp_path / 'ema.safetensors'}"]),
                      tmp_path / "b")
    try:
        trainer._begin()
        for module in (trainer.denoiser, trainer.ema.model):
            weights = module.state_dict()
            assert all(torch.equal(weights[k], tensors[k]) for k in tensors)
    finally:
        trainer.directory.unlock()


@pytest.mark.parametrize("make_file, expected", [
    (lambda p: None, "cannot be read"),
    (lambda p: p.write_bytes(b"not safetensors"), "not a safetensors file"),
    (lambda p: __import__("safetensors.torch").torch.save_file({"w": torch.zeros(2)}, str(p)), "without diffrun's metadata"),
])
def test_init_from_refuses_what_is_not_an_export_at_the_door(tmp_path, capsys, make_file, expected):
    from test_validation import compose_run

    from diffrun.launching.preflight import ValidateBeforeRun

    path = tmp_path / "w.safetensors"
    make_file(path)
    with pytest.raises(SystemExit):
        ValidateBeforeRun().on_run_start(config=compose_run([f"+model.init_from={path}"], tmp_path))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"model.init_from={path}" in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_an_export_of_another_model_says_which_weights_do_not_fit(make_cfg, tmp_path):
    from diffrun.errors import ConfigError
    from diffrun.training import export
    from diffrun.training.trainer import Trainer

    train(make_cfg(["train.steps=3", *QUIET]), tmp_path / "a")
    exported = export.export(CheckpointManager(tmp_path / "a" / "checkpoints").list()[-1])
    trainer = Trainer(make_cfg(["train.steps=3", *QUIET, "model.net.channels=8"]), tmp_path / "b")
    try:
        with pytest.raises(ConfigError, match=r"model.init_from=.*do not fit this model \(0 missing, 0 unexpected, \d+ of another shape"):
            export.load_into(trainer.denoiser, exported)
    finally:
        trainer.directory.unlock()


# ----------------------------------------------------------------------------- bad values at the door

@pytest.mark.parametrize("content, expected", [
    (lambda tmp: b"a text file", "carries no SHA-256"),
    (lambda tmp: ckpt.encode({"weights": torch.zeros(2)}), "not a diffrun training checkpoint"),
    (lambda tmp: ckpt.encode({"x": RunsCode(tmp / "ran")}), "holds pickled Python objects"),
])
def test_resume_from_a_file_that_is_not_a_checkpoint_is_refused_at_the_door(tmp_path, capsys, content, expected):
    from test_validation import compose_run

    from diffrun.launching.preflight import ValidateBeforeRun

    path = tmp_path / "other.pt"
    path.write_bytes(content(tmp_path))
    with pytest.raises(SystemExit):
        ValidateBeforeRun().on_run_start(config=compose_run([f"resume={path}"], tmp_path))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"resume='{path}'" in err and expected in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("arg, expected", [
    ("name=run\U0001F600", "name: U+1F600 (GRINNING FACE) is not allowed here; unquoted values take ASCII only; "
                           "quote a value (a name) that needs other characters: name='run\U0001F600'"),
    ("name=run\u200fa", "name: U+200F (RIGHT-TO-LEFT MARK) is not allowed here; it is an invisible control or "
                        "formatting character; type the value without it: name=runa"),
    ("name=run\x07", "name: U+0007 (a control character) is not allowed here; it is an invisible control or "
                     "formatting character; type the value without it: name=run"),
    ("train.steps=\u0661\u0660\u0660", "train.steps: U+0661 (ARABIC-INDIC DIGIT ONE) is not allowed here; numbers "
                                       "take ASCII digits 0-9: train.steps=100"),
    ("precision=\uff46\uff50\uff13\uff12", "precision: U+FF46 (FULLWIDTH LATIN SMALL LETTER F) is not allowed here; "
                                           "write it in ASCII: precision=fp32"),
])
def test_an_override_with_a_character_hydra_cannot_read_is_explained_in_one_line(arg, expected):
    from diffrun.launching.preflight import override_character_errors

    assert override_character_errors(["model=unet_tiny", arg, "--cfg", "job"]) == [expected]
    fix = expected.rsplit(": ", 1)[1]
    assert override_character_errors([fix]) == []                    # what it suggests is read


def test_quoted_names_and_plain_overrides_pass_the_character_check():
    from diffrun.launching.preflight import override_character_errors

    assert override_character_errors(["name='run\U0001F600'", "train.steps=100", "-cd", "/tmp/конфиг"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("module", ["diffrun.cli", "diffrun.launching.eval_cli"])
def test_the_commands_refuse_such_an_override_in_one_line_and_make_nothing(tmp_path, module):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", module, "train.steps=\u0661\u0660", f"hydra.run.dir={tmp_path}/run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("[diffrun][ERROR] - train.steps: U+0661") and list(tmp_path.iterdir()) == []
