"""Timing, memory and FLOPs: windows timed by CUDA events (perf_counter on CPU), peak memory, and MFU against the
device's dense bf16 peak."""
from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path

import torch

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


def window_row(window_s: list[float], steps_per_window: int, batch: int, flops_per_image: float | None,
         peak_tflops: float | None, peak_mem: int) -> dict:
    step_s = statistics.median(window_s) / steps_per_window
    mean_step_s = sum(window_s) / (len(window_s) * steps_per_window)
    images_per_s = batch / step_s
    achieved = flops_per_image * images_per_s / 1e12 if flops_per_image else None
    return {"images_per_s": images_per_s, "step_ms": step_s * 1e3, "step_ms_mean": mean_step_s * 1e3,
            "window_ms": [w * 1e3 for w in window_s], "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if achieved and peak_tflops else None, "peak_mem_bytes": peak_mem}


def error_text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None
