"""scripts/bench_train.py (and scripts/bench/): output format on CPU (never timings), strategies that learn while benchmarked, the\n--overhead operator counts, and train.compile giving the eager result."""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_train  # noqa: E402
from bench import measure, report  # noqa: E402

from diffrun.training.trainer import Trainer  # noqa: E402

FAST_BENCH = ["--device", "cpu", "--model", "unet_tiny", "--batch", "4", "--num-images", "64",
              "--strategies", "uniform,min_snr", "--warmup", "1", "--windows", "1", "--steps-per-window", "1",
              "--sample-steps", "2", "--sample-batch", "2", "--inception-batch", "2", "--quiet"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench_train.main([*FAST_BENCH, "--json", str(path)]), path


def test_json_has_every_section(bench):
    result, path = bench
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"meta", "flops", "train", "strategies", "fid"}
    for key in ("date", "device", "device_name", "torch", "model", "params", "batch", "precision", "compile",
                "channels_last", "windows", "steps_per_window", "memory_kind", "command"):
        assert key in on_disk["meta"], key
    assert on_disk["meta"]["device"] == "cpu" and on_disk["meta"]["model"] == "unet_tiny"


def test_numbers_are_positive_and_finite(bench):
    result, _ = bench
    assert _positive(result["flops"]["forward_per_image"])
    assert result["flops"]["fwd_bwd_per_image"] > 2 * result["flops"]["forward_per_image"]  # backward ≈ 2× forward
    assert result["flops"]["peak_bf16_tflops"] is None                 # CPU: MFU is n/a, never a made-up peak
    for loop in ("diffrun", "peer"):
        row = result["train"][loop]
        for key in ("images_per_s", "step_ms", "step_ms_mean", "achieved_tflops", "peak_mem_bytes", "speedup_vs_peer"):
            assert _positive(row[key]), (loop, key, row[key])
        assert row["mfu"] is None
    assert _positive(result["train"]["peer"]["last_loss"])
    names = [r["name"] for r in result["strategies"]]
    assert names == ["uniform", "min_snr"]
    for row in result["strategies"]:
        assert row["status"] == "ok", row["error"]
        for key in ("step_ms", "ratio_to_uniform", "images_per_s", "peak_mem_bytes"):
            assert _positive(row[key]), (row["name"], key)
    assert result["strategies"][0]["ratio_to_uniform"] == pytest.approx(1.0)
    sampler, inception = result["fid"]["sampler"], result["fid"]["inception"]
    assert _positive(sampler["images_per_s"]) and sampler["net_evals_per_s"] == pytest.approx(2 * sampler["images_per_s"])
    # Inception weights may be missing offline: then a labelled n/a with the reason, never a number
    if inception["images_per_s"] is None:
        assert inception["notes"].startswith("n/a (")
    else:
        assert _positive(inception["images_per_s"])


def test_table_columns(bench):
    result, _ = bench
    text = report.format_report(result)
    lines = text.splitlines()
    for columns in (report.TRAIN_COLUMNS, report.STRATEGY_COLUMNS, report.FID_COLUMNS):
        header = next(line for line in lines if line.startswith(columns[0] + " ") and all(c in line for c in columns))
        assert header.split()[0] == columns[0]
    assert "not a performance claim" in text
    assert any(line.startswith("min_snr") for line in lines)
    assert any(line.startswith("peer: diffusers") for line in lines)


def test_broken_strategy_is_reported_not_raised(tmp_path):
    result = bench_train.main([*FAST_BENCH, "--strategies", "uniform,no_such_weighting", "--no-peer", "--no-fid"])
    broken = result["strategies"][1]
    assert broken["name"] == "no_such_weighting" and broken["status"] == "error" and broken["error"]
    assert result["train"]["peer"] is None and result["fid"] is None
    assert "no_such_weighting" in report.format_report(result)


