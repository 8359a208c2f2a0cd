#!/usr/bin/env python
"""Training and FID-evaluation throughput of diffrun, measured against a peer loop in the same run.

    python scripts/bench_train.py                               # whatever device is here; CPU: < 60 s
    python scripts/bench_train.py --model ddpm_cifar10 --batch 128 --precision bf16 \
        --compile --channels-last --json docs/bench_h100.json   # the GPU measurement (docs/performance.md)
    python scripts/bench_train.py --overhead                    # host work per step outside the network, every
                                                                # strategy against a bare loop (CPU: 3-6 min)
    python scripts/bench_train.py --capture ...                 # the same with train.capture=compile

What is measured, all in one process on one device (docs/performance.md says why each choice):
  * diffrun: `diffrun.training.step.train_step` of a Trainer composed from the real Hydra config (dataset=cifar10 with
    its loader replaced by synthetic CIFAR-shaped uint8 images held in memory), images/s = batch / median
    window step time after warm-up. Windows are bracketed by CUDA events on GPU, perf_counter on CPU.
  * FLOPs: one forward+backward of the eager denoiser under `FlopCounterMode` (SDPA forced to the math
    kernel so attention is counted on every device); MFU = FLOPs/image × images/s ÷ dense bf16 peak.
  * strategies: every conf/weighting/*.yaml built and bound exactly as the Trainer does it and swapped
    into the same Trainer (same model, optimizer, batch, compiled graph); step time ÷ uniform's.
  * peer: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py written
    out with diffrun's own U-Net (`PeerLoop`), same batch and autocast precision.
  * FID evaluation: DDIM sampling with the EMA model (samples/s and network evaluations/s) and
    Inception-v3 feature extraction (torch-fidelity's extractor, weights from
    `diffrun.evaluation.inception.resolve_inception_weights`).
Strategy and peer windows are interleaved round-robin, so drift in a shared machine's load hits all
of them alike. Ratios use the amortised step time (all timed steps), which counts periodic work
(e.g. adaptive_timestep's KL probes every `update_every` steps); images/s uses the median window.
Each strategy's state is compared before and after: the table says which state tensors moved.

--overhead measures the host work of a step apart from the network (`NetworkWindows`: hooks mark the
network's forward and backward): ATen operators dispatched per step inside and outside the network
(`OpCounter`, a TorchDispatchMode), host reads (`_local_scalar_dense`: a sync on a GPU) and host
milliseconds outside the network (thread CPU time on CPU), for every strategy and for `BareLoop`.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import math
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from diffrun.building import build         # noqa: E402
from diffrun.validation import validate         # noqa: E402
from diffrun.data import ArraySource               # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. Matched as substrings
# of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" comes before "H100").
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),          # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),          # also GH200
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("A10", 125.0),           # after A100 so "A100" never lands here
]

# Column headers of the printed tables (tests check them; keep them stable).
TRAIN_COLUMNS = ["loop", "img/s", "step ms", "vs peer", "GFLOP/img", "TFLOP/s", "MFU", "peak mem"]
STRATEGY_COLUMNS = ["strategy", "step ms", "x uniform", "img/s", "peak mem", "status", "state changed"]
FID_COLUMNS = ["stage", "batch", "img/s", "net evals/s", "notes"]
OVERHEAD_COLUMNS = ["loop", "ops/step", "outside", "x bare", "host reads", "outside ms", "ms x bare",
                    "ms x bare+clip+EMA", "step ms", "state changed"]


# ---------------------------------------------------------------------------------------------------
# synthetic data, composed config
# ---------------------------------------------------------------------------------------------------
def synthetic_cifar(num_images: int = 1024, image_size: int = 32, channels: int = 3, seed: int = 0,
                    random_flip: bool = True) -> ArraySource:
    """CIFAR-shaped random uint8 images: the dataset loader the benchmark puts in the config."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, channels, image_size, image_size), dtype=torch.uint8,
                           generator=generator)
    return ArraySource(images, "synthetic_cifar", random_flip)


def compose(overrides: list[str], num_images: int, seed: int) -> DictConfig:
    """The run config Hydra would compose for `diffrun dataset=cifar10 ...`, with the synthetic loader."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffrun.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["dataset=cifar10", *overrides])
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.dataset.loader = {"_target_": f"{__name__}.synthetic_cifar", "num_images": num_images,
                              "image_size": cfg.dataset.image_size, "channels": cfg.dataset.channels,
                              "seed": seed, "random_flip": True}
    return cfg


def weighting_names() -> list[str]:
    from diffrun.cli import CONF_DIR

    names = sorted(p.stem for p in (Path(CONF_DIR) / "weighting").glob("*.yaml"))
    return ["uniform", *[n for n in names if n != "uniform"]]


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides every Trainer and strategy of the benchmark is composed with."""
    base = [f"model={args.model}", f"device={args.device}", f"precision={args.precision}", f"seed={args.seed}",
            f"train.batch_size={args.batch}", f"train.compile={str(args.compile).lower()}",
            f"train.channels_last={str(args.channels_last).lower()}", "train.progress=false",
            "eval.enabled=false", "sample.num_images=0", "resume=never"]
    return [*base, "train.capture=compile"] if args.capture else base


def weighting_overrides(args: argparse.Namespace, strategy_name: str) -> list[str]:
    """`--weighting-override NAME:KEY=VALUE` (checked by `main`) → `weighting.KEY=VALUE` for strategy NAME only."""
    return [f"weighting.{item.partition(':')[2]}" for item in args.weighting_override
            if item.partition(":")[0] == strategy_name]


