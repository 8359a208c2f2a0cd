"""Read a sweep's runs from W&B into `RunRecord`s (`diffrun-report --wandb ENTITY/PROJECT --group G`); the default,
offline source is the sweep directory (collect.py)."""
from __future__ import annotations

import os
import re
from typing import Optional

from diffrun.reporting.collect import ReportError, RunRecord, Sweep, dotted, first_line, make_sweep, split_records
from diffrun.run_folder.status import FAILED, FINISHED, INTERRUPTED


def _strip(key: str) -> str:
    for prefix in ("train/", "eval/", "metrics/"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def collect_wandb(path: str, group: Optional[str], timeout: int = 30) -> Sweep:
    """Runs of W&B project `entity/project` in `group` or its per-strategy groups `group/<strategy>` (history keys
    step/fid/loss..., config weighting.name, seed).

    Needs network access and an API key (`wandb login` or WANDB_API_KEY); without them this raises a
    ReportError that says so. Per-log-SNR statistics are not read from W&B (use the sweep directory).
    """
    if path.count("/") != 1 or not all(path.split("/")):
        raise ReportError(f"--wandb {path!r}: expected ENTITY/PROJECT, e.g. --wandb my-team/diffrun")
    if not group:
        raise ReportError("--wandb needs --group G (the sweep's W&B group; by default the sweep name)")
    hint = ("W&B runs need network access and an API key (`wandb login` or WANDB_API_KEY). The default, offline "
            "source is the sweep directory: diffrun-report outputs/sweeps/<sweep_name>")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise ReportError(f"cannot read W&B runs while WANDB_MODE={os.environ['WANDB_MODE']}. {hint}")
    try:
        import wandb

        api = wandb.Api(timeout=timeout)
        # a sweep's runs are grouped per strategy, `<sweep>/<strategy>` (docs/wandb.md); evaluation jobs are not runs
        remote = [r for r in api.runs(path, filters={"group": {"$regex": f"^{re.escape(group)}(/[^/]+)?$"}})
                  if getattr(r, "job_type", "train") != "eval"]
    except Exception as exc:  # auth, DNS, HTTP errors: all the same to the user
        raise ReportError(f"cannot read W&B runs of {path} group={group}: {type(exc).__name__}: "
                          f"{first_line(str(exc)).rstrip('.') or 'no detail'}. {hint}") from None
    if not remote:
        raise ReportError(f"W&B project {path} has no runs in group {group!r}")
    runs = []
    for num, wr in enumerate(remote):
        config = {k: v for k, v in dict(wr.config).items() if not k.startswith("_")}
        rows = []
        for row in wr.scan_history():
            rec = {_strip(k): v for k, v in row.items() if v is not None}
            rec.setdefault("step", rec.get("_step"))
            if rec.get("step") is not None:
                rows.append(rec)
        train, evals = split_records(rows)
        summary = dict(wr.summary) if wr.summary is not None else {}
        state = {"crashed": FAILED, "killed": INTERRUPTED}.get(wr.state, wr.state)
        strategy = dotted(config, "weighting.name") or "?"
        seed = dotted(config, "seed")
        status = {"state": state, "step": summary.get("step", train[-1]["step"] if train else None),
                  "total_steps": dotted(config, "train.steps")}
        runs.append(RunRecord(
            name=wr.name, strategy=str(strategy), seed=None if seed is None else int(seed), state=state,
            error="" if state == FINISHED else f"W&B run state '{wr.state}'",
            job_num=num, step=status["step"], total_steps=status["total_steps"],
            config=config, status=status, train=train, evals=evals, stats=None,
        ))
    return make_sweep(runs, name=group, source=f"wandb:{path} group={group}",
                      notes=["read from W&B; per-log-SNR statistics are only in the sweep directory"])
