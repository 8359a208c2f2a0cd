"""The EMA update without host reads, and train.capture=compile: the whole step through torch.compile (here with
the `eager`/`aot_eager` backends: Dynamo's capture without C++ code generation) trains as the eager step does,
and what it cannot capture is refused with the key to change."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from diffrun.building import build
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.training.capture import CapturedStep, DeviceDecayEMA, host_hooks
from diffrun.training.ema import EMA, lerp_on_device_
from diffrun.training.step import train_step
from diffrun.training.trainer import Trainer


# --- EMA -------------------------------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(28, 2))


def _moved(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(2, 3, 30, 30))             # running statistics move too
    return model


@pytest.mark.parametrize("n", [0, 3, 50])
def test_ema_update_is_the_old_lerp_bit_for_bit(n):
    """The update the step used before (weight as a float32 tensor, `_foreach_lerp_`), to the last bit."""
    model = _net()
    ema = EMA(model, decay=0.999)
    ema.num_updates = n
    _moved(model)
    expected = [e.detach().clone() for e in ema.model.parameters()]
    rate = torch.as_tensor(1.0 - min(0.999, (1 + n) / (10 + n))) * torch.tensor(True)
    torch._foreach_lerp_(expected, [p.detach() for p in model.parameters()], rate)
    ema.update(model, torch.tensor(True))
    assert all(torch.equal(e, x) for e, x in zip(ema.model.parameters(), expected))
    assert all(torch.equal(e, b) for e, b in zip(ema.model.buffers(), model.buffers()))
    assert ema.num_updates == n + 1


def test_skipped_step_moves_no_ema_parameter():
    model = _net()
    ema = EMA(model)
    before = copy.deepcopy(ema.model.state_dict())
    _moved(model)
    ema.update(model, torch.tensor(False))
    after = ema.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_lerp_on_device_matches_lerp_to_an_ulp():
    torch.manual_seed(1)
    ema, target = [torch.randn(257), torch.randn(3, 5)], [torch.randn(257) * 4, torch.randn(3, 5)]
    for weight in (0.9, 0.3, 1e-3, 0.0):
        expected = [e.clone() for e in ema]
        torch._foreach_lerp_(expected, target, weight)
        got = [e.clone() for e in ema]
        lerp_on_device_(got, target, torch.tensor(weight))
        for g, x in zip(got, expected):
            torch.testing.assert_close(g, x, rtol=2e-7, atol=1e-7)
    frozen = [e.clone() for e in ema]
    lerp_on_device_(frozen, target, torch.tensor(0.0))
    assert all(torch.equal(f, e) for f, e in zip(frozen, ema))


def test_ema_follows_buffers_replaced_by_to():
    model = _net()
    ema = EMA(model)
    ema.update(model)                                    # lists the tensors once
    model.to(torch.float64).to(torch.float32)           # `.to` replaces buffers (parameters are kept)
    _moved(model)
    ema.update(model)
    assert all(torch.equal(e, b) for e, b in zip(ema.model.buffers(), model.buffers()))


def test_device_decay_matches_the_host_decay():
    model = _net()
    host, device = EMA(model, decay=0.99), EMA(model, decay=0.99)
    on_device = DeviceDecayEMA(device, torch.device("cpu"))
    for _ in range(4):
        _moved(model)
        host.update(model, torch.tensor(True))
        on_device.sync()
        on_device.update(model, torch.tensor(True))
        on_device.advanced()
    assert device.num_updates == host.num_updates == 4 and float(on_device.updates) == 4
    for a, b in zip(host.model.parameters(), device.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    device.num_updates = 40                              # a resume: the device count follows the host's
    on_device.sync()
    assert float(on_device.updates) == 40


# --- train.capture=compile -------------------------------------------------------------------------
SMALL = ["train.batch_size=4", "model.net.channels=8", "model.net.channel_mult=[1]"]   # less to trace


def _trainer(make_cfg, tmp_path, capture: str, *extra: str) -> Trainer:
    return Trainer(make_cfg([f"train.capture={capture}", *SMALL, *extra]), tmp_path / capture, callbacks=[])


def _steps(trainer: Trainer, n: int, x0=None) -> None:
    for _ in range(n):
        batch = trainer.data.batch(trainer.parts.local_batch_size)[0] if x0 is None else x0
        trainer.step_fn(trainer.parts, batch, trainer.step, trainer.counters, trainer.stats)
        trainer.step += 1


def _assert_same_training(captured: Trainer, eager: Trainer, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert torch.equal(captured.counters.counts, eager.counters.counts)
    torch.testing.assert_close(captured.counters.sums, eager.counters.sums, rtol=rtol, atol=atol)
    torch.testing.assert_close(captured.stats.sums, eager.stats.sums, rtol=rtol, atol=atol)
    for a, b in [(captured.denoiser, eager.denoiser), (captured.ema.model, eager.ema.model)]:
        for p_c, p_e in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p_c, p_e, rtol=rtol, atol=atol)
    for key, value in eager.strategy.state_dict().items():
        torch.testing.assert_close(captured.strategy.state_dict()[key], value, rtol=rtol, atol=atol)
    assert captured.ema.num_updates == eager.ema.num_updates
    assert captured.optimizer.param_groups[0]["lr"] == eager.optimizer.param_groups[0]["lr"]


@pytest.mark.slow   # torch.compile of a whole step on the CPU: the full tier
def test_captured_step_trains_like_the_eager_step(make_cfg, tmp_path, monkeypatch):
    """aot_eager (Dynamo capture + AOTAutograd, what inductor is given), a closed-form strategy, 3 steps through a
    warm-up learning rate; then a non-finite batch after a jump of the host's step (as after a resume), then a
    strategy that works on the host swapped in."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    extra = ["weighting=min_snr", "optimizer.warmup_steps=2", "seed=3"]
    eager = _trainer(make_cfg, tmp_path, "none", *extra)
    _steps(eager, 3)
    captured = _trainer(make_cfg, tmp_path, "compile", *extra)                 # seeds the global RNG again
    _steps(captured, 3)
    assert isinstance(captured.step_fn, CapturedStep) and eager.step_fn is train_step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2        # the step really was traced
    _assert_same_training(captured, eager)
    assert captured.ema.num_updates == 3 and captured.parts.lr_schedule.last_epoch == 3    # stepped on the host

    captured.step, captured.ema.num_updates = 40, 40                           # as after loading step 40
    before = [p.detach().clone() for p in captured.denoiser.parameters()]
    _steps(captured, 1, captured.data.batch(4)[0] * float("nan"))
    assert int(captured.counters.first_bad) == 41 and int(captured.counters.nonfinite) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, captured.denoiser.parameters()))
    assert captured.ema.num_updates == 41

    cfg = make_cfg(["weighting=adaptive_timestep", "weighting.in_channels=1"])
    strategy = build(cfg.weighting, _keep_meta=("name", "citation"))
    strategy.bind(captured.schedule, cfg.model.prediction, cfg.model.sigma_data)
    assert host_hooks(strategy) and not host_hooks(captured.strategy)
    captured.parts.strategy = strategy
    with pytest.raises(ConfigError, match="cannot capture weighting=adaptive_timestep"):
        _steps(captured, 1)


