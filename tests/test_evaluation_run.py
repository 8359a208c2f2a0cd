"""FID wired into training: logged with step, sample count and protocol, reproduced by diffrun-eval, refused
before training when the reference cannot be had, and skipped with a reason (or failing, when asked) when the
Inception weights are unavailable."""
import json

import pytest

from diffrun.cli import train
from diffrun.errors import ConfigError
from diffrun.evaluation import protocol as protocol_module
from diffrun.launching.eval_checkpoint import evaluate_checkpoint
from diffrun.evaluation.inception import InceptionWeightsUnavailable
from diffrun.monitoring.metrics import read_jsonl

from test_eval_app import compose_eval

EVAL = ["eval.enabled=true", "eval.num_samples=20", "eval.num_reference=40", "eval.kid_subset_size=20",
        "eval.steps=4", "eval.batch_size=20"]


def test_fid_logged_and_reproduced_by_eval_command(make_cfg, tmp_path, fid_features):
    train(make_cfg([*EVAL, "eval.every_steps=3"]), tmp_path)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["fid_num_samples"] == 20 and r["fid"] > 0 and r["kid_std"] >= 0 for r in evals)
    assert all(r["source"] == "training" and r["kid_subset_size"] == 20 and "kid_note" not in r for r in evals)
    assert evals[-1]["fid_protocol"] == "FID-20 vs digits train (40 images of 1797), ddim 4 steps (4 NFE), fp32"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["fid"] == evals[-1]["fid"] and status["fid_protocol"] == evals[-1]["fid_protocol"]

    ckpt = sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))[-1]
    overrides = [f"ckpt={ckpt}"]
    result = evaluate_checkpoint(compose_eval(overrides), overrides)
    assert result["fid"] == pytest.approx(evals[-1]["fid"], rel=1e-4)  # same EMA weights, same sample seeds
    assert result["fid_protocol"] == evals[-1]["fid_protocol"] and result["source"] == "diffrun-eval"


def test_a_reference_larger_than_the_dataset_stops_training_before_the_first_step(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.num_reference=5000 exceeds the 1797 training images of dataset"):
        train(make_cfg([*EVAL[:2], "eval.num_reference=5000"]), tmp_path)
    assert read_jsonl(tmp_path / "metrics.jsonl") == []          # not one step trained
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_fid_unavailable_is_skipped_with_reason(make_cfg, tmp_path, monkeypatch):
    def unavailable(*a, **k):
        raise InceptionWeightsUnavailable("no Inception weights: put weights-inception-2015-12-05-6726825d.pth in ~/.cache/diffrun")

    monkeypatch.setattr(protocol_module, "resolve_inception_weights", unavailable)
    summary = train(make_cfg(EVAL), tmp_path / "skip")
    status = json.loads((tmp_path / "skip" / "status.json").read_text())
    assert status["state"] == "finished" and "weights-inception-2015-12-05" in status["fid_skipped"]
    assert "fid" not in summary and summary["fid_skipped"] == status["fid_skipped"]
    with pytest.raises(InceptionWeightsUnavailable):
        train(make_cfg([*EVAL, "eval.on_unavailable=fail"]), tmp_path / "fail")
    assert json.loads((tmp_path / "fail" / "status.json").read_text())["state"] == "failed"
