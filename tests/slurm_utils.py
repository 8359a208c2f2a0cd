"""Helpers for tests that talk to a real SLURM cluster (not a test module itself).

The one-node cluster comes from ``scripts/slurm_local_cluster.sh`` (run as root).  Tests that
need it should skip with the reason when it is not there::

    from slurm_utils import require_slurm, slurm_job_scope, wait_for_jobs

    def test_sweep_on_slurm(tmp_path):
        require_slurm()                      # pytest.skip("SLURM unavailable: ...") otherwise
        with slurm_job_scope("diffrun-test") as name:
            run_cli(..., "-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}")
            wait_for_jobs(name, timeout=300) # normally already gone: the launcher blocks

Notes for test authors (see also conf/hydra/launcher/slurm.yaml):

* The cluster has no accounting, so ``sacct`` fails; submitit only notices a job finished when
  its ``*_result.pkl`` appears.  A job killed from outside (scancel, OOM, time limit without
  requeue) never writes one and the launching process then waits forever: always run a
  SLURM sweep in a subprocess with a timeout and cancel the jobs afterwards
  (``slurm_job_scope`` does the cancelling).
* A requeued job (``scontrol requeue``, submitit's own requeue on SIGUSR2, preemption) stays
  PENDING with reason BeginTime for ``cred_expire`` (+1) seconds (30 on the local cluster);
  ``release_held_jobs`` starts such jobs right away.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

# Node states (sinfo %T, long form) in which the node accepts work.  "allocated" counts: the
# node is healthy, only busy, and queued jobs will run when it frees up.
_USABLE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
SKIP_ENV = "DIFFRUN_SKIP_SLURM"


def _run(cmd: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


_CACHE_TTL_S = 30.0
_cache: dict[str | None, tuple[float, tuple[bool, str]]] = {}


def slurm_available(
    partition: str | None = None, timeout: float = 10.0, refresh: bool = False
) -> tuple[bool, str]:
    """Whether a usable SLURM cluster answers; returns ``(ok, reason)``.

    ``ok`` is True when ``sinfo`` responds and at least one node (in ``partition`` if given)
    is idle/mixed/allocated without down/drain/not-responding flags, and ``srun``/``sbatch``
    are on PATH (submitit needs both).  ``reason`` says what is missing, or describes the
    cluster when ok.  Set ``DIFFRUN_SKIP_SLURM=1`` to force ``(False, ...)``.

    The answer is cached for 30 s per partition (a stopped slurmctld makes ``sinfo`` hang
    until ``timeout``, which would otherwise be paid by every skipped test); pass
    ``refresh=True`` to ask again.
    """
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return False, f"{SKIP_ENV} is set"
    now = time.monotonic()
    cached = _cache.get(partition)
    if cached is not None and not refresh and now - cached[0] < _CACHE_TTL_S:
        return cached[1]
    result = _probe(partition, timeout)
    _cache[partition] = (time.monotonic(), result)
    return result


def _probe(partition: str | None, timeout: float) -> tuple[bool, str]:
    missing = [c for c in ("sinfo", "squeue", "sbatch", "srun", "scancel") if shutil.which(c) is None]
    if missing:
        return False, (
            f"{', '.join(missing)} not on PATH (start a local cluster with "
            "`sudo bash scripts/slurm_local_cluster.sh`)"
        )
    cmd = ["sinfo", "--noheader", "--Node", "--format=%N|%T|%P"]
    if partition:
        cmd.append(f"--partition={partition}")
    try:
        proc = _run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"`{' '.join(cmd)}` did not answer within {timeout:g}s (slurmctld down?)"
    except OSError as exc:
        return False, f"`{' '.join(cmd)}` failed: {exc}"
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"sinfo failed (rc={proc.returncode}): {msg[-1] if msg else 'no output'}"
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    if not rows:
        where = f"in partition {partition!r}" if partition else "at all"
        return False, f"sinfo lists no nodes {where}"
    usable = sorted({r[0] for r in rows if len(r) >= 2 and r[1] in _USABLE_STATES})
    if not usable:
        states = ", ".join(sorted({f"{r[0]}={r[1]}" for r in rows if len(r) >= 2}))
        return False, f"no usable SLURM node ({states})"
    parts = sorted({r[2].rstrip("*") for r in rows if len(r) >= 3 and r[0] in usable})
    return True, f"nodes {','.join(usable)} usable; partitions {','.join(parts)}"


def skip_or_fail(reason: str) -> None:
    """Skip with the reason; fail instead where SLURM was set up on purpose (``.ci/run`` sets
    DIFFRUN_REQUIRE_SLURM=1 once its cluster is up), so a cluster that died mid-suite cannot pass as a skip."""
    import pytest

    if os.environ.get("DIFFRUN_REQUIRE_SLURM") == "1":
        pytest.fail(f"DIFFRUN_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def require_slurm(partition: str | None = None) -> None:
    """``pytest.skip`` the calling test (with the reason) unless SLURM is usable."""
    ok, reason = slurm_available(partition)
    if not ok:
        skip_or_fail(f"SLURM unavailable: {reason}")


@dataclass(frozen=True)
class SlurmJob:
    job_id: str  # "123" or "123_4" for array tasks
    name: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    reason: str  # e.g. BeginTime for a requeued job waiting to restart


def list_jobs(name_prefix: str = "") -> list[SlurmJob]:
    """Jobs still known to ``squeue`` (pending/running/completing) whose name starts with
    ``name_prefix``.  Finished jobs are not listed.  Raises RuntimeError if squeue fails."""
    proc = _run(["squeue", "--noheader", "--array", "--format=%i|%T|%r|%j"])
    if proc.returncode != 0:
        raise RuntimeError(f"squeue failed (rc={proc.returncode}): {proc.stderr.strip()}")
    jobs = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[3].startswith(name_prefix):
            jobs.append(SlurmJob(job_id=parts[0], state=parts[1], reason=parts[2], name=parts[3]))
    return jobs


def wait_for_jobs(
    name_prefix: str,
    timeout: float = 300.0,
    poll: float = 1.0,
    cancel_on_timeout: bool = True,
    release_held: bool = False,
) -> float:
    """Block until no job whose name starts with ``name_prefix`` is pending/running.

    Returns the seconds waited.  On timeout raises ``TimeoutError`` listing the jobs left
    (after cancelling them when ``cancel_on_timeout``).  With ``release_held`` a requeued job
    waiting for its BeginTime is started at once (see ``release_held_jobs``).  Transient
    squeue failures (slurmctld restarting) are retried until the timeout.
    """
    if not name_prefix:
        raise ValueError("name_prefix must not be empty (it would match every job)")
    start = time.monotonic()
    last_error = ""
    while True:
        try:
            jobs = list_jobs(name_prefix)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            jobs, last_error = None, str(exc)
        if jobs == []:
            return time.monotonic() - start
        if jobs and release_held:
            release_held_jobs(name_prefix, jobs)
        if time.monotonic() - start > timeout:
            left = ", ".join(f"{j.job_id}({j.state}/{j.reason})" for j in jobs or [])
            if cancel_on_timeout:
                cancel_jobs(name_prefix)
            raise TimeoutError(
                f"SLURM jobs named {name_prefix}* still queued after {timeout:g}s: "
                f"{left or last_error}" + (" (cancelled)" if cancel_on_timeout and jobs else "")
            )
        time.sleep(poll)


def release_held_jobs(name_prefix: str, jobs: list[SlurmJob] | None = None) -> list[str]:
    """Make requeued jobs (PENDING, reason BeginTime) eligible now instead of after the
    requeue delay.  Returns the job ids updated."""
    jobs = list_jobs(name_prefix) if jobs is None else jobs
    released = []
    for job in jobs:
        if job.state == "PENDING" and job.reason == "BeginTime":
            proc = _run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"])
            if proc.returncode == 0:
                released.append(job.job_id)
    return released


def cancel_jobs(name_prefix: str) -> list[str]:
    """``scancel`` every queued/running job whose name starts with ``name_prefix``."""
    if not name_prefix:
        raise ValueError("name_prefix must not be empty (it would match every job)")
    try:
        ids = [j.job_id for j in list_jobs(name_prefix)]
    except (RuntimeError, subprocess.TimeoutExpired):
        return []
    if ids:
        _run(["scancel", *ids])
    return ids


def unique_job_name(prefix: str = "diffrun-test") -> str:
    """A SLURM job name no other test run uses, e.g. ``diffrun-test-4242-1a2b3c``."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def slurm_job_scope(prefix: str = "diffrun-test", cleanup_timeout: float = 30.0) -> Iterator[str]:
    """Yield a unique job name (pass it as ``hydra.launcher.name=<name>``); on exit cancel
    whatever jobs with that name are still queued or running and wait for them to leave
    the queue (up to ``cleanup_timeout`` seconds)."""
    name = unique_job_name(prefix)
    try:
        yield name
    finally:
        if cancel_jobs(name):
            with contextlib.suppress(TimeoutError):
                wait_for_jobs(name, timeout=cleanup_timeout, cancel_on_timeout=False)
