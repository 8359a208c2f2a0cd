"""Read a sweep into one `RunRecord` per job: from a sweep directory (W&B: wandb_runs.py). One cohesive reader (a
job's folder → its record), hence a little over ~350 lines.

A sweep directory holds one folder per job, `<job_num>_<weighting>_seed<seed>/`, each with
`config.yaml`, `status.json`, `metrics.jsonl` and (optionally) `logsnr_stats.npz`. A job whose
status is missing or not `finished` is a failed/incomplete job: it is kept, with its error, and
left out of the per-strategy statistics. The sweep's `index.jsonl` (one line per job start), when
present, says which folder is which strategy and seed; otherwise each job's `config.yaml` does, and
the folder name is the last resort.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from diffrun.errors import DiffrunError
from diffrun.monitoring.stats_writer import FILENAME as NPZ_NAME  # one owner of the file format
from diffrun.monitoring.stats_writer import PER_BIN as STATS_KEYS
from diffrun.monitoring.stats_writer import load_stats as read_stats_file
from diffrun.run_folder import CONFIG, JOB_FOLDER, SUBMITIT, holds_run
from diffrun.run_folder.index import starts_by_folder
from diffrun.run_folder.metrics import is_evaluation, is_training, read_metrics
from diffrun.run_folder.status import FINISHED, read_status


class ReportError(DiffrunError):
    """The sweep cannot be read or reported: the message names the path or source and the fix."""


def to_float(value: Any) -> float:
    """JSON numbers, and the strings "nan"/"inf" that `MetricsFile` writes for non-finite floats."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def first_line(text: Optional[str]) -> str:
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[0] if lines else ""


def dotted(tree: Any, key: str, default: Any = None) -> Any:
    """`tree["a"]["b"]` for key "a.b"; also accepts flat keys ("a.b", "a/b") as W&B stores them."""
    if not isinstance(tree, dict):
        return default
    for flat in (key, key.replace(".", "/")):
        if flat in tree:
            value = tree[flat]
            return value.get("value", value) if isinstance(value, dict) and set(value) <= {"value", "desc"} else value
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


@dataclass
class RunRecord:
    """One job of a sweep, as read from disk (or W&B)."""
    name: str                               # job folder name (or W&B run name)
    strategy: str                           # weighting.name
    seed: Optional[int]
    state: str                              # running | interrupted | halted | failed | finished | missing
    error: str = ""                         # first line of the error, or why the job is incomplete
    job_num: Optional[int] = None
    path: Optional[Path] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    train: list = field(default_factory=list)   # training records, sorted by step, one per step
    evals: list = field(default_factory=list)   # evaluation records (with "fid"), sorted by step, one per step and
    #                                             protocol (fid_protocol): in-training and diffrun-eval ones
    stats: Optional[dict] = None                # arrays of logsnr_stats.npz, or None

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def prediction(self) -> Optional[str]:
        return dotted(self.config, "model.prediction")

    # --- FID -----------------------------------------------------------------------------------
    @property
    def final_eval(self) -> Optional[dict]:
        """The evaluation at the last evaluated step; of several there, the one with the most samples (then
        repeats), e.g. a diffrun-eval FID-50k over the in-training FID-10k; of equals, the last written."""
        finite = [r for r in self.evals if math.isfinite(to_float(r.get("fid")))]
        if not finite:
            return None
        last = max(int(r["step"]) for r in finite)
        return max((r for r in finite if int(r["step"]) == last), key=eval_strength)

    @property
    def fid_protocol(self) -> Optional[str]:
        """The protocol of the final evaluation; the FID curve, best FID and steps-to-target use only it."""
        final = self.final_eval
        return None if final is None else protocol_label(final)

    def fid_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, FID) of the finite evaluations made with the final evaluation's protocol, in step order."""
        label = self.fid_protocol
        points = [(int(r["step"]), to_float(r["fid"])) for r in self.evals if protocol_label(r) == label]
        points = [(s, f) for s, f in points if math.isfinite(f)]
        if not points:
            return np.zeros(0, dtype=int), np.zeros(0)
        steps, fids = zip(*points)
        return np.asarray(steps), np.asarray(fids, dtype=float)

    @property
    def has_fid(self) -> bool:
        return len(self.fid_curve()[0]) > 0

    @property
    def final_fid(self) -> float:
        """FID of the last evaluation (the one at the end of training when it ran)."""
        _, fids = self.fid_curve()
        return float(fids[-1]) if len(fids) else math.nan

    @property
    def best_fid(self) -> float:
        _, fids = self.fid_curve()
        return float(fids.min()) if len(fids) else math.nan

    def steps_to_fid(self, target: Optional[float]) -> Optional[int]:
        """Step of the first evaluation with FID ≤ target (None: never reached, or no target)."""
        if target is None:
            return None
        for step, fid in zip(*self.fid_curve()):
            if fid <= target:
                return int(step)
        return None

    # --- training records -----------------------------------------------------------------------
    def train_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [(int(r["step"]), to_float(r.get(key))) for r in self.train if key in r]
        if not rows:
            return np.zeros(0, dtype=int), np.zeros(0)
        steps, values = zip(*rows)
        return np.asarray(steps), np.asarray(values, dtype=float)

    def final_train(self, key: str = "loss") -> float:
        _, values = self.train_series(key)
        return float(values[-1]) if len(values) else math.nan

    @property
    def images_per_sec(self) -> float:
        """Median of `images_per_sec` over this run's training records."""
        _, values = self.train_series("images_per_sec")
        values = values[np.isfinite(values)]
        return float(np.median(values)) if len(values) else math.nan