def build_strategies(args: argparse.Namespace, base: list[str], trainer) -> tuple[list[str], dict, dict]:
    """(names asked for with uniform first, {name: bound strategy}, {name: error}); uniform is the Trainer's own
    unless it has overrides."""
    wanted = weighting_names() if args.strategies == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "uniform" not in wanted:
        wanted = ["uniform", *wanted]
    strategies, errors = {}, {}
    for strategy_name in wanted:
        try:
            extra = weighting_overrides(args, strategy_name)
            cfg = compose([*base, f"weighting={strategy_name}", *extra], args.num_images, args.seed)
            own = strategy_name == "uniform" and not extra
            strategies[strategy_name] = trainer.strategy if own else build_strategy(cfg, trainer)
        except Exception as exc:
            errors[strategy_name] = _error_text(exc)
    return wanted, strategies, errors


def build_strategy(cfg: DictConfig, trainer):
    """What `Trainer.__init__` does with `cfg.weighting`, bound to the trainer's schedule and device."""
    validate(cfg)
    strategy = build(cfg.weighting, _keep_meta=("name", "citation"))
    strategy.bind(trainer.schedule, cfg.model.prediction, cfg.model.sigma_data, trainer.parts.comm).to(trainer.device)
    return strategy


# ---------------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------------
class Clock:
    """Seconds taken by `fn()`: CUDA events after a synchronize on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class Memory:
    """Peak memory: bytes above a baseline on GPU (max_memory_allocated), process RSS high-water on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_memory_allocated" if self.cuda else "cpu_rss_high_water_process"

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self, others_resident: int = 0) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - others_resident
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bf16_tflops(name: str, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------
# diffrun: the real Trainer, strategies swapped in
# ---------------------------------------------------------------------------------------------------
def run_steps(trainer, steps: int) -> None:
    """What `Trainer.fit` does per step, minus logging/checkpointing (which happen every N steps)."""
    for _ in range(steps):
        x0, labels = trainer.data.batch(trainer.parts.local_batch_size)
        trainer.step_fn(trainer.parts, x0, trainer.step, trainer.counters, trainer.stats, labels)
        trainer.step += 1
        trainer.state.images_seen += trainer.cfg.train.batch_size


def count_flops(trainer) -> tuple[float, float]:
    """(forward, forward+backward) model FLOPs per image of the eager denoiser at the benchmark batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffrun.schedules import alpha_sigma

    cfg = trainer.cfg.train
    x0 = trainer.data.batch(cfg.batch_size)[0]
    if cfg.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    logsnr = trainer.strategy.sample(x0).logsnr
    eps = torch.randn_like(x0)
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in alpha_sigma(logsnr))
    z = alpha * x0 + sigma * eps
    dtype = trainer.autocast_dtype
    # The math SDPA kernel is made of matmuls FlopCounterMode counts; CPU's fused kernel has no formula.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.autocast(trainer.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = trainer.denoiser(z, logsnr)
        forward = counter.get_total_flops()
        (out.float() - eps).square().mean().backward()
        total = counter.get_total_flops()
    trainer.denoiser.zero_grad(set_to_none=True)
    return forward / cfg.batch_size, total / cfg.batch_size


# ---------------------------------------------------------------------------------------------------
# the peer: diffusers' train_unconditional.py loop, with diffrun's U-Net
# ---------------------------------------------------------------------------------------------------
class PeerDDPMScheduler:
    """The part of diffusers' DDPMScheduler the training loop uses: linear β, integer t, `add_noise`."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.alphas_cumprod = self.alphas_cumprod.to(device=original.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=original.dtype)
        sqrt_alpha_prod = (alphas_cumprod[timesteps] ** 0.5).flatten()
        while sqrt_alpha_prod.dim() < original.dim():
            sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus = ((1 - alphas_cumprod[timesteps]) ** 0.5).flatten()
        while sqrt_one_minus.dim() < original.dim():
            sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
        return sqrt_alpha_prod * original + sqrt_one_minus * noise


class _FlipDataset(torch.utils.data.Dataset):
    """TensorDataset + per-image torchvision transforms (RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5))."""

    def __init__(self, images_uint8: torch.Tensor):
        from torchvision.transforms import v2

        self.data = torch.utils.data.TensorDataset(images_uint8)
        self.transform = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize([0.5] * images_uint8.shape[1], [0.5] * images_uint8.shape[1])])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.data[index][0])


