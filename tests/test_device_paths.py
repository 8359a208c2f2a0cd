"""The CPU side of the CUDA-path fixes (issue 22): what a GPU run relies on that a CPU can show. The CUDA side is in
tests/test_cuda.py (`-m cuda`)."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from diffrun.launching import local_ranks
from diffrun.data.augment import PAD_STEP, AugmentPipe
from diffrun.errors import ConfigError
from diffrun.evaluation import protocol
from diffrun import distributed
from diffrun.distributed import DistInfo
from diffrun.strategies.adaptive_timestep import AveragePoolTo
from diffrun.training.ema import lerp_on_device_
from diffrun.training.environment import resolve_precision
from diffrun.training.setup import build_components
from diffrun.training.trainer import Trainer

from conftest import compose_config

EVAL = ["eval.num_samples=11", "eval.num_reference=10", "eval.steps=2", "eval.sampler=ddpm",   # ancestral: noise
        "dataset.num_classes=10"]                                                             # every step, labels


# --- adaptive_timestep: the policy's pooling windows are made once, on the device --------------------------------
def test_average_pool_windows_are_made_once_and_pool_as_pytorch_does():
    pool = AveragePoolTo(4)
    for size in (32, 17, 6):
        x = torch.randn(2, 3, size, size + 3)
        torch.testing.assert_close(pool(x), F.adaptive_avg_pool2d(x, 4), rtol=1e-6, atol=1e-6)
    made = dict(pool._windows_made)
    pool(torch.randn(5, 3, 32, 35))                     # sizes seen before: nothing is made again
    assert pool._windows_made.keys() == made.keys() and all(pool._windows_made[k] is made[k] for k in made)


# --- deterministic mode follows each run's config, both ways -----------------------------------------------------
def test_deterministic_mode_is_set_from_the_config_every_time():
    try:
        build_components(compose_config(["deterministic=true"]), DistInfo())
        assert torch.are_deterministic_algorithms_enabled()
        build_components(compose_config(["deterministic=false"]), DistInfo())
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark  # CPU
    finally:
        torch.use_deterministic_algorithms(False)


# --- the discrete schedule's λ table is made at setup, not inside the first (compiled, captured) step ------------
def test_timestep_table_is_made_at_setup(monkeypatch):
    parts = build_components(compose_config(["schedule=linear", "schedule.timesteps=1000"]), DistInfo())
    assert parts.schedule.timesteps == 1000

    def made_again(*_):
        raise AssertionError("the λ table was computed again during a step")

    monkeypatch.setattr(parts.schedule, "discrete_logsnr", made_again)
    draw = parts.strategy.sample(torch.zeros(8, 1, 16, 16))
    assert draw.index is not None and torch.isfinite(parts.strategy.log_density(draw.logsnr)).all()


# --- EMA: the update's temporary is bounded by the chunk, and the result is the unchunked one ---------------------
def test_ema_lerp_in_chunks_equals_the_whole_update():
    torch.manual_seed(0)
    ema = [torch.randn(n) for n in (7, 30, 3, 12, 1)]
    target = [torch.randn_like(e) for e in ema]
    whole, chunked = [e.clone() for e in ema], [e.clone() for e in ema]
    lerp_on_device_(whole, target, torch.tensor(0.3), chunk_elements=10**9)
    lerp_on_device_(chunked, target, torch.tensor(0.3), chunk_elements=10)   # groups: [7], [30], [3, 12→no], ...
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    lerp_on_device_([], [], torch.tensor(0.3))                                 # nothing to move


# --- precision=auto: bf16 only where the GPU has bf16 tensor cores ------------------------------------------------
@pytest.mark.parametrize("capability,expected", [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                                 ((9, 0), torch.bfloat16)])
def test_precision_auto_checks_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == (expected, False)
    assert resolve_precision("auto", torch.device("cpu")) == (None, False)


# --- an explicit cuda:N under DDP ----------------------------------------------------------------------------------
def test_explicit_gpu_under_ddp_with_several_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"device=cuda:1 under DDP \(2 ranks, 4 visible GPUs\).*use device=cuda"):
        distributed.rank_device(torch.device("cuda", 1), DistInfo(1, 1, 2))
    assert distributed.rank_device(torch.device("cuda"), DistInfo(1, 1, 2)) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cuda", 1), DistInfo()) == torch.device("cuda", 1)   # one process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)   # one GPU per rank (e.g. srun --gpus-per-task=1)
    assert distributed.rank_device(torch.device("cuda", 0), DistInfo(1, 1, 2)) == torch.device("cuda", 0)


# --- EDM augmentation: few padded shapes for cuDNN's autotuner ------------------------------------------------------
def test_augment_pads_symmetrically_in_steps(monkeypatch):
    pads = []
    pad = F.pad

    def recording(images, widths, *args, **kwargs):
        pads.append(tuple(widths))
        return pad(images, widths, *args, **kwargs)

    monkeypatch.setattr(F, "pad", recording)
    torch.manual_seed(0)
    pipe = AugmentPipe(p=1.0, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    for _ in range(10):
        pipe(torch.rand(8, 3, 32, 32))
    reflect = [p for p in pads if len(p) == 4]
    assert len(reflect) == 10 and all(p[0] == p[1] and p[2] == p[3] for p in reflect)
    assert all(v % PAD_STEP == 0 or v == 31 for p in reflect for v in p) and len(set(reflect)) <= 8 * 8


# --- FID samples: one seed per image ---------------------------------------------------------------------------------
def _fid_samples(cfg, run_dir, monkeypatch_like, take: int = 7) -> torch.Tensor:
    """The images `evaluate` hands torch-fidelity (pulled `take` at a time), with the Inception side replaced."""
    trainer = Trainer(cfg, run_dir, callbacks=[])
    pulled = []

    def fake_fid(sample_fn, num_samples, reference, **kwargs):
        while sum(p.shape[0] for p in pulled) < num_samples:
            pulled.append(sample_fn(min(take, num_samples - sum(p.shape[0] for p in pulled))))
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0}

    monkeypatch_like(protocol, "resolve_inception_weights", lambda *a, **k: SimpleNamespace(source="test"))
    monkeypatch_like(protocol, "compute_fid_kid_from_sampler", fake_fid)
    monkeypatch_like(protocol, "describe", lambda *a, **k: {"sampler": "ddpm", "steps": 2, "nfe": 2, "precision": "fp32",
                                                           "guidance": {"cfg_scale": 1.0}, "label": "test"})
    try:
        record = protocol.evaluate(trainer.view, cfg.eval, cfg.dataset)
    finally:
        trainer.directory and trainer.directory.unlock()
    return None if record is None else torch.cat(pulled)


def test_fid_sample_set_does_not_depend_on_the_batch_size(tmp_path, monkeypatch):
    sets = [_fid_samples(compose_config([*EVAL, f"eval.batch_size={b}"]), tmp_path / str(b), monkeypatch.setattr)
            for b in (4, 11)]
    assert sets[0].shape == (11, 1, 16, 16) and sets[0].dtype == torch.uint8
    assert torch.equal(sets[0], sets[1])
    first_half = _fid_samples(compose_config([*EVAL, "eval.batch_size=3", "eval.num_samples=5"]), tmp_path / "five",
                              monkeypatch.setattr)
    assert torch.equal(first_half, sets[0][:5])          # image i is the same image whatever comes after it


def _fid_rank_main(rank, world, port, run_dir, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    with distributed.session(torch.device("cpu")):
        images = _fid_samples(compose_config([*EVAL, "eval.batch_size=2"]), run_dir, setattr)
    if rank == 0:
        torch.save(images, out_path)
    else:
        assert images is None


@pytest.mark.slow
def test_fid_under_ddp_samples_in_shares_and_gathers_the_one_process_set(tmp_path, monkeypatch):
    """Two gloo ranks sample their shares of the per-image seeds (2 images a round each); rank 0 gets the set and the
    order one process samples (here with batch 4), so no rank sits through another's whole evaluation."""
    mp.spawn(_fid_rank_main, args=(2, local_ranks.free_port(), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    single = _fid_samples(compose_config([*EVAL, "eval.batch_size=4"]), tmp_path / "one", monkeypatch.setattr)
    assert torch.equal(torch.load(tmp_path / "ddp.pt"), single)
