"""`dist.devices=N`: this process becomes rank 0 of N ranks on this machine and starts ranks 1..N-1, each a
fresh interpreter that joins the same env-based process group (diffrun/distributed.py)."""
from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator

from diffrun.distributed import RANK_ENV, DistInfo
from diffrun.training.interrupt import GracefulInterrupt

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_rank_main(rank: int, world_size: int, port: int, target: str, args: tuple) -> None:
    # Signals belong to rank 0 (Ctrl-C, SLURM's USR2 via submitit): it tells the others to stop at the
    # next agreed step (Trainer.stop_requested), so this process ignores them.
    GracefulInterrupt.install_handlers = False
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}][%(levelname)s] %(name)s: %(message)s")
    module, _, function = target.partition(":")
    getattr(importlib.import_module(module), function)(*args)
    # The work is done and this rank writes no files. Leave without interpreter finalisation: gloo's
    # C++ threads torn down by static destructors can abort ("terminate called without an active
    # exception", pytorch/pytorch#190489) and turn a finished run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def local_ranks(world_size: int, target: str, args: tuple, join_timeout_s: float = 120.0) -> Iterator[DistInfo]:
    """Run the body as rank 0 of `world_size` local ranks; `target(*args)` runs in each of the others
    (`target` is "module:function", importable in a fresh interpreter; `args` must pickle).

    The environment (RANK, WORLD_SIZE, MASTER_PORT, ...) is restored afterwards, so the next job of a
    multirun in this process starts clean. A rank that fails makes the whole group fail.
    """
    saved = {k: os.environ.get(k) for k in RANK_ENV}
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_local_rank_main, args=(r, world_size, port, target, args), daemon=False,
                         name=f"diffrun-rank{r}") for r in range(1, world_size)]
    os.environ.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ok = False
    try:
        for p in procs:
            p.start()
        yield DistInfo(0, 0, world_size)
        ok = True
    finally:
        for p in procs:
            p.join(join_timeout_s if ok else 10.0)
            if p.is_alive():
                log.warning("%s did not exit; terminating it", p.name)
                p.terminate()
                p.join(10.0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    failed = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"distributed training failed on {', '.join(failed)}; see the messages above")
