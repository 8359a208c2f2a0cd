"""The CUDA tier (`pytest -m cuda`): what only a GPU can show. Skipped here with the reason when no GPU is present;
scripts/gpu_check.sh runs it (and the benchmark) on one GPU in a few minutes.

  * a short bf16 run, then a resume: checkpoints load to the CPU, RNG states are restored per device;
  * torch.compile of the denoiser on CUDA;
  * fp16 with a forced GradScaler overflow: counted as an overflow, never as a non-finite step;
  * the step of every strategy under torch.cuda.set_sync_debug_mode("error") (adaptive_timestep between its
    policy updates), and with EDM's augmentation (pinned, asynchronous copies of its parameters);
  * deterministic=true with every strategy and one step of every network family (no layer without a deterministic
    CUDA backward);
  * FID on the device (per-image seeds: the same images at any batch size), bf16 capture with an adaptive
    strategy, a resume after a captured run, channels_last, cuda:N as the current device, the EMA update's bounded
    temporary.
"""
import json

import pytest
import torch

from diffrun.cli import train
from diffrun.evaluation.inception import InceptionWeightsUnavailable, resolve_inception_weights
from diffrun.training import checkpoint as ckpt
from diffrun.training.checkpoint import CheckpointManager
from diffrun.training.ema import LERP_CHUNK_ELEMENTS, lerp_on_device_
from diffrun.training.step import train_step
from diffrun.training.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run scripts/gpu_check.sh on a GPU)")]

GPU = ["device=cuda", "sample.num_images=4", "checkpoint.every_steps=0"]
STRATEGIES = ["uniform", "min_snr", "snr", "truncated_snr", "snr_plus_one", "soft_min_snr", "p2", "p2_gamma05",
              "debiased", "sigmoid", "sigmoid_density", "edm", "lognormal", "logit_normal", "importance",
              "adaptive_histogram", "variance_aware", "variance_aware_cauchy", "variance_aware_zscore",
              "variance_aware_binned", "speed", "adaptive_timestep"]
# adaptive_timestep reads ΔKL on the host (sklearn) on its policy-update steps only: checked between two updates
QUIET_BETWEEN_UPDATES = {"adaptive_timestep": ["weighting.update_every=1000", "weighting.in_channels=1"]}
# one small member of each network family, on digits (1 × 16 × 16)
FAMILIES = {
    "ddpm_unet": ["model=unet_tiny"],
    "song_unet": ["model=edm_ddpmpp_cifar10", "model.net.model_channels=16", "model.net.channel_mult=[1]",
                  "model.net.attn_resolutions=[]"],
    "dit": ["model=dit_s_2", "model.net.hidden_size=64", "model.net.depth=2", "model.net.num_heads=2"],
    "minsnr_vit": ["model=minsnr_vit_b_2_latent32", "model.net.hidden_size=64", "model.net.depth=2",
                   "model.net.num_heads=2"],
}
EDM_AUGMENTED = [*FAMILIES["song_unet"], "model.net.augment_dim=9", "augment.p=0.5"]


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
    # a scale that overflows the fp16 gradients on the first step (GradScaler.update(new_scale) needs a scale made
    # by a first scale(): its initial scale is the way in before any step)
    trainer.parts.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    trainer.fit()                                   # nan_policy=halt must not fire: an overflow is routine
    assert trainer.state.overflow_total >= 1 and trainer.state.nonfinite_total == 0


@pytest.mark.parametrize("weighting", STRATEGIES)
def test_step_has_no_host_sync(make_cfg, tmp_path, weighting):
    extra = QUIET_BETWEEN_UPDATES.get(weighting, [])
    trainer = Trainer(make_cfg([*GPU, f"weighting={weighting}", "precision=bf16", *extra]), tmp_path, callbacks=[])
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


