"""Data-parallel training (torch DDP): who this process is, how many ranks there are, the process group.

Four ways to get several ranks; all end in the same env-based `init_process_group`:

    torchrun --nproc_per_node=2 -m diffrun.cli ...      RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT)
    srun, e.g. hydra/launcher=slurm_gpu                  SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID
        hydra.launcher.tasks_per_node=4                  (rendezvous: submitit's TorchDistributedEnvironment)
    hydra/launcher=local hydra.launcher.tasks_per_node=2 submitit's local tasks, the same rendezvous
    diffrun dist.devices=2                               this process is rank 0 and starts ranks 1..N-1

The contract (see docs/sweeps.md): `train.batch_size` is the *global* batch, each rank draws
batch_size / world_size images; the model is initialised identically on every rank (same seed; DDP
also broadcasts rank 0's weights), data and noise use seed + rank; only rank 0 writes files
(checkpoints, metrics, samples, statistics, status); per-bin statistics and loss sums are summed
over ranks before they are written. Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from diffrun.config import option
from diffrun.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "gloo", "nccl", "mpi")
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = DistInfo()
_owns_group = False


def env_info() -> DistInfo:
    """The ranks the launcher asked for: torchrun's variables first, then an srun step's, then the tasks of
    submitit's local executor (`hydra/launcher=local hydra.launcher.tasks_per_node=N`)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    # SLURM_STEP_NUM_TASKS exists inside `srun` only: a batch script with --ntasks=N that runs
    # python directly (one process) must not wait for N-1 ranks that never come.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"]))
    if int(env.get("SUBMITIT_LOCAL_NTASKS", 1) or 1) > 1 and "SUBMITIT_LOCAL_GLOBALID" in env:
        return DistInfo(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
                        int(env["SUBMITIT_LOCAL_NTASKS"]))
    return DistInfo()


def local_processes() -> int:
    """Processes of this job that share this process's CPUs: torchrun's and `dist.devices`' LOCAL_WORLD_SIZE.
    srun tasks and submitit's local tasks are counted by their launcher (SLURM gives each task its own CPUs)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1))


def info() -> DistInfo:
    """This process's rank info once `init` ran (single process otherwise)."""
    return _current


def backend_for(name: str, device: torch.device) -> str:
    name = option(name)
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


def rank_device(device: torch.device, rank_info: DistInfo) -> torch.device:
    """`cuda` means this rank's GPU (LOCAL_RANK) under DDP. An explicit `cuda:N` would put every rank on GPU N: an
    error where a rank sees several GPUs (with one visible GPU per rank, `cuda:0` is each rank's own)."""
    if device.type != "cuda" or not rank_info.enabled:
        return device
    count = max(1, torch.cuda.device_count())
    if device.index is not None and count > 1:
        raise ConfigError(f"device={device} under DDP ({rank_info.world_size} ranks, {count} visible GPUs) would put "
                          f"every rank on one GPU: use device=cuda (each rank takes GPU LOCAL_RANK), and "
                          f"CUDA_VISIBLE_DEVICES to choose the GPUs")
    return torch.device("cuda", rank_info.local_rank % count) if device.index is None else device


def submitit_rendezvous() -> tuple[str, int] | None:
    """MASTER_ADDR/PORT for the ranks of a SLURM step or of submitit's local tasks, from submitit's
    `TorchDistributedEnvironment`: the job's first host, and a port drawn from the job id (the same on every
    task) unless MASTER_PORT is set. None under torchrun (it sets its own) or without a job submitit knows."""
    from submitit.helpers import TorchDistributedEnvironment

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return None
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor is None and "SLURM_JOB_ID" in os.environ:
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"   # srun started by hand, not by submitit: the same variables
    try:
        env = TorchDistributedEnvironment()
    except RuntimeError:  # not inside a job submitit recognises
        return None
    finally:
        if executor is None:
            os.environ.pop("SUBMITIT_EXECUTOR", None)
    return env.master_addr, env.master_port


