"""Short real training runs on CPU: every dataset format, every prediction target, resume."""
import json

import pytest
import torch

from diffrun.cli import train
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training import checkpoint as ckpt
from diffrun.training.checkpoint import CheckpointManager
from diffrun.training.trainer import Trainer

from conftest import write_cifar, write_image_folder


def run(make_cfg, tmp_path, overrides=(), name="run"):
    cfg = make_cfg(list(overrides))
    out = tmp_path / name
    summary = train(cfg, out)
    return cfg, out, summary


def check_outputs(out, steps):
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == steps
    records = read_jsonl(out / "metrics.jsonl")
    assert records[-1]["step"] == steps
    for key in ("loss", "lr", "grad_norm", "images_per_sec"):
        assert key in records[-1] and records[-1][key] == records[-1][key]  # present and not NaN
    assert (out / "config.yaml").exists() and (out / "provenance.json").exists()
    assert list((out / "samples").glob("*.png"))
    assert CheckpointManager(out / "checkpoints").list()


def test_digits_run(make_cfg, tmp_path):
    cfg, out, summary = run(make_cfg, tmp_path)
    check_outputs(out, 6)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] or prov["packages"]["torch"]


def test_cifar_run(make_cfg, tmp_path):
    write_cifar(tmp_path / "data", "cifar10", per_file=4)
    _, out, _ = run(make_cfg, tmp_path, ["dataset=cifar10", f"dataset.loader.root={tmp_path/'data'}",
                                         "dataset.loader.download=false"])
    check_outputs(out, 6)


def test_image_folder_run(make_cfg, tmp_path):
    write_image_folder(tmp_path / "imgs", count=10, size=16)
    _, out, _ = run(make_cfg, tmp_path, ["dataset=image_folder", f"dataset.root={tmp_path/'imgs'}",
                                         "dataset.image_size=16"])
    check_outputs(out, 6)


@pytest.mark.parametrize("prediction,schedule", [("x0", "linear"), ("v", "shifted_cosine"), ("edm", "edm")])
def test_prediction_targets(make_cfg, tmp_path, prediction, schedule):
    _, out, _ = run(make_cfg, tmp_path, [f"model.prediction={prediction}", f"schedule={schedule}",
                                         "sample.sampler=ddpm"])
    check_outputs(out, 6)


def test_finished_run_is_skipped(make_cfg, tmp_path):
    cfg, out, _ = run(make_cfg, tmp_path)
    mtime = (out / "metrics.jsonl").stat().st_mtime
    again = train(cfg, out)
    assert again["state"] == "finished" and (out / "metrics.jsonl").stat().st_mtime == mtime


def test_resume_continues_same_step_and_optimizer(make_cfg, tmp_path):
    """Train 3 steps (checkpoint), then resume to 6: step and optimizer state carry over."""
    cfg3 = make_cfg(["train.steps=3", "checkpoint.every_steps=0"])
    out = tmp_path / "r"
    train(cfg3, out)
    state3 = ckpt.load(CheckpointManager(out / "checkpoints").list()[-1])
    cfg6 = make_cfg(["train.steps=6"])
    trainer = Trainer(cfg6, out)
    assert trainer.state.resume() and trainer.step == 3
    opt_state = trainer.optimizer.state_dict()["state"]
    first = next(iter(opt_state))
    torch.testing.assert_close(opt_state[first]["exp_avg"], state3["optimizer"]["state"][first]["exp_avg"])
    assert float(opt_state[first]["step"]) == 3
    trainer.directory.unlock()
    train(cfg6, out)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_resume_is_bit_identical(make_cfg, tmp_path):
    """Interrupted-and-resumed training reaches exactly the weights of an uninterrupted run (CPU, deterministic)."""
    common = ["deterministic=true", "train.steps=6", "checkpoint.every_steps=0", "sample.num_images=0"]
    train(make_cfg(common), tmp_path / "straight")
    train(make_cfg([*common, "train.steps=4"]), tmp_path / "split")
    train(make_cfg(common), tmp_path / "split")
    a = CheckpointManager(tmp_path / "straight" / "checkpoints").load_latest()[0]
    b = CheckpointManager(tmp_path / "split" / "checkpoints").load_latest()[0]
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