@dataclass
class Sweep:
    name: str
    source: str                              # the directory, or "wandb:entity/project group=G"
    runs: list[RunRecord]
    experiment: Optional[str] = None
    dataset: Optional[str] = None
    baseline: Optional[str] = None           # from the runs' report.baseline
    target_fid: Optional[float] = None       # from the runs' report.target_fid
    notes: list[str] = field(default_factory=list)  # things the reader should know (duplicates, index...)

    @property
    def strategies(self) -> list[str]:
        """Strategies in sweep order (the order of the first job of each)."""
        seen: dict[str, int] = {}
        for i, run in enumerate(sorted(self.runs, key=lambda r: (r.job_num if r.job_num is not None else 1 << 30))):
            seen.setdefault(run.strategy, i)
        return list(seen)


# ------------------------------------------------------------------------------------------------
# local sweep directory
# ------------------------------------------------------------------------------------------------
def protocol_label(record: dict) -> str:
    """The one-line protocol of an evaluation record (`fid_protocol`; older records: samples and sampler)."""
    if record.get("fid_protocol"):
        return str(record["fid_protocol"])
    label = f"FID-{record.get('fid_num_samples', '?')}"
    return label + (f", {record['fid_sampler']}" if record.get("fid_sampler") else "")


def eval_strength(record: dict) -> tuple[float, float, int]:
    """Which of two evaluations of one step the report prefers: more samples, then more repeats, then the later
    (`_order`, its place in the file)."""
    return (to_float(record.get("fid_num_samples", 0)), to_float(record.get("fid_repeats", 1)),
            int(record.get("_order", 0)))


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training and evaluation records, each sorted by step. Evaluation records are those with `fid`: written
    during training (`source: training`) or afterwards by diffrun-eval (`source: diffrun-eval`, appended to the
    same file). A step logged twice keeps the last: training records per step (a resume), evaluation records
    per step and protocol (a re-evaluation)."""
    train: dict[int, dict] = {}
    evals: dict[tuple[int, str], dict] = {}
    for order, rec in enumerate(records):
        if is_evaluation(rec):
            evals[int(rec["step"]), protocol_label(rec)] = {**rec, "_order": order}
        elif is_training(rec):
            train[int(rec["step"])] = rec
    return [train[s] for s in sorted(train)], sorted(evals.values(), key=lambda r: (int(r["step"]), r["_order"]))


def load_stats(path: Path) -> Optional[dict]:
    """Arrays of `logsnr_stats.npz` sorted by step (duplicates keep the last), or None if absent/unreadable."""
    if not path.exists():
        return None
    try:
        data = read_stats_file(path)
    except Exception:  # a torn file from a killed job reads as absent; the report says so
        return None
    if "step" not in data or "centers" not in data or "count" not in data:
        return None
    steps = np.asarray(data["step"]).reshape(-1)
    order = np.argsort(steps, kind="stable")
    keep = [i for j, i in enumerate(order) if j == len(order) - 1 or steps[order[j + 1]] != steps[i]]
    out = {"step": steps[keep], "centers": np.asarray(data["centers"], dtype=float)}
    if "edges" in data:
        out["edges"] = np.asarray(data["edges"], dtype=float)
    else:
        c = out["centers"]
        mid = 0.5 * (c[1:] + c[:-1])
        out["edges"] = np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])
    for key in STATS_KEYS:
        if key in data:
            arr = np.asarray(data[key], dtype=float)
            out[key] = arr.reshape(len(steps), -1)[keep]
    return out


def load_config(path: Path) -> dict:
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception:
        return {}


def read_index(sweep_dir: Path) -> dict[str, dict]:
    """Job folder → {strategy, seed, job_num} from the sweep's `index.jsonl` (diffrun.run_folder.index), if any;
    a requeued or rerun job's last line wins."""
    return {folder: {"strategy": e[-1].get("weighting"), "seed": e[-1].get("seed"), "job_num": e[-1].get("job_num")}
            for folder, e in starts_by_folder(sweep_dir).items()}