def init(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group the environment describes (no-op for one process). Returns the rank info."""
    global _current, _owns_group
    wanted = env_info()
    if not wanted.enabled:
        _current = DistInfo()
        return _current
    if not dist.is_initialized():
        rendezvous = submitit_rendezvous()
        if rendezvous is not None:
            os.environ.setdefault("MASTER_ADDR", rendezvous[0])
            os.environ.setdefault("MASTER_PORT", str(rendezvous[1]))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        name = backend_for(backend, device)
        if name == "nccl":
            torch.cuda.set_device(rank_device(device, wanted))
        dist.init_process_group(name, init_method="env://", rank=wanted.rank, world_size=wanted.world_size,
                                timeout=timedelta(seconds=timeout_s))
        _owns_group = True
        log.info("rank %d/%d (local %d) joined the %s process group at %s:%s", wanted.rank, wanted.world_size,
                 wanted.local_rank, name, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    _current = wanted
    return _current


def teardown(synchronize: bool = True) -> None:
    """Leave the process group. With `synchronize`, every rank first waits at a barrier, so no rank
    destroys its half of a connection while another still has work in flight on it (a gloo rank that
    loses its peer mid-operation aborts the whole process). A failing rank skips the barrier: the
    others would wait for it until the timeout."""
    global _current, _owns_group
    if _owns_group and dist.is_initialized():
        if synchronize and _current.enabled:
            dist.barrier()
        dist.destroy_process_group()
    _current, _owns_group = DistInfo(), False


@contextlib.contextmanager
def session(device: torch.device, backend: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    ok = False
    try:
        yield init(device, backend, timeout_s)
        ok = True
    finally:
        teardown(synchronize=ok)


# --------------------------------------------------------------------------------------------------
# collectives: the `Communication` strategies and the trainer use (diffrun.strategies.base)
# --------------------------------------------------------------------------------------------------
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessGroupCommunication:
    """Collectives over the default process group (`init` joined it)."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` summed over ranks (the tensor itself is left alone)."""
        return self.all_reduce_(tensor.clone())

    def all_gather_cat(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """Each tensor (same length on every rank) concatenated over ranks in rank order, on every rank;
        None stays None. One collective for all of them: packed as float64 columns, which holds float32
        values and integer indices below 2^53 exactly."""
        present = [t for t in tensors if t is not None]
        packed = torch.stack([t.reshape(-1).double() for t in present], dim=1)
        parts = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(parts, packed)
        columns = iter(torch.cat(parts).unbind(1))
        return tuple(None if t is None else next(columns).to(t.dtype) for t in tensors)

    def broadcast_module_(self, module: torch.nn.Module, src: int = 0) -> None:
        """Overwrite every parameter and persistent buffer of `module` with rank `src`'s (state that must
        be one across ranks, e.g. a strategy built after the per-rank seeding)."""
        for tensor in module.state_dict().values():
            if torch.is_tensor(tensor):
                dist.broadcast(tensor, src)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (a host sync: call it sparingly)."""
    if not _current.enabled:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _current.enabled:
        return [obj]
    out = [None] * _current.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _current.enabled:
        dist.barrier()


def check_batch(batch_size: int, world_size: int, ranks: str) -> None:
    """`train.batch_size` is the global batch: each of the `world_size` ranks (`ranks` says whose) draws
    batch_size / world_size."""
    if world_size > 1 and batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must be divisible by {ranks}: "
                          f"each of the {world_size} ranks draws batch_size / {world_size}")


def check_backend(name: str, device: torch.device, devices: int) -> None:
    """The process-group backend `dist.backend` names exists here for `device`, with a GPU per rank for nccl.
    Nothing to check for a single process."""
    launched = env_info()
    if (launched.world_size if launched.enabled else devices) <= 1:
        return
    backend = backend_for(name, device)
    available = {"gloo": dist.is_available() and dist.is_gloo_available(),
                 "nccl": dist.is_available() and dist.is_nccl_available() and device.type == "cuda",
                 "mpi": dist.is_available() and dist.is_mpi_available()}
    if not available[backend]:
        usable = ", ".join(["auto", *(b for b, ok in available.items() if ok)])
        raise ConfigError(f"dist.backend={option(name)!r} ({backend}) is not available with device={device} here; "
                          f"allowed {usable}")
    if backend == "nccl" and not launched.enabled and devices > torch.cuda.device_count():
        raise ConfigError(f"dist.devices={devices} with nccl needs one GPU per rank, and this machine has "
                          f"{torch.cuda.device_count()}; allowed at most {torch.cuda.device_count()}")


def check_run_batch(batch_size: int, devices: int) -> None:
    """The batch rule for the ranks this process will be one of: those a launcher started, else `dist.devices`."""
    launched = env_info()
    if launched.enabled:
        check_batch(batch_size, launched.world_size, f"the {launched.world_size} ranks the launcher started")
    else:
        check_batch(batch_size, devices, f"dist.devices={devices}")
