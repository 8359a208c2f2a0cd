"""The CUDA tier (`pytest -m cuda`): what only a GPU can show. Skipped here with the reason when no GPU is present;
scripts/gpu_check.sh runs it (and the benchmark) on one GPU in a few minutes.

  * a short bf16 run, then a resume: checkpoints load to the CPU, RNG states are restored per device;
  * torch.compile of the denoiser on CUDA;
  * fp16 with a forced GradScaler overflow: counted as an overflow, never as a non-finite step;
  * the step of every strategy that promises no host sync, under torch.cuda.set_sync_debug_mode("error");
  * deterministic=true with every strategy (no layer without a deterministic CUDA backward).
"""
import json

import pytest
import torch

from diffrun.cli import train
from diffrun.training import checkpoint as ckpt
from diffrun.training.checkpoint import CheckpointManager
from diffrun.training.step import train_step
from diffrun.training.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run scripts/gpu_check.sh on a GPU)")]

GPU = ["device=cuda", "sample.num_images=4", "checkpoint.every_steps=0"]
STRATEGIES = ["uniform", "min_snr", "snr", "truncated_snr", "snr_plus_one", "soft_min_snr", "p2", "p2_gamma05",
              "debiased", "sigmoid", "sigmoid_density", "edm", "lognormal", "logit_normal", "importance",
              "adaptive_histogram", "variance_aware", "variance_aware_cauchy", "variance_aware_zscore",
              "variance_aware_binned", "speed", "adaptive_timestep"]
HOST_SYNCING = {"adaptive_timestep"}   # its policy update reads ΔKL on the host (sklearn), every update_every steps


def _steps(trainer, n):
    for _ in range(n):
        train_step(trainer.parts, trainer.data.batch(trainer.parts.local_batch_size)[0], trainer.step, trainer.counters,
                   trainer.stats)
        trainer.step += 1


def test_bf16_run_and_resume_on_gpu(make_cfg, tmp_path):
    common = [*GPU, "precision=bf16"]
    train(make_cfg([*common, "train.steps=4"]), tmp_path)
    state = ckpt.load(CheckpointManager(tmp_path / "checkpoints").list()[-1])
    assert state["rng"]["torch"].device.type == "cpu" and all(s.device.type == "cpu" for s in state["rng"]["cuda"])
    summary = train(make_cfg([*common, "train.steps=8"]), tmp_path)
    assert summary["step"] == 8
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"


def test_resume_is_bit_identical_on_gpu(make_cfg, tmp_path):
    common = [*GPU, "precision=fp32", "deterministic=true", "sample.num_images=0"]
    train(make_cfg([*common, "train.steps=6"]), tmp_path / "straight")
    train(make_cfg([*common, "train.steps=3"]), tmp_path / "split")
    train(make_cfg([*common, "train.steps=6"]), tmp_path / "split")
    a, b = (CheckpointManager(tmp_path / run / "checkpoints").load_latest()[0] for run in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_compile_on_gpu_matches_eager(make_cfg, tmp_path):
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        trainer = Trainer(make_cfg([*GPU, "precision=fp32", f"train.compile={str(compiled).lower()}"]),
                          tmp_path / str(compiled), callbacks=[])
        _steps(trainer, 3)
        runs[compiled] = [p.detach().clone() for p in trainer.denoiser.parameters()]
        trainer.directory.unlock()
    for eager, compiled in zip(runs[False], runs[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_fp16_overflow_is_counted_apart_and_never_halts(make_cfg, tmp_path):
    trainer = Trainer(make_cfg([*GPU, "precision=fp16", "train.nan_policy=halt", "train.steps=6", "train.log_every=3"]),
                      tmp_path, callbacks=[])
    trainer.parts.scaler.update(2.0 ** 40)          # a scale that overflows the fp16 gradients on the first step
    trainer.fit()                                   # nan_policy=halt must not fire: an overflow is routine
    assert trainer.state.overflow_total >= 1 and trainer.state.nonfinite_total == 0


@pytest.mark.parametrize("weighting", [s for s in STRATEGIES if s not in HOST_SYNCING])
def test_step_has_no_host_sync(make_cfg, tmp_path, weighting):
    trainer = Trainer(make_cfg([*GPU, f"weighting={weighting}", "precision=bf16"]), tmp_path, callbacks=[])
    _steps(trainer, 2)                              # lazy init (cuDNN, fused Adam state) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(trainer, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.directory.unlock()


@pytest.mark.parametrize("weighting", STRATEGIES)
def test_deterministic_mode_with_every_strategy(make_cfg, tmp_path, weighting):
    extra = ["weighting.update_every=1", "weighting.in_channels=1"] if weighting == "adaptive_timestep" else []
    finals = []
    for run in ("a", "b"):
        trainer = Trainer(make_cfg([*GPU, f"weighting={weighting}", "deterministic=true", "precision=fp32", *extra]),
                          tmp_path / run, callbacks=[])
        _steps(trainer, 3)
        finals.append([p.detach().clone() for p in trainer.denoiser.parameters()])
        trainer.directory.unlock()
    assert all(torch.equal(a, b) for a, b in zip(*finals))


# --- the data seam on the GPU -------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["iid", "epoch"])
def test_conditional_step_and_device_batches_have_no_host_sync(make_cfg, tmp_path, order):
    """Label dropout in the step and the device placement's batches (both orders) never wait for the host."""
    trainer = Trainer(make_cfg([*GPU, "precision=bf16", "dataset.num_classes=10", f"dataset.order={order}"]),
                      tmp_path, callbacks=[])

    def steps(n):
        for _ in range(n):
            x, labels = trainer.data.batch(trainer.parts.local_batch_size)
            train_step(trainer.parts, x, trainer.step, trainer.counters, trainer.stats, labels)
            trainer.step += 1

    steps(2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.directory.unlock()


def test_stream_matches_device_on_gpu():
    """Pinned, non-blocking stream batches equal the device placement's in epoch order; auto keeps digits on the GPU."""
    from omegaconf import OmegaConf

    from diffrun.data import EpochOrder, InMemoryImages, StreamingData, load_digits, place

    cuda = torch.device("cuda")
    on_device = InMemoryImages(load_digits(16, random_flip=True), num_classes=10,
                               order=EpochOrder(1797, 3, flips=True)).to(cuda)
    stream = StreamingData(load_digits(16, random_flip=True), EpochOrder(1797, 3, flips=True), cuda, num_classes=10,
                           workers=2)
    try:
        for _ in range(30):   # crosses the epoch boundary at 1797
            (a, labels_a), (b, labels_b) = on_device.batch(64), stream.batch(64)
            assert a.is_cuda and b.is_cuda and torch.equal(a, b) and torch.equal(labels_a, labels_b)
    finally:
        stream.close()
    placed = place(load_digits(16), OmegaConf.create({}), cuda, 0)
    assert isinstance(placed, InMemoryImages) and placed.items.is_cuda


def test_conditional_latent_run_on_gpu(make_cfg, tmp_path):
    """Latents streamed to the GPU, guided sampling and VAE decoding there."""
    from latent_utils import latent_overrides, write_latents

    paths = write_latents(tmp_path / "data")
    summary = train(make_cfg([*GPU, *latent_overrides(paths), "model=minsnr_vit_b_2_latent32",
                              "model.net.hidden_size=64", "model.net.depth=2", "model.net.num_heads=2",
                              "precision=bf16", "dataset.placement=stream", "dataset.workers=2",
                              "sample.cfg_scale=1.5", "train.label_dropout=0.1", "train.batch_size=6"]), tmp_path / "run")
    assert summary["step"] == 6 and json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