def incomplete_reason(status: dict, has_status: bool) -> str:
    if not has_status:
        return "no status.json (the job never started, or died before writing it)"
    state = status.get("state", "?")
    error = first_line(status.get("error"))
    if error:
        return error
    where = f" at step {status.get('step')}/{status.get('total_steps')}" if "step" in status else ""
    return f"state '{state}'{where} (not finished)"


def read_job(job_dir: Path, index_entry: Optional[dict] = None) -> RunRecord:
    config = load_config(job_dir / CONFIG)
    status = read_status(job_dir)
    has_status = status is not None
    status = status or {}
    train, evals = split_records(read_metrics(job_dir))
    if "fid" in status and math.isfinite(to_float(status["fid"])) and not any(
            int(e["step"]) == int(status.get("step", -1)) for e in evals):
        evals.append({"step": int(status.get("step", evals[-1]["step"] if evals else 0)), "fid": status["fid"]})
        evals.sort(key=lambda e: int(e["step"]))

    match = JOB_FOLDER.match(job_dir.name)
    entry = index_entry or {}
    strategy = entry.get("strategy") or dotted(config, "weighting.name") or (match and match["strategy"]) or "?"
    seed = entry.get("seed", dotted(config, "seed", int(match["seed"]) if match else None))
    num = entry.get("job_num")
    if num is None and match:
        num = int(match["num"])
    state = status.get("state", "missing") if has_status else "missing"
    return RunRecord(
        name=job_dir.name, strategy=str(strategy), seed=None if seed is None else int(seed), state=state,
        error="" if state == FINISHED else incomplete_reason(status, has_status),
        job_num=num, path=job_dir, step=status.get("step"), total_steps=status.get("total_steps"),
        config=config, status=status, train=train, evals=evals, stats=load_stats(job_dir / NPZ_NAME),
    )


def is_job_dir(path: Path) -> bool:
    if not path.is_dir() or path.name in ("report", ".hydra", SUBMITIT):
        return False
    return bool(JOB_FOLDER.match(path.name)) or holds_run(path)


def common_value(runs: list[RunRecord], key: str) -> Any:
    """The value most runs agree on (None when no run has it)."""
    values = [v for v in (dotted(r.config, key) for r in runs) if v is not None]
    if not values:
        return None
    labels = [str(v) for v in values]
    return values[max(range(len(values)), key=lambda i: labels.count(labels[i]))]


def collect_sweep(sweep_dir: str | Path) -> Sweep:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"sweep directory {sweep_dir} does not exist; pass the folder a multirun wrote, "
                          f"e.g. outputs/sweeps/<sweep_name>")
    index = read_index(sweep_dir)
    jobs = sorted((p for p in sweep_dir.iterdir() if is_job_dir(p)), key=lambda p: p.name)
    notes: list[str] = []
    for missing in sorted(set(index) - {p.name for p in jobs}):
        jobs.append(sweep_dir / missing)  # listed by the launcher but never created: a failed job
    runs = []
    for job in jobs:
        if job.exists():
            runs.append(read_job(job, index.get(job.name)))
        else:
            e = index[job.name]
            runs.append(RunRecord(name=job.name, strategy=str(e.get("strategy") or "?"), seed=e.get("seed"),
                                  state="missing", error="listed in the sweep index but its folder does not exist",
                                  job_num=e.get("job_num"), path=job))
    if not runs:
        raise ReportError(f"{sweep_dir} holds no job folders (<num>_<weighting>_seed<seed>/ with config.yaml, "
                          f"status.json or metrics.jsonl); is this the sweep directory?")
    if index:
        notes.append(f"job → strategy/seed mapping read from the launcher's index ({len(index)} entries)")
    runs.sort(key=lambda r: (r.job_num if r.job_num is not None else 1 << 30, r.name))
    return make_sweep(runs, name=common_value(runs, "sweep_name") or sweep_dir.name, source=str(sweep_dir), notes=notes)


def make_sweep(runs: list[RunRecord], name: str, source: str, notes: list[str]) -> Sweep:
    by_key: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        by_key.setdefault((run.strategy, run.seed), []).append(run)
    for (strategy, seed), group in by_key.items():
        if len(group) > 1 and sum(r.finished for r in group) > 1:
            keep = max((r for r in group if r.finished), key=lambda r: (r.step or 0, r.job_num or 0))
            for r in group:
                if r.finished and r is not keep:
                    r.state, r.error = "duplicate", f"same strategy and seed as {keep.name}; that job is used"
            notes.append(f"{strategy} seed {seed} ran {len(group)} times; the report uses {keep.name}")
    target = common_value(runs, "report.target_fid")
    return Sweep(
        name=str(name), source=source, runs=runs,
        experiment=common_value(runs, "experiment"), dataset=common_value(runs, "dataset.name"),
        baseline=common_value(runs, "report.baseline"),
        target_fid=None if target is None else float(target), notes=notes,
    )