class PeerLoop:
    """diffusers train_unconditional.py, step for step (defaults of that script): DataLoader on the CPU
    (num_workers=0), `.to(device)` per batch, AdamW(lr 1e-4, betas (0.95, 0.999), wd 1e-6) without
    `fused`, cosine LR with warm-up, autocast forward, `F.mse_loss` on ε, grad clip 1.0, EMA as a
    Python loop over parameters with the EMAModel warm-up decay, and `loss.item()` every step for logs."""

    def __init__(self, net_cfg: DictConfig, images_uint8: torch.Tensor, batch_size: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, num_workers: int = 0, compile: bool = False,
                 channels_last: bool = False):
        self.device, self.autocast_dtype = device, autocast_dtype
        self.weight_dtype = autocast_dtype or torch.float32     # the script casts inputs to the mixed dtype
        self.channels_last = channels_last
        self.model = build(net_cfg).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.forward = torch.compile(self.model) if compile else self.model
        self.scheduler = PeerDDPMScheduler()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                           weight_decay=1e-6, eps=1e-8)
        warmup, total = 500, 10**6
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: s / warmup if s < warmup else
                                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
        self.loader = torch.utils.data.DataLoader(_FlipDataset(images_uint8.cpu()), batch_size=batch_size,
                                                  shuffle=True, num_workers=num_workers, drop_last=True)
        self._batches = iter(self.loader)
        self.global_step, self.logs = 0, {}

    def _next_batch(self) -> torch.Tensor:
        try:
            return next(self._batches)
        except StopIteration:                                  # next epoch
            self._batches = iter(self.loader)
            return next(self._batches)

    def _ema_decay(self, inv_gamma: float = 1.0, power: float = 0.75, max_decay: float = 0.9999) -> float:
        step = max(0, self.global_step - 1)
        return 0.0 if step <= 0 else min(max_decay, 1 - (1 + step / inv_gamma) ** -power)

    def step(self, steps: int = 1) -> None:
        for _ in range(steps):
            clean = self._next_batch().to(self.device).to(self.weight_dtype)
            if self.channels_last:
                clean = clean.contiguous(memory_format=torch.channels_last)
            noise = torch.randn(clean.shape, dtype=self.weight_dtype, device=clean.device)
            timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (clean.shape[0],), device=clean.device).long()
            noisy = self.scheduler.add_noise(clean, noise, timesteps)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                model_output = self.forward(noisy, timesteps)
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.global_step += 1
            decay = self._ema_decay()
            with torch.no_grad():
                for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
                    ema_p.mul_(decay).add_(p, alpha=1 - decay)
            self.logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0],
                         "step": self.global_step, "ema_decay": decay}


# ---------------------------------------------------------------------------------------------------
# --overhead: host work per step outside the network, against a bare loop
# ---------------------------------------------------------------------------------------------------
class NetworkWindows:
    """When the network's own forward and backward run during a step, from hooks on the module: the forward
    from its pre-hook to its hook (with grad enabled: a strategy's no-grad probes are the strategy's work), the
    backward from the gradient reaching the network's output to the last parameter's accumulated gradient."""

    def __init__(self, module: torch.nn.Module, clock=time.perf_counter):
        self.clock = clock
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.expected_grads = len(self.params)    # lowered by `end_step` if some parameter never gets a gradient
        self.inside, self.network_s = False, 0.0
        self._since, self._grads_seen = 0.0, 0
        self._handles = [module.register_forward_pre_hook(self._forward_starts),
                         module.register_forward_hook(self._forward_ends),
                         *(p.register_post_accumulate_grad_hook(self._grad_accumulated) for p in self.params)]

    def _enter(self) -> None:
        self.inside, self._since = True, self.clock()

    def _leave(self) -> None:
        self.inside = False
        self.network_s += self.clock() - self._since

    def _forward_starts(self, module, args) -> None:
        if torch.is_grad_enabled() and not self.inside:
            self._enter()

    def _forward_ends(self, module, args, output) -> None:
        if torch.is_grad_enabled() and self.inside:
            self._leave()
            if output.requires_grad:
                output.register_hook(self._backward_starts)

    def _backward_starts(self, grad) -> None:
        self._grads_seen = 0
        self._enter()

    def _grad_accumulated(self, param) -> None:
        self._grads_seen += 1
        if self.inside and self._grads_seen == self.expected_grads:
            self._leave()

    def start_step(self) -> None:
        self.network_s = 0.0

    def end_step(self) -> None:
        if self.inside:                     # a parameter got no gradient: learn how many do (warm-up steps)
            self.expected_grads = self._grads_seen
            self._leave()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched to ATen, inside and outside the network's windows; host reads
    (`_local_scalar_dense`: `.item()`, `bool(t)`; a device sync on a GPU) apart; with `sources`, which
    line of diffrun (or of this script) issued each operator outside the network."""

    def __init__(self, windows: NetworkWindows | None, sources: bool = False):
        super().__init__()
        self.windows, self.with_sources = windows, sources
        self.inside = self.outside = self.reads = 0
        self.sources: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.windows is not None and self.windows.inside:
            self.inside += 1
        else:
            self.outside += 1
            if self.with_sources:
                self.sources[_issuing_line()] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _issuing_line() -> str:
    """`path:line function` of the innermost frame in diffrun/ or in this script's loops."""
    frame = sys._getframe(2)
    here = str(Path(__file__).resolve())
    package = str(ROOT / "diffrun")
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(package) or (name == here and frame.f_code.co_name in ("step", "_bare_step")):
            return f"{Path(name).resolve().relative_to(ROOT)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"