def test_augmented_step_has_no_host_sync(make_cfg, tmp_path):
    """EDM's augmentation draws on the host and copies its parameters from pinned memory, without waiting."""
    trainer = Trainer(make_cfg([*GPU, *EDM_AUGMENTED, "precision=bf16"]), tmp_path, callbacks=[])
    _steps(trainer, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(trainer, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in trainer.denoiser.parameters())
    trainer.directory.unlock()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_network_family_steps_deterministically(make_cfg, tmp_path, family):
    finals = []
    for run in ("a", "b"):
        trainer = Trainer(make_cfg([*GPU, *FAMILIES[family], "deterministic=true", "precision=fp32"]), tmp_path / run,
                          callbacks=[])
        _steps(trainer, 1)
        finals.append([p.detach().clone() for p in trainer.denoiser.parameters()])
        trainer.directory.unlock()
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    Trainer(make_cfg([*GPU, "deterministic=false"]), tmp_path / "after", callbacks=[]).directory.unlock()
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark   # not inherited


def test_augmented_edm_step_is_deterministic(make_cfg, tmp_path):
    finals = []
    for run in ("a", "b"):
        trainer = Trainer(make_cfg([*GPU, *EDM_AUGMENTED, "deterministic=true", "precision=fp32"]), tmp_path / run,
                          callbacks=[])
        _steps(trainer, 2)
        finals.append([p.detach().clone() for p in trainer.denoiser.parameters()])
        trainer.directory.unlock()
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_channels_last_trains_like_contiguous(make_cfg, tmp_path):
    runs = {}
    for layout in ("true", "false"):
        trainer = Trainer(make_cfg([*GPU, "precision=fp32", f"train.channels_last={layout}"]), tmp_path / layout,
                          callbacks=[])
        _steps(trainer, 3)
        runs[layout] = [p.detach().clone() for p in trainer.denoiser.parameters()]
        convs = [p for p in trainer.denoiser.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) == (layout == "true") for p in convs)
        trainer.directory.unlock()
    for a, b in zip(runs["true"], runs["false"]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_explicit_gpu_index_becomes_the_current_device(make_cfg, tmp_path):
    last = torch.cuda.device_count() - 1
    trainer = Trainer(make_cfg([f"device=cuda:{last}", "sample.num_images=0", "checkpoint.every_steps=0"]), tmp_path,
                      callbacks=[])
    assert torch.cuda.current_device() == last and trainer.device == torch.device("cuda", last)
    trainer.directory.unlock()


def test_ema_update_temporary_is_bounded_by_the_chunk():
    chunk_bytes = LERP_CHUNK_ELEMENTS * 4
    ema = [torch.zeros(LERP_CHUNK_ELEMENTS // 2, device="cuda") for _ in range(6)]   # 3 chunks' worth
    target = [torch.ones_like(e) for e in ema]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    lerp_on_device_(ema, target, torch.tensor(0.5, device="cuda"))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= chunk_bytes + (1 << 20)
    assert all(torch.equal(e, torch.full_like(e, 0.5)) for e in ema)


def test_per_image_seeds_give_the_same_images_at_any_batch_size_on_gpu(make_cfg, tmp_path):
    cfg = make_cfg([*GPU, "eval.sampler=ddpm", "eval.steps=3"])
    trainer = Trainer(cfg, tmp_path, callbacks=[])
    whole, _ = trainer.generate(6, range(100, 106), cfg.eval, "eval")
    halves = [trainer.generate(3, seeds, cfg.eval, "eval")[0] for seeds in (range(100, 103), range(103, 106))]
    assert whole.is_cuda and torch.equal(whole, torch.cat(halves))
    trainer.directory.unlock()


def test_fid_on_gpu(make_cfg, tmp_path):
    try:
        resolve_inception_weights(download=False)
    except InceptionWeightsUnavailable as exc:
        pytest.skip(f"no Inception weights here: {str(exc).splitlines()[0]}")
    summary = train(make_cfg([*GPU, "precision=bf16", "eval.enabled=true", "eval.num_samples=40",
                              "eval.num_reference=60", "eval.kid_subset_size=20", "eval.steps=4", "eval.batch_size=16",
                              "eval.on_unavailable=fail"]), tmp_path)
    assert summary["fid"] > 0 and "FID-40 vs digits train (60 images of 1797)" in summary["fid_protocol"]


@pytest.mark.timeout(240)
def test_bf16_capture_with_an_adaptive_strategy(make_cfg, tmp_path):
    """inductor + CUDA graphs in bf16, importance sampling learning inside the graph: every sample observed, the
    weights finite, and no graph fell back from CUDA graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(make_cfg([*GPU, "precision=bf16", "train.capture=compile", "weighting=importance",
                                "weighting.num_timesteps=8", "weighting.history=1", "train.batch_size=8"]),
                      tmp_path, callbacks=[])
    _steps_captured(trainer, 4)
    torch.cuda.synchronize()
    assert int(trainer.strategy.filled.sum()) == 4 * 8
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert all(torch.isfinite(p).all() for p in trainer.denoiser.parameters())
    trainer.directory.unlock()


@pytest.mark.timeout(300)
def test_resume_after_a_captured_run(make_cfg, tmp_path):
    torch._dynamo.reset()
    common = [*GPU, "precision=bf16", "train.capture=compile", "sample.num_images=0"]
    train(make_cfg([*common, "train.steps=4"]), tmp_path)
    summary = train(make_cfg([*common, "train.steps=8"]), tmp_path)
    assert summary["step"] == 8 and json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    state, _ = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert state["step"] == 8 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _steps_captured(trainer, n):
    for _ in range(n):
        trainer.step_fn(trainer.parts, trainer.data.batch(trainer.parts.local_batch_size)[0], trainer.step,
                        trainer.counters, trainer.stats)
        trainer.step += 1
