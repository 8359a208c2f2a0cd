"""`diffrun-status`: where the jobs of a sweep stand, while it runs and after (SLURM requeues included).

    diffrun-status outputs/sweeps/smoke                # one line per job
    diffrun-status outputs/sweeps/smoke --watch 10     # redrawn every 10 s until Ctrl-C
    diffrun-status outputs/sweeps/smoke --json         # (or --csv) the same rows for scripts
    diffrun-status outputs/runs/<name>                 # a single run

A command of its own rather than `diffrun status`: `diffrun` is a Hydra app, which reads every argument as
a config override or one of Hydra's flags.

Every column is read from files the runs write, never from the launcher:

    state      <job>/status.json; `starting` when the index logged a (re)start after the status was written;
               `lost` when it says running but its process, on this host, is gone (killed: rerun to resume);
               `pending` for a job of the sweep's plan (multirun.yaml) that has not started; `unsubmitted` instead
               when the sweep's SLURM submission left no job id (`unsubmitted_reason`)
    step       the newer of status.json and the last record of <job>/metrics.jsonl
    images/s   the median of the last 3 training records
    FID        the last evaluation record (or status.json's, at the end)
    restarts   starts logged in <sweep>/index.jsonl after the first, except reruns that skipped a finished job
    SLURM      the job's SLURM id in the index's last line for it (`<array>_<task>`)
    ETA        steps left × images per step ÷ the recent images/s, less the time since that record
    updated    time since the job's metrics or status last changed
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from diffrun.errors import DiffrunError
from diffrun.launching.sweep import planned_jobs
from diffrun.run_folder import CONFIG, INDEX, JOB_FOLDER, LOCK, METRICS, MULTIRUN, STATUS, SUBMITIT, holds_run
from diffrun.run_folder.index import starts_by_folder
from diffrun.run_folder.metrics import tail_metrics
from diffrun.run_folder.status import FAILED, FINISHED, HALTED, RUNNING, read_status

RECENT = 3                      # training records the images/s (and so the ETA) are taken from


class StatusError(DiffrunError):
    """The directory is not a sweep or run diffrun-status can read."""


@dataclasses.dataclass
class JobStatus:
    job: str                            # the job's folder (a pending job: its number)
    job_num: Optional[int]
    strategy: Optional[str]
    seed: Optional[int]
    state: str                          # pending | unsubmitted | starting | running | lost | interrupted | halted |
                                        # failed | finished
    step: Optional[int] = None
    total_steps: Optional[int] = None
    images_per_sec: Optional[float] = None
    fid: Optional[float] = None
    fid_step: Optional[int] = None
    restarts: int = 0
    slurm_job_id: Optional[str] = None
    eta_s: Optional[float] = None
    updated_s: Optional[float] = None   # seconds since its metrics or status changed
    error: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# reading one job
# ------------------------------------------------------------------------------------------------
def number(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def process_gone(run_dir: Path) -> bool:
    """The run's lock names a process on this host that no longer exists (another host's cannot be checked)."""
    try:
        holder = json.loads((run_dir / LOCK).read_text() or "{}")
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        pass
    return False


def run_config(run_dir: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_job(run_dir: Path, starts: list[dict], now: float) -> JobStatus:
    """One job folder, with its index lines (`starts`, oldest first)."""
    match = JOB_FOLDER.match(run_dir.name)
    last = starts[-1] if starts else {}
    status = read_status(run_dir) or {}
    train, evaluation = tail_metrics(run_dir, RECENT)
    strategy = last.get("weighting") or (match and match["strategy"]) or None
    seed = last.get("seed", int(match["seed"]) if match else None)
    if strategy is None or seed is None:   # a run outside a sweep: its resolved config says
        config = run_config(run_dir)
        strategy = strategy or (config.get("weighting") or {}).get("name")
        seed = config.get("seed") if seed is None else seed
    job = JobStatus(job=run_dir.name, job_num=last.get("job_num", int(match["num"]) if match else None),
                    strategy=strategy, seed=seed, state=status.get("state", RUNNING if train else "starting"),
                    total_steps=status.get("total_steps"), slurm_job_id=last.get("slurm_job_id"),
                    restarts=sum(1 for e in starts[1:] if e.get("previous_state") != FINISHED))
    steps = [s for s in (status.get("step"), train[-1]["step"] if train else None) if isinstance(s, int)]
    job.step = max(steps) if steps else None
    if train:
        recent = [v for v in (number(r.get("images_per_sec")) for r in train) if v is not None]
        job.images_per_sec = statistics.median(recent) if recent else None
    if evaluation is not None:
        job.fid, job.fid_step = number(evaluation.get("fid")), evaluation.get("step")
    elif number(status.get("fid")) is not None:
        job.fid, job.fid_step = number(status["fid"]), status.get("step")
    changed = [p.stat().st_mtime for p in (run_dir / METRICS, run_dir / STATUS) if p.exists()]
    job.updated_s = now - max(changed) if changed else None
    status_time = (run_dir / STATUS).stat().st_mtime if (run_dir / STATUS).exists() else 0.0
    if job.state not in (RUNNING, FINISHED) and last.get("start_time") and _iso_time(last["start_time"]) > status_time:
        job.state = "starting"            # (re)started, e.g. requeued by SLURM, and not yet training
    if job.state == RUNNING and process_gone(run_dir):
        job.state = "lost"
    if job.state in (FAILED, HALTED):
        job.error = next((ln.strip() for ln in str(status.get("error", "")).splitlines() if ln.strip()), None)
    job.eta_s = eta(job, train, now)
    return job


def _iso_time(text: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def eta(job: JobStatus, train: list[dict], now: float) -> Optional[float]:
    """Seconds of training left: steps left × images per step ÷ the recent images/s, less the time since the
    last record. None when the job is not training or the rate is unknown."""
    if job.state not in (RUNNING, "starting") or not train or not job.images_per_sec or not job.total_steps:
        return None
    last = train[-1]
    per_step = number(last.get("images_seen")) / max(1, int(last["step"])) if number(last.get("images_seen")) else None
    if not per_step:
        return None
    left = (job.total_steps - int(last["step"])) * per_step / job.images_per_sec
    since = now - number(last.get("time")) if number(last.get("time")) else 0.0
    return max(0.0, left - max(0.0, since))


# ------------------------------------------------------------------------------------------------
# a sweep
# ------------------------------------------------------------------------------------------------
SUBMITIT_JOB = re.compile(r"^\d+(_\d+)?$")    # submitit's folder per SLURM job: <job id> or <array id>_<task>


def unsubmitted_reason(sweep_dir: Path) -> Optional[str]:
    """Why the jobs of a SLURM sweep that have not started are not queued either: Hydra writes multirun.yaml before
    submitit calls sbatch, and submitit makes a folder per job id (`hydra.launcher.submitit_folder`, diffrun's
    presets: `<sweep>/.submitit/%j`) once sbatch has answered with one. None when the sweep is not a SLURM one, its
    submitit folder is elsewhere, or a job id is there (queued)."""
    from omegaconf import OmegaConf

    try:
        launcher = OmegaConf.load(sweep_dir / MULTIRUN).hydra.launcher
        target, folder = str(launcher.get("_target_", "")), str(launcher._get_node("submitit_folder")._value())
    except Exception:  # noqa: BLE001 — no plan, or not a submitit sweep: nothing to say
        return None
    if not target.endswith("SlurmLauncher") or not folder.startswith(f"${{hydra.sweep.dir}}/{SUBMITIT}/"):
        return None
    submitit = sweep_dir / SUBMITIT
    if submitit.is_dir() and any(SUBMITIT_JOB.match(p.name) for p in submitit.iterdir() if p.is_dir()):
        return None
    return (f"never queued: no SLURM job id under {submitit} (sbatch failed, and the command that submitted the "
            f"sweep printed why, or it is being submitted now); fix that and rerun the same command")


def sweep_status(path: str | Path, now: Optional[float] = None) -> list[JobStatus]:
    """One JobStatus per job of the sweep in `path` (started, or planned and pending), in job-number order; a
    run directory gives its own row."""
    path = Path(path)
    now = time.time() if now is None else now
    if not path.is_dir():
        raise StatusError(f"{path} is not a directory; give a sweep directory (outputs/sweeps/<sweep_name>) or a run "
                          f"directory (outputs/runs/<name>)")
    if holds_run(path) and not (path / INDEX).exists():
        return [read_job(path, [], now)]
    starts = starts_by_folder(path)
    folders = {p.name: p for p in path.iterdir()
               if p.is_dir() and not p.name.startswith(".") and (holds_run(p) or p.name in starts)}
    jobs = [read_job(folder, starts.get(name, []), now) for name, folder in folders.items()]
    jobs += [JobStatus(job=name, job_num=e[-1].get("job_num"), strategy=e[-1].get("weighting"),
                       seed=e[-1].get("seed"), state="starting", slurm_job_id=e[-1].get("slurm_job_id"))
             for name, e in starts.items() if name not in folders]
    started = {j.job_num for j in jobs}
    planned = [(num, overrides) for num, overrides in enumerate(planned_jobs(path) or []) if num not in started]
    unsubmitted = unsubmitted_reason(path) if planned else None
    for num, overrides in planned:
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        seed = values.get("seed")
        jobs.append(JobStatus(job=f"job {num}", job_num=num, strategy=values.get("weighting"),
                              seed=int(seed) if seed and seed.lstrip("-").isdigit() else None,
                              state="unsubmitted" if unsubmitted else "pending", error=unsubmitted))
    if not jobs:
        raise StatusError(f"{path} holds no job folders, no index.jsonl and no multirun.yaml: is it the directory "
                          f"a multirun wrote (outputs/sweeps/<sweep_name>) or a run's (outputs/runs/<name>)?")
    return sorted(jobs, key=lambda j: (j.job_num if j.job_num is not None else 1 << 30, j.job))


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


COLUMNS = ("job", "strategy", "seed", "state", "step", "img/s", "FID", "restarts", "SLURM", "ETA", "updated")


def row(job: JobStatus) -> list[str]:
    def show(value, spec=""):
        return "—" if value is None else format(value, spec)

    step = "—" if job.step is None else f"{job.step}/{show(job.total_steps)}"
    fid = "—" if job.fid is None else f"{job.fid:.2f} @{job.fid_step}"
    return [job.job, show(job.strategy), show(job.seed), job.state, step, show(job.images_per_sec, ".0f"), fid,
            str(job.restarts), show(job.slurm_job_id), duration(job.eta_s), duration(job.updated_s)]


def table(jobs: list[JobStatus]) -> str:
    rows = [list(COLUMNS)] + [row(j) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    right = {"seed", "step", "img/s", "FID", "restarts", "ETA", "updated"}
    lines = ["  ".join(c.rjust(w) if COLUMNS[i] in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    summary = f"{len(jobs)} job{'s' * (len(jobs) != 1)}: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    etas = [j.eta_s for j in jobs if j.eta_s is not None]
    if etas:
        summary += f"; the running jobs end in {duration(max(etas))} at the latest"
    lines += ["", summary]
    lines += [f"  {j.job}: {j.state}: {j.error}" for j in jobs if j.error]
    if any(j.state == "lost" for j in jobs):
        lines.append("  lost: status.json says running but the process is gone (killed); rerun the sweep's command "
                     "to resume it")
    return "\n".join(lines)


def as_dicts(jobs: list[JobStatus]) -> list[dict]:
    return [dataclasses.asdict(j) for j in jobs]


def write_csv(jobs: list[JobStatus], stream) -> None:
    writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(JobStatus)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(as_dicts(jobs))


def render(path: Path, fmt: str, stream) -> list[JobStatus]:
    jobs = sweep_status(path)
    if fmt == "json":
        stream.write(json.dumps({"sweep": str(path), "time": time.time(), "jobs": as_dicts(jobs)}) + "\n")
    elif fmt == "csv":
        write_csv(jobs, stream)
    else:
        stream.write(f"{path}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n{table(jobs)}\n")
    stream.flush()
    return jobs


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="diffrun-status", description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a sweep directory (outputs/sweeps/<sweep_name>) or a run directory")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object (with --watch: one per line and refresh)")
    out.add_argument("--csv", action="store_true", help="one CSV row per job")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        p.error(f"--watch {args.watch:g}: give the seconds between refreshes, a positive number")
    if args.count is not None and (args.watch is None or args.count < 1):
        p.error("--count N needs --watch and N >= 1")
    if args.watch is not None and args.csv:
        p.error("--csv prints once; use --json with --watch (one JSON object per refresh)")
    fmt = "json" if args.json else "csv" if args.csv else "table"
    clear = fmt == "table" and sys.stdout.isatty()
    refreshes = 0
    try:
        while True:
            if clear and args.watch is not None:
                sys.stdout.write("\033[H\033[2J")
            render(args.path, fmt, sys.stdout)
            refreshes += 1
            if args.watch is None or (args.count is not None and refreshes >= args.count):
                return 0
            if fmt == "table":
                sys.stdout.write(f"(every {args.watch:g} s; Ctrl-C to stop)\n\n")
                sys.stdout.flush()
            time.sleep(args.watch)
    except DiffrunError as exc:
        print(f"diffrun-status: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