# --- the strategies as in training ------------------------------------------------------------------
@pytest.mark.slow   # a benchmark run per strategy: the full tier
def test_swapped_in_adaptive_strategies_learn_during_the_benchmark():
    """One Trainer, strategies swapped in after uniform: each adaptive one's state must move (the step reads
    `strategy.observes` at every step, so importance is told its losses although uniform ran first)."""
    result = bench_train.main([*FAST_BENCH, "--strategies", "uniform,importance,adaptive_histogram,adaptive_timestep",
                               "--steps-per-window", "3", "--no-peer", "--no-fid",
                               "--weighting-override", "adaptive_timestep:update_every=2",
                               "--weighting-override", "adaptive_timestep:probe_timesteps=4"])
    rows = {r["name"]: r for r in result["strategies"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    assert all(r["steps"] == 4 for r in rows.values())                     # 1 warm-up + 1 window of 3
    assert rows["uniform"]["state_changed"] == []
    assert {"filled", "loss_history"} <= set(rows["importance"]["state_changed"])
    assert {"bin_count", "bin_value"} <= set(rows["adaptive_histogram"]["state_changed"])
    assert {"policy_updates", "buffer_rows", "policy.head.bias"} <= set(rows["adaptive_timestep"]["state_changed"])
    assert "policy.*" in report.format_report(result)


def test_weighting_override_needs_a_name_and_a_value():
    with pytest.raises(SystemExit, match="NAME:KEY=VALUE"):
        bench_train.main([*FAST_BENCH, "--weighting-override", "update_every=2"])


# --- --overhead --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    path = tmp_path_factory.mktemp("overhead") / "overhead.json"
    args = ["--overhead", "--device", "cpu", "--model", "unet_tiny", "--batch", "4", "--num-images", "64",
            "--strategies", "uniform,importance", "--warmup", "1", "--overhead-steps", "2", "--quiet", "--json", str(path)]
    return bench_train.main(args), json.loads(path.read_text())


def test_overhead_splits_the_network_from_the_rest(overhead):
    result, on_disk = overhead
    assert on_disk["meta"]["mode"] == "overhead" and on_disk["meta"]["param_tensors"] > 0
    rows = {r["name"]: r for r in result["overhead"]}
    assert list(rows) == ["bare loop", "bare + clip + EMA", "uniform", "importance"]
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        assert 0 < row["ops_outside_per_step"] < row["ops_per_step"]
        assert 0 < row["outside_ms"] < row["step_ms"]
    network = {name: r["ops_per_step"] - r["ops_outside_per_step"] for name, r in rows.items()}
    assert len(set(network.values())) == 1, network                       # the same network work in every loop
    bare, clip_ema, uniform = rows["bare loop"], rows["bare + clip + EMA"], rows["uniform"]
    assert bare["ops_outside_per_step"] < clip_ema["ops_outside_per_step"] < uniform["ops_outside_per_step"]
    assert uniform["ops_outside_x_bare"] == pytest.approx(uniform["ops_outside_per_step"] / bare["ops_outside_per_step"])
    assert uniform["host_reads_per_step"] == 0 and rows["importance"]["host_reads_per_step"] == 0
    assert uniform["state_changed"] == [] and {"filled", "loss_history"} <= set(rows["importance"]["state_changed"])
    assert any(source["line"].startswith("diffrun/training/step.py:") for source in uniform["sources"])
    assert sum(source["ops_per_step"] for source in uniform["sources"]) == uniform["ops_outside_per_step"]


def test_overhead_table(overhead):
    result, _ = overhead
    text = report.format_overhead_report(result)
    header = next(line for line in text.splitlines() if line.startswith("loop "))
    assert all(column in header for column in report.OVERHEAD_COLUMNS)
    assert "by the line that issued them: uniform" in text and "bare + clip + EMA" in text


def test_peak_table_prefers_the_specific_name():
    cuda = torch.device("cuda")
    assert measure.peak_bf16_tflops("NVIDIA H100 PCIe", cuda) == 756
    assert measure.peak_bf16_tflops("NVIDIA H100 80GB HBM3", cuda) == 989
    assert measure.peak_bf16_tflops("NVIDIA A100-SXM4-80GB", cuda) == 312
    assert measure.peak_bf16_tflops("NVIDIA L4", cuda) == 121
    assert measure.peak_bf16_tflops("Some New GPU", cuda) is None
    assert measure.peak_bf16_tflops("NVIDIA H100 80GB HBM3", torch.device("cpu")) is None


# --- train.compile ---------------------------------------------------------------------------------
def _three_steps(make_cfg, tmp_path, compile: bool):
    cfg = make_cfg([f"train.compile={str(compile).lower()}", "train.batch_size=4"])
    trainer = Trainer(cfg, tmp_path / ("compiled" if compile else "eager"), callbacks=[])
    measure.run_steps(trainer, 3)
    return trainer


def _assert_same_training(make_cfg, tmp_path):
    eager, compiled = _three_steps(make_cfg, tmp_path, False), _three_steps(make_cfg, tmp_path, True)
    assert compiled.parts.model is not compiled.denoiser
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # the compiled module really ran
    torch.testing.assert_close(compiled.counters.sums, eager.counters.sums, rtol=1e-4, atol=1e-6)
    for p_c, p_e in zip(compiled.denoiser.parameters(), eager.denoiser.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
    for p_c, p_e in zip(compiled.ema.model.parameters(), eager.ema.model.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # torch.compile of a whole step on the CPU: the full tier
def test_compiled_step_matches_eager_graph_capture(make_cfg, tmp_path, monkeypatch):
    """Dynamo capture + AOTAutograd of the Trainer's compiled denoiser (aot_eager: no C++ codegen, seconds)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _assert_same_training(make_cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFRUN_TEST_INDUCTOR"),
                    reason="inductor CPU C++ codegen takes 1-2.5 min on a shared 2-core machine; "
                           "set DIFFRUN_TEST_INDUCTOR=1 to run it")
def test_compiled_step_matches_eager_inductor(make_cfg, tmp_path):
    torch._dynamo.reset()
    _assert_same_training(make_cfg, tmp_path)


@pytest.mark.slow   # TF-Inception on the CPU: the full tier
def test_inception_benchmark_times_both_networks_and_their_agreement():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_inception.py"), "--images", "4", "--batch", "2",
                          "--threads", "1"], capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("torch-fidelity", "diffrun"))]
    assert [row[0] for row in rows] == ["torch-fidelity", "diffrun"]
    assert all(float(row[-2]) > 0 for row in rows)                         # images/s
    assert float(rows[1][-1]) < 1e-5                                       # features agree to float32 round-off
