"""Device, precision, seeding and provenance: what a run needs to know about where it runs."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from diffrun.config import option
from diffrun.errors import ConfigError

log = logging.getLogger("diffrun")


def resolve_device(name: str) -> torch.device:
    """The device `device=` names (auto | cpu | cuda | cuda:N | mps), if this machine has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: allowed auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name!r} but this machine has {count} GPU(s): "
                              f"allowed cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use device=cpu or device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r}: allowed auto, cpu, cuda, cuda:N, mps")
    return device


def check_device(name: str, precision: str) -> torch.device:
    """The device exists here, and the precision runs on it."""
    device = resolve_device(name)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision=fp16 on device={device.type} needs CUDA (GradScaler); allowed here auto, fp32, "
                          f"bf16")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler). `auto`: bf16 on a GPU with bf16 tensor cores (compute capability
    8.0 and up: A100, H100, RTX 30xx), fp32 elsewhere (older GPUs emulate bf16 slowly; fp16 needs a GradScaler,
    which the user asks for by name)."""
    name = option(name)
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    if name == "fp32":
        return None, False
    if name == "bf16":
        return torch.bfloat16, False
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision=fp16 needs CUDA (GradScaler); use precision=bf16 or fp32 on CPU")
        return torch.float16, True
    raise ConfigError(f"precision={name!r}: allowed auto, fp32, bf16, fp16")


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a cgroup cpuset, SLURM's task binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS): every CPU
        return os.cpu_count() or 1


def _positive_int(name: str, environ) -> int | None:
    """An environment variable that counts CPUs: None when unset or empty; ConfigError when it is not a count."""
    text = environ.get(name, "").strip()
    if not text:
        return None
    first = text.split(",")[0]   # OMP_NUM_THREADS may list one count per nesting level
    if not first.isdigit() or int(first) < 1:
        raise ConfigError(f"{name}={text!r}: expected a positive whole number of CPU threads; set it to one "
                          f"(e.g. {name}=4) or unset it")
    return int(first)


def cpu_threads(sharing: int = 1, environ=os.environ) -> tuple[int, str]:
    """How many intra-op threads torch should use here, and why (for the log). In order: OMP_NUM_THREADS (the
    user's word, per process), else SLURM_CPUS_PER_TASK (the task's allocation) or the CPUs this process may run on
    (its affinity), divided among the `sharing` processes that run on them (the jobs a local launcher runs at once
    × the ranks each starts). More threads than free cores is the costly mistake: OpenMP threads spin-wait for
    each other (docs/performance.md)."""
    omp = _positive_int("OMP_NUM_THREADS", environ)
    if omp is not None:
        return omp, f"OMP_NUM_THREADS={omp}"
    slurm = _positive_int("SLURM_CPUS_PER_TASK", environ)
    if slurm is not None:
        cpus, where = slurm, f"SLURM_CPUS_PER_TASK={slurm}"
    else:
        cpus = available_cpus()
        where = f"the {cpus} CPU(s) this process may run on"
    if sharing <= 1:
        return cpus, where
    return max(1, cpus // sharing), f"{where}, shared by {sharing} processes"


def busy_cores_warning(threads: int, load: float | None = None) -> str | None:
    """A warning when other programs seem to keep this process's CPUs busy (the 1-minute load average is above
    their number) while torch would use several threads. The thread count itself is not taken from the load:
    results differ in the last bits between thread counts, and a run's numbers must not depend on its neighbours."""
    if threads <= 1:
        return None
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:
        return None
    cpus = available_cpus()
    if load <= cpus:
        return None
    return (f"the load average ({load:.1f}) is above the {cpus} CPU(s) this process may run on: other programs keep "
            f"them busy, and {threads} spin-waiting torch threads can then be many times slower than one "
            f"(docs/performance.md#cpu-threads); OMP_NUM_THREADS=1 sets one")


def set_cpu_threads(sharing: int = 1, sharers: str = "") -> int:
    """Set torch's intra-op threads by `cpu_threads` and log the number and why (`sharers`: who shares the CPUs);
    warn when other programs seem to keep the CPUs busy and the user did not choose the number."""
    threads, why = cpu_threads(sharing)
    torch.set_num_threads(threads)
    log.info("torch uses %d CPU thread%s (%s%s)", threads, "" if threads == 1 else "s", why,
             f"; {sharers}" if sharers else "")
    warning = None if why.startswith("OMP_NUM_THREADS") else busy_cores_warning(threads)
    if warning:
        log.warning("%s", warning)
    return threads


def apply_tf32(setting: bool | None) -> None:
    """`train.tf32`: None leaves PyTorch's defaults; False/True set TF32 for cuDNN convolutions and matmuls alike
    (EDM's training_loop.py sets both False)."""
    if setting is None:
        return
    torch.backends.cudnn.allow_tf32 = bool(setting)
    torch.backends.cuda.matmul.allow_tf32 = bool(setting)


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool, device: torch.device) -> None:
    """`deterministic=`: deterministic kernels (and no cuDNN autotuning) when on, the fast ones when off. Set both
    ways at every run's start: the flags are process-wide, and a job of a multirun (or a test) must not inherit
    the previous one's. cuDNN times its conv algorithms once per shape (`benchmark`) only on CUDA."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on


def rng_state() -> dict:
    """Every random stream's state as data a checkpoint can hold (`rng_as_data`)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return rng_as_data(state)


def rng_as_data(state: dict) -> dict:
    """Python's and NumPy's RNG states (tuples holding an int tuple and an ndarray) as tensors and plain numbers,
    which `torch.load(weights_only=True)` reads; a state already in this form is returned as it is."""
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, tuple):
        version, internal, gauss_next = python
        python = {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}
    if isinstance(numpy, tuple):
        _, key, pos, has_gauss, gauss = numpy        # np.random.get_state(): ("MT19937", key, pos, has_gauss, gauss)
        numpy = {"key": torch.from_numpy(np.asarray(key).astype(np.int64)), "pos": int(pos),
                 "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return {**state, "python": python, "numpy": numpy}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s dict; its tensors may come from a checkpoint loaded to the CPU."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]}})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a requeue on a node with another GPU count: this process's device keeps its stream
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


@contextlib.contextmanager
def isolated_rng():
    """Run a block without touching the training random streams (Python, NumPy, torch CPU and CUDA):
    they are saved before and restored after, whatever the block draws or reseeds."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def provenance() -> dict:
    """Git commit, package versions and host: saved beside every run."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    packages = {}
    for name in ("diffrun", "torch", "torchvision", "hydra-core", "omegaconf", "torch-fidelity", "wandb", "submitit", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": packages,
        "python": platform.python_version(),
        "host": platform.node(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