@pytest.mark.slow   # torch.compile of a whole step on the CPU: the full tier
def test_adaptive_strategy_learns_inside_the_captured_step(make_cfg, tmp_path, monkeypatch):
    """importance's sampler and `observe` (device-only by the Strategy contract) run inside the graph."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    extra = ["weighting=importance", "weighting.num_timesteps=8", "weighting.history=1", "seed=4"]
    eager = _trainer(make_cfg, tmp_path, "none", *extra)
    _steps(eager, 3)
    captured = _trainer(make_cfg, tmp_path, "compile", *extra)
    _steps(captured, 3)
    _assert_same_training(captured, eager)
    assert int(captured.strategy.filled.sum()) == 3 * 4                       # every sample was observed


@pytest.mark.parametrize("overrides,match", [
    (["weighting=adaptive_timestep"], "cannot capture weighting=adaptive_timestep.*train.capture=none"),
    (["train.compile=true"], "set train.compile=false"),
    (["precision=fp16"], "precision=fp16.*use precision=bf16"),
    (["dist.devices=2"], "2 ranks"),
])
def test_what_cannot_be_captured_is_refused_before_any_work(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(["train.capture=compile", *overrides]))


def test_capture_key_is_checked(make_cfg):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        make_cfg(["train.capture=graphs"])
    assert "capture" in str(err.value) + str(err.value.__cause__)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run scripts/gpu_check.sh on a GPU)")
def test_captured_step_on_gpu_replays_cuda_graphs(make_cfg, tmp_path, monkeypatch):
    """inductor with CUDA graphs (mode="reduce-overhead", the default on CUDA): trains as the eager step does (with
    inductor drawing its random numbers through ATen, as eager does), no graph falls back from CUDA graphs, and the
    replayed steps read nothing on the host."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    counters.clear()
    gpu = ["device=cuda", "precision=fp32", "sample.num_images=0"]
    eager = _trainer(make_cfg, tmp_path, "none", *gpu)
    _steps(eager, 3)
    captured = _trainer(make_cfg, tmp_path, "compile", *gpu)
    _steps(captured, 3)
    _assert_same_training(captured, eager, rtol=1e-3, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, "a graph of the step was not replayed as a CUDA graph"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(captured, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