class BareLoop:
    """The least a diffusion training step does (the reference of `--overhead`): t ~ U[0, 1] on the run's
    schedule, ε ~ N(0, I), z = αx + σε, forward, ε-MSE, backward, fused AdamW. No NaN guard, no statistics,
    and unless `clip_and_ema`, no gradient clipping and no EMA (with it: `clip_grad_norm_` and one
    `_foreach_lerp_` with a constant decay, as timm's ModelEmaV3 does). Its own copy of the Trainer's
    denoiser, so the network work is identical."""

    def __init__(self, denoiser: torch.nn.Module, schedule, autocast_dtype: torch.dtype | None, lr: float,
                 clip_and_ema: bool = False):
        from diffrun.schedules import alpha_sigma

        self.alpha_sigma = alpha_sigma
        self.denoiser = copy.deepcopy(denoiser).train()
        self.schedule, self.autocast_dtype = schedule, autocast_dtype
        device = next(self.denoiser.parameters()).device
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"))
        self.params = list(self.denoiser.parameters())
        self.ema = [p.detach().clone() for p in self.params] if clip_and_ema else None

    def step(self, x0: torch.Tensor) -> None:
        t = torch.rand(x0.shape[0], device=x0.device)
        logsnr = self.schedule.logsnr(t).float()
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in self.alpha_sigma(logsnr))
        eps = torch.randn_like(x0)
        z = alpha * x0 + sigma * eps
        with torch.autocast(x0.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.denoiser(z, logsnr)
        loss = F.mse_loss(out.float(), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.ema is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.999)


def strategy_state(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.state_dict().items() if torch.is_tensor(v)}


def changed_state(before: dict[str, torch.Tensor], strategy) -> list[str]:
    """Names of the strategy's state tensors that changed since `before` (adaptive strategies learn)."""
    after = strategy_state(strategy)
    return sorted(k for k, v in after.items() if k not in before or not torch.equal(before[k], v))


def host_clock(cuda: bool):
    """The thread's CPU time on CPU (other jobs on a shared machine do not count); wall time on a GPU (the
    time the host takes to enqueue the work, measured after a synchronize)."""
    return time.perf_counter if cuda else time.thread_time


class OverheadProbe:
    """One loop under `--overhead`. `step(x0)` runs one training step, `batch()` draws x0 (not counted),
    `windows` watch the network (None: the step is captured, and its forward and backward cannot be told
    apart from the rest; nor can its operators be counted: torch.compile runs eagerly under a
    TorchDispatchMode, so `count` is not called for it)."""

    def __init__(self, step, batch, windows: NetworkWindows | None, cuda: bool):
        self.step, self.batch, self.cuda, self.windows = step, batch, cuda, windows
        self.clock = host_clock(cuda)
        self.counter: OpCounter | None = None
        self.counted_steps, self.host_s, self.outside_s = 0, [], []

    def _one(self, x0) -> tuple[float, float | None]:
        if self.windows is not None:
            self.windows.start_step()
        if self.cuda:
            torch.cuda.synchronize()            # host time of this step only, not of waiting for the last one
        start = self.clock()
        self.step(x0)
        seconds = self.clock() - start
        if self.windows is not None:
            self.windows.end_step()
            return seconds, self.windows.network_s
        return seconds, None

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self._one(self.batch())

    def count(self, steps: int, sources: bool) -> None:
        self.counter, self.counted_steps = OpCounter(self.windows, sources), steps
        for _ in range(steps):
            x0 = self.batch()
            with self.counter:
                self._one(x0)

    def time(self, steps: int) -> None:
        for _ in range(steps):
            seconds, network = self._one(self.batch())
            self.host_s.append(seconds)
            if network is not None:
                self.outside_s.append(seconds - network)

    def result(self) -> dict:
        c, n = self.counter, self.counted_steps
        median = lambda xs: statistics.median(xs) * 1e3 if xs else None       # noqa: E731
        mean = lambda xs: statistics.fmean(xs) * 1e3 if xs else None          # noqa: E731
        return {"ops_per_step": (c.inside + c.outside) / n if c else None,
                "ops_outside_per_step": c.outside / n if c and self.windows is not None else None,
                "host_reads_per_step": c.reads / n if c else None,
                "step_ms": median(self.host_s), "step_ms_mean": mean(self.host_s), "timed_steps": len(self.host_s),
                "outside_ms": median(self.outside_s), "outside_ms_mean": mean(self.outside_s),
                "sources": [{"line": line, "ops_per_step": k / n} for line, k in c.sources.most_common()] if c else []}


# ---------------------------------------------------------------------------------------------------
# FID evaluation: sampler and Inception
# ---------------------------------------------------------------------------------------------------
def bench_sampler(trainer, clock: Clock, batch: int, steps: int, windows: int, sampler: str = "ddim") -> dict:
    """Samples/s of `sampler` with the EMA model, one generator per image as the FID evaluation draws them."""
    from diffrun.sampling import PerImageGenerator, SamplerOptions, run_sampler

    shape = (batch, trainer.data.channels, trainer.data.image_size, trainer.data.image_size)

    def draw(n_steps: int) -> int:
        return run_sampler(trainer.ema.model, trainer.schedule, shape, SamplerOptions(sampler=sampler, steps=n_steps),
                           generator=PerImageGenerator(trainer.device, range(batch)), device=trainer.device,
                           autocast_dtype=trainer.autocast_dtype).nfe

    draw(2)                                                    # warm-up (kernels, allocator)
    nfe = SamplerOptions(sampler=sampler, steps=steps).nfe
    seconds = statistics.median(clock.time(lambda: draw(steps)) for _ in range(windows))
    return {"stage": f"{sampler} {steps} steps ({nfe} NFE, EMA model)", "batch": batch, "steps": steps, "nfe": nfe,
            "images_per_s": batch / seconds, "net_evals_per_s": batch * nfe / seconds, "seconds": seconds,
            "notes": "eager EMA model, per-image generators, as Trainer.generate runs it"}


def load_inception(device: torch.device, download: bool, random_init: bool) -> tuple[torch.nn.Module | None, str]:
    """(extractor taking uint8 images, description) or (None, 'n/a (reason)')."""
    reason = None
    try:
        from diffrun.evaluation.inception import resolve_inception_weights
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        weights = resolve_inception_weights(download=download)
        cls = FEATURE_EXTRACTORS_REGISTRY[weights.feature_extractor]
        net = cls(weights.feature_extractor, ["2048"], feature_extractor_weights_path=str(weights.path))
        return net.to(device).eval(), f"torch-fidelity {weights.feature_extractor}, weights: {weights.source}"
    except Exception as exc:                                   # missing module, no weights offline, ...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if not random_init:
        return None, f"n/a ({reason})"
    from torchvision.models import inception_v3

    body = inception_v3(weights=None, aux_logits=False, init_weights=False)
    body.fc = torch.nn.Identity()

    class RandomInit(torch.nn.Module):                         # same input handling as torch-fidelity's
        def forward(self, x):
            x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            return body((x - 128) / 128)

    return RandomInit().to(device).eval(), f"RANDOM-INIT torchvision inception_v3: throughput only, no FID ({reason})"


def bench_inception(device: torch.device, clock: Clock, batch: int, windows: int, download: bool,
                    random_init: bool) -> dict:
    row = {"stage": "Inception-v3 features (299 px)", "batch": batch, "images_per_s": None,
           "net_evals_per_s": None}
    net, notes = load_inception(device, download, random_init)
    row["notes"] = notes
    if net is None:
        return row
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    with torch.no_grad():
        net(images)                                            # warm-up
        seconds = statistics.median(clock.time(lambda: net(images)) for _ in range(windows))
    row.update(images_per_s=batch / seconds, net_evals_per_s=batch / seconds, seconds=seconds)
    return row


# ---------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ddpm_cifar10", "edm_ddpmpp_cifar10", "unet_small", "unet_tiny"], default=None,
                   help="conf/model (default: ddpm_cifar10 on CUDA, unet_tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128 CUDA, 8 CPU)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile of the denoiser)")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per loop (default: 20 CUDA, 2 CPU)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per loop (default: 5 CUDA, 3 CPU)")
    p.add_argument("--steps-per-window", type=int, default=None, help="steps per window (default: 20 CUDA, 3 CPU)")
    p.add_argument("--strategies", default="all", help="'all' (every conf/weighting/*.yaml) or a comma list")
    p.add_argument("--num-images", type=int, default=None, help="synthetic images (default: 50000 CUDA, 512 CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip the diffusers-style peer loop")
    p.add_argument("--peer-compile", action="store_true",
                   help="also torch.compile (and channels_last, if set) the peer; default: the example as written")
    p.add_argument("--peer-workers", type=int, default=0, help="peer DataLoader num_workers (the example's default: 0)")
    p.add_argument("--no-fid", action="store_true", help="skip sampler and Inception throughput")
    p.add_argument("--sampler", choices=["ddim", "heun"], default="ddim", help="the sampler timed")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps (heun: 18 is EDM's CIFAR-10, 35 NFE)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampler batch (default: 250 CUDA, 8 CPU)")
    p.add_argument("--inception-batch", type=int, default=None, help="Inception batch (default: 250 CUDA, 4 CPU)")
    p.add_argument("--inception-download", action="store_true", help="let resolve_inception_weights download")
    p.add_argument("--inception-random-init", action="store_true",
                   help="when no weights resolve, time a random-init Inception (labelled; no FID meaning)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, overriding the table")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, since OpenMP spin-waits collapse on a shared machine; "
                        "on CUDA: torch's default)")
    p.add_argument("--capture", action="store_true",
                   help="train.capture=compile (the whole step compiled; CUDA graphs on a GPU)")
    p.add_argument("--weighting-override", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="weighting.KEY=VALUE for strategy NAME only, e.g. adaptive_timestep:update_every=2 (repeatable)")
    p.add_argument("--overhead", action="store_true",
                   help="instead of throughput: operators and host ms per step outside the network, every strategy "
                        "against a bare loop (docs/performance.md)")
    p.add_argument("--overhead-steps", type=int, default=None,
                   help="steps counted and steps timed per loop with --overhead (default: 50 CUDA, 20 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p.parse_args(argv)


def _defaults(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    for key, on_cuda, on_cpu in [("model", "ddpm_cifar10", "unet_tiny"), ("batch", 128, 8), ("warmup", 20, 2),
                                 ("windows", 5, 3), ("steps_per_window", 20, 3), ("num_images", 50_000, 512),
                                 ("sample_batch", 250, 8), ("inception_batch", 250, 4), ("overhead_steps", 50, 20)]:
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    return args


def _row(window_s: list[float], steps_per_window: int, batch: int, flops_per_image: float | None,
         peak_tflops: float | None, peak_mem: int) -> dict:
    step_s = statistics.median(window_s) / steps_per_window
    mean_step_s = sum(window_s) / (len(window_s) * steps_per_window)
    images_per_s = batch / step_s
    achieved = flops_per_image * images_per_s / 1e12 if flops_per_image else None
    return {"images_per_s": images_per_s, "step_ms": step_s * 1e3, "step_ms_mean": mean_step_s * 1e3,
            "window_ms": [w * 1e3 for w in window_s], "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if achieved and peak_tflops else None, "peak_mem_bytes": peak_mem}


def _error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffrun.training.environment import resolve_device

    device = resolve_device(args.device)
    args = _defaults(args, device.type == "cuda")
    for item in args.weighting_override:
        name, sep, assignment = item.partition(":")
        if not (name and sep and "=" in assignment):
            raise SystemExit(f"--weighting-override {item!r}: expected NAME:KEY=VALUE, e.g. adaptive_timestep:update_every=2")
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    threads_before = torch.get_num_threads()
    recompile_limit = torch._dynamo.config.recompile_limit
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.capture:                                      # every strategy swapped in is a graph of its own
            torch._dynamo.config.recompile_limit = max(recompile_limit, 64)
        return (_run_overhead if args.overhead else _run)(args, argv, device)
    finally:
        torch.set_num_threads(threads_before)                 # main() is also called in-process (tests)
        torch._dynamo.config.recompile_limit = recompile_limit


def _run(args: argparse.Namespace, argv, device: torch.device) -> dict:
    from diffrun.training.trainer import Trainer

    clock, memory = Clock(device), Memory(device)
    name = device_name(device)
    peak_tflops = args.peak_tflops or peak_bf16_tflops(name, device)
    started = time.perf_counter()

    base = base_overrides(args)
    run_dir = Path(tempfile.mkdtemp(prefix="diffrun-bench-"))
    try:
        # --- diffrun: one Trainer, strategies swapped in ------------------------------------------
        base_alloc = memory.allocated()
        trainer = Trainer(compose([*base, "weighting=uniform"], args.num_images, args.seed), run_dir, callbacks=[])
        trainer.denoiser.train()
        params = sum(p.numel() for p in trainer.denoiser.parameters())
        flops_fwd, flops_fwd_bwd = count_flops(trainer)

        wanted, strategies, errors = build_strategies(args, base, trainer)
        steps = {strategy_name: 0 for strategy_name in strategies}
        initial_state = {strategy_name: strategy_state(s) for strategy_name, s in strategies.items()}

        def run_strategy(strategy_name: str, n: int) -> None:
            trainer.parts.strategy, trainer.step = strategies[strategy_name], steps[strategy_name]
            run_steps(trainer, n)
            steps[strategy_name] = trainer.step

        for strategy_name in list(strategies):                   # warm-up (compilation happens in uniform's)
            try:
                run_strategy(strategy_name, args.warmup)
            except Exception as exc:
                errors[strategy_name] = _error_text(exc)
                del strategies[strategy_name]
        if "uniform" not in strategies:
            raise RuntimeError(f"uniform weighting failed, nothing to compare against: {errors.get('uniform')}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        trainer_resident = memory.allocated() - base_alloc

        peer, peer_note, peer_resident = None, None, 0
        if args.no_peer:
            peer_note = "skipped (--no-peer)"
        else:
            before = memory.allocated()
            peer = PeerLoop(trainer.cfg.model.net, trainer.data.images, args.batch, device, trainer.autocast_dtype,
                            args.peer_workers, compile=args.peer_compile, channels_last=args.peer_compile and args.channels_last)
            peer.step(args.warmup)
            peer_resident = memory.allocated() - before

        # --- timed windows, round-robin -------------------------------------------------------
        times = {n: [] for n in strategies}
        peaks = {n: 0 for n in strategies}
        peer_times, peer_peak = [], 0
        for _ in range(args.windows):
            for strategy_name in list(strategies):
                memory.reset()
                try:
                    times[strategy_name].append(clock.time(lambda: run_strategy(strategy_name, args.steps_per_window)))
                except Exception as exc:
                    errors[strategy_name] = _error_text(exc)
                    del strategies[strategy_name], times[strategy_name]
                    continue
                peaks[strategy_name] = max(peaks[strategy_name], memory.peak(peer_resident))
            if peer is not None:
                memory.reset()
                peer_times.append(clock.time(lambda: peer.step(args.steps_per_window)))
                peer_peak = max(peer_peak, memory.peak(trainer_resident))

        diffrun_row = _row(times["uniform"], args.steps_per_window, args.batch, flops_fwd_bwd, peak_tflops, peaks["uniform"])
        diffrun_row["loop"] = "diffrun train_step (uniform)"
        peer_row = None
        if peer is not None:
            peer_row = _row(peer_times, args.steps_per_window, args.batch, flops_fwd_bwd, peak_tflops, peer_peak)
            peer_row["loop"] = "peer: diffusers train_unconditional.py loop" + (" (compiled)" if args.peer_compile else "")
            peer_row["last_loss"] = peer.logs.get("loss")
            diffrun_row["speedup_vs_peer"] = peer_row["step_ms_mean"] / diffrun_row["step_ms_mean"]
            peer_row["speedup_vs_peer"] = 1.0

        uniform_mean = diffrun_row["step_ms_mean"]
        strategy_rows = []
        for strategy_name in wanted:
            if strategy_name in strategies:
                row = _row(times[strategy_name], args.steps_per_window, args.batch, None, None, peaks[strategy_name])
                row.update(name=strategy_name, status="ok", error=None,
                           ratio_to_uniform=row["step_ms_mean"] / uniform_mean, steps=steps[strategy_name],
                           state_changed=changed_state(initial_state[strategy_name], strategies[strategy_name]))
            else:
                row = {"name": strategy_name, "status": "error", "error": errors.get(strategy_name, "unknown error"),
                       "step_ms": None, "step_ms_mean": None, "ratio_to_uniform": None, "images_per_s": None,
                       "peak_mem_bytes": None}
            strategy_rows.append(row)

        # --- FID evaluation throughput --------------------------------------------------------
        fid = None
        if not args.no_fid:
            trainer.parts.strategy = strategies["uniform"]
            fid = {"sampler": bench_sampler(trainer, clock, args.sample_batch, args.sample_steps, max(1, args.windows // 2),
                                            args.sampler),
                   "inception": bench_inception(device, clock, args.inception_batch, max(1, args.windows // 2),
                                                args.inception_download, args.inception_random_init)}
            fid["sampler"]["achieved_tflops"] = flops_fwd * fid["sampler"]["net_evals_per_s"] / 1e12
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    import hydra

    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "device": str(device), "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "hydra": hydra.__version__, "python": platform.python_version(),
            "model": args.model, "params": params, "batch": args.batch,
            "precision": args.precision, "autocast_dtype": str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
            "compile": args.compile, "channels_last": args.channels_last,
            "fused_optimizer": bool(trainer.optimizer.defaults.get("fused")),
            "warmup_steps": args.warmup, "windows": args.windows, "steps_per_window": args.steps_per_window,
            "num_images": args.num_images, "memory_kind": memory.kind, "threads": torch.get_num_threads(),
            "seconds_total": time.perf_counter() - started,
            "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "flops": {"forward_per_image": flops_fwd, "fwd_bwd_per_image": flops_fwd_bwd,
                  "peak_bf16_tflops": peak_tflops,
                  "peak_source": ("--peak-tflops" if args.peak_tflops else "table") if peak_tflops else None},
        "train": {"diffrun": diffrun_row, "peer": peer_row, "peer_note": peer_note},
        "strategies": strategy_rows,
        "fid": fid,
    }
    result["meta"]["seconds_total"] = time.perf_counter() - started
    if not args.quiet:
        print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _run_overhead(args: argparse.Namespace, argv, device: torch.device) -> dict:
    """`--overhead`: the two bare loops, then every strategy's step in one Trainer (swapped in as in `_run`)."""
    from diffrun.training.trainer import Trainer

    started = time.perf_counter()
    cuda = device.type == "cuda"
    base = base_overrides(args)
    run_dir = Path(tempfile.mkdtemp(prefix="diffrun-bench-"))
    try:
        trainer = Trainer(compose([*base, "weighting=uniform"], args.num_images, args.seed), run_dir, callbacks=[])
        trainer.denoiser.train()
        wanted, strategies, errors = build_strategies(args, base, trainer)

        def batch():
            return trainer.data.batch(trainer.parts.local_batch_size)[0]

        lr = trainer.optimizer.defaults["lr"]
        clock = host_clock(cuda)
        # a captured step has no network windows to time
        windows = [] if args.capture else [NetworkWindows(trainer.denoiser, clock)]
        probes, rows, strategy_rows = {}, {}, {}
        for label, clip_and_ema in (("bare loop", False), ("bare + clip + EMA", True)):
            bare = BareLoop(trainer.denoiser, trainer.schedule, trainer.autocast_dtype, lr, clip_and_ema)
            windows.append(NetworkWindows(bare.denoiser, clock))
            probes[label] = OverheadProbe(bare.step, batch, windows[-1], cuda)
        for strategy_name in wanted:
            if strategy_name not in strategies:
                rows[strategy_name] = {"name": strategy_name, "status": "error", "error": errors[strategy_name]}
                continue
            strategy, taken = strategies[strategy_name], [0]
            strategy_rows[strategy_name] = {"before": strategy_state(strategy), "taken": taken}

            def step(x0, strategy=strategy, taken=taken):
                trainer.parts.strategy, trainer.step = strategy, taken[0]
                trainer.step_fn(trainer.parts, x0, trainer.step, trainer.counters, trainer.stats)
                taken[0] += 1

            probes[strategy_name] = OverheadProbe(step, batch, None if args.capture else windows[0], cuda)

        def guarded(name, work) -> None:
            if name in rows:                                         # failed before
                return
            try:
                work(probes[name])
            except Exception as exc:
                rows[name] = {"name": name, "status": "error", "error": _error_text(exc)}

        try:
            for name in probes:                                      # warm-up and operator counts, loop by loop
                guarded(name, lambda probe: probe.warm_up(args.warmup))
                if probes[name].windows is not None:                 # not a captured step (see OverheadProbe)
                    guarded(name, lambda probe: probe.count(args.overhead_steps,
                                                            sources=name in ("bare loop", "uniform")))
            rounds = min(5, args.overhead_steps)                     # timing round-robin: load drift hits all alike
            for r in range(rounds):
                share = args.overhead_steps // rounds + (r < args.overhead_steps % rounds)
                for name in probes:
                    guarded(name, lambda probe: probe.time(share))
        finally:
            for watch in windows:
                watch.remove()
        ordered = []
        for name in ("bare loop", "bare + clip + EMA", *wanted):
            if name in rows:
                ordered.append(rows[name])
                continue
            row = {"name": name, "status": "ok", "error": None, **probes[name].result()}
            if name in strategy_rows:
                row.update(steps=strategy_rows[name]["taken"][0],
                           state_changed=changed_state(strategy_rows[name]["before"], strategies[name]))
            ordered.append(row)
        rows = ordered
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    bare, bare_plus = rows[0], rows[1]
    for row in rows[1:]:
        if row["status"] == "ok":
            row["ops_outside_x_bare"] = _ratio(row["ops_outside_per_step"], bare.get("ops_outside_per_step"))
            row["outside_ms_x_bare"] = _ratio(row["outside_ms"], bare.get("outside_ms"))
            row["outside_ms_x_bare_clip_ema"] = _ratio(row["outside_ms"], bare_plus.get("outside_ms"))
    import hydra

    result = {
        "meta": {
            "mode": "overhead", "date": datetime.date.today().isoformat(),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "hydra": hydra.__version__, "python": platform.python_version(),
            "model": args.model, "params": sum(p.numel() for p in trainer.denoiser.parameters()),
            "param_tensors": sum(1 for _ in trainer.denoiser.parameters()), "batch": args.batch,
            "precision": args.precision, "autocast_dtype": str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
            "compile": args.compile, "capture": args.capture, "channels_last": args.channels_last,
            "warmup_steps": args.warmup, "steps": args.overhead_steps, "threads": torch.get_num_threads(),
            "weighting_overrides": list(args.weighting_override),
            "seconds_total": time.perf_counter() - started,
            "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "overhead": rows,
    }
    if not args.quiet:
        print(format_overhead_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------
def _num(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _mem(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def _table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)    # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_report(result: dict) -> str:
    meta, flops = result["meta"], result["flops"]
    cpu = meta["device"] == "cpu"
    head = (f"diffrun bench {meta['date']}: {meta['model']} ({meta['params'] / 1e6:.2f}M params), batch {meta['batch']}, "
            f"{meta['autocast_dtype']}, compile={meta['compile']}, channels_last={meta['channels_last']}\n"
            f"device {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), torch {meta['torch']}; "
            f"{meta['windows']} windows x {meta['steps_per_window']} steps after {meta['warmup_steps']} warm-up steps"
            + ("\nCPU, shared machine: not a performance claim. Peak memory on CPU is the process RSS high-water."
               if cpu else ""))
    rows = []
    for row in (result["train"]["diffrun"], result["train"]["peer"]):
        if row is None:
            continue
        rows.append([row["loop"], _num(row["images_per_s"]), _num(row["step_ms"], 2),
                     _num(row.get("speedup_vs_peer"), 2, "x"), _num(flops["fwd_bwd_per_image"] / 1e9, 3),
                     _num(row["achieved_tflops"], 3), "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                     _mem(row["peak_mem_bytes"])])
    parts = [head, "", "Training step", _table(TRAIN_COLUMNS, rows)]
    if result["train"]["peer"] is None:
        parts.append(f"peer: {result['train']['peer_note']}")
    peak = flops["peak_bf16_tflops"]
    parts.append(f"model FLOPs/image: forward {flops['forward_per_image'] / 1e9:.3f} G, forward+backward "
                 f"{flops['fwd_bwd_per_image'] / 1e9:.3f} G; MFU vs dense bf16 peak "
                 + (f"{peak:.0f} TFLOP/s" if peak else "n/a (no peak known for this device)"))
    srows = [[r["name"], _num(r["step_ms"], 2), _num(r["ratio_to_uniform"], 3, "x"), _num(r["images_per_s"]),
              _mem(r["peak_mem_bytes"]), "ok" if r["status"] == "ok" else r["error"],
              ", ".join(_grouped(r.get("state_changed")) or []) or ("none" if r["status"] == "ok" else "")]
             for r in result["strategies"]]
    parts += ["", "Weighting strategies (same Trainer, model and batch; x uniform = amortised step time ratio)",
              _table(STRATEGY_COLUMNS, srows)]
    if result["fid"] is not None:
        frows = [[r["stage"], r["batch"], _num(r["images_per_s"]), _num(r["net_evals_per_s"]), r["notes"]]
                 for r in (result["fid"]["sampler"], result["fid"]["inception"])]
        parts += ["", "FID evaluation", _table(FID_COLUMNS, frows)]
    parts.append(f"\ntotal {meta['seconds_total']:.1f} s")
    return "\n".join(parts)


def _grouped(names: list[str] | None) -> list[str] | None:
    """State names with a module's parameters folded: policy.mlp.0.weight, policy.head.bias → policy.*"""
    if names is None:
        return None
    return sorted({name.split(".")[0] + ".*" if "." in name else name for name in names})


def format_overhead_report(result: dict) -> str:
    meta = result["meta"]
    head = (f"diffrun overhead {meta['date']}: {meta['model']} ({meta['params'] / 1e6:.2f}M params in "
            f"{meta['param_tensors']} tensors), batch {meta['batch']}, {meta['autocast_dtype']}, "
            f"capture={meta['capture']}, compile={meta['compile']}\n"
            f"device {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), torch {meta['torch']}; "
            f"per loop {meta['warmup_steps']} warm-up steps, then {meta['steps']} steps counted and {meta['steps']} timed "
            f"(medians)\n"
            "ops: ATen operators dispatched per step; outside: not in the network's forward/backward; host reads: "
            "_local_scalar_dense (.item()/bool(); a sync on a GPU)"
            + ("\ncaptured steps: step ms only (operators cannot be counted: torch.compile runs eagerly under the "
               "counting TorchDispatchMode; the network cannot be timed apart)" if meta["capture"] else ""))
    rows = []
    for r in result["overhead"]:
        if r["status"] != "ok":
            rows.append([r["name"], *["n/a"] * (len(OVERHEAD_COLUMNS) - 2), r["error"]])
            continue
        changed = _grouped(r.get("state_changed"))
        rows.append([r["name"], _num(r["ops_per_step"]), _num(r["ops_outside_per_step"]),
                     _num(r.get("ops_outside_x_bare"), 2, "x"), _num(r["host_reads_per_step"], 2),
                     _num(r["outside_ms"], 3), _num(r.get("outside_ms_x_bare"), 2, "x"),
                     _num(r.get("outside_ms_x_bare_clip_ema"), 2, "x"), _num(r["step_ms"], 2),
                     "-" if changed is None else (", ".join(changed) if changed else "none")])
    parts = [head, "", _table(OVERHEAD_COLUMNS, rows)]
    bare, uniform = result["overhead"][0], next((r for r in result["overhead"] if r["name"] == "uniform"), None)
    for row in (bare, uniform):
        if row is not None and row.get("sources"):
            parts += ["", f"operators outside the network per step, by the line that issued them: {row['name']}"]
            parts += [f"  {s['ops_per_step']:7.1f}  {s['line']}" for s in row["sources"][:15]]
    parts.append(f"\ntotal {meta['seconds_total']:.1f} s")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
