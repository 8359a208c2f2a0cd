#!/usr/bin/env python3
"""A run stopped by SIGTERM and resumed, compared step by step with the same run uninterrupted (scripts/gpu_check.sh).

    python3 scripts/resume_check.py --workdir /tmp/rc --json out.json -- device=cuda precision=bf16 train.steps=200

Both runs are `python3 -m diffrun.cli` processes with the given overrides plus `train.log_every=1` and
`deterministic=true`. The second gets SIGTERM once its metrics file reaches half the steps (it checkpoints and
stops), then the same command again resumes it to the end. Printed and written as JSON: the step the signal
stopped it at, the steps compared, the largest difference of the logged loss and grad norm, and whether the final
weights (model and EMA) are bit-identical. Exit status 0 when the losses agree and the weights are identical.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from diffrun.run_folder.metrics import read_metrics               # noqa: E402
from diffrun.run_folder.status import INTERRUPTED, read_status     # noqa: E402
from diffrun.training.checkpoint import CheckpointManager          # noqa: E402


def _command(name: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "diffrun.cli", f"name={name}", "train.log_every=1", "deterministic=true",
            *overrides]


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="runs go to WORKDIR/outputs/runs/{straight,resumed}")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for each run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    steps = next(int(o.split("=", 1)[1]) for o in args.overrides if o.startswith("train.steps="))
    runs = work / "outputs" / "runs"

    subprocess.run(_command("straight", args.overrides), cwd=work, env=env, check=True, timeout=args.timeout)

    process = subprocess.Popen(_command("resumed", args.overrides), cwd=work, env=env)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and process.poll() is None:
        logged = len(_losses(runs / "resumed"))
        if logged >= steps // 2:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    process.wait(timeout=max(1.0, deadline - time.monotonic()))
    status = read_status(runs / "resumed") or {}
    stopped_at = status.get("checkpoint_step") if status.get("state") == INTERRUPTED else None
    subprocess.run(_command("resumed", args.overrides), cwd=work, env=env, check=True, timeout=args.timeout)

    straight, resumed = _losses(runs / "straight"), _losses(runs / "resumed")
    common = sorted(set(straight) & set(resumed))
    diff = {key: max((abs(straight[s][key] - resumed[s][key]) for s in common
                      if isinstance(straight[s].get(key), (int, float)) and isinstance(resumed[s].get(key), (int, float))),
                     default=math.nan) for key in ("loss", "grad_norm")}
    finals = [CheckpointManager(runs / name / "checkpoints").load_latest()[0] for name in ("straight", "resumed")]
    weights = [(f["model"], f["ema"]["model"]) for f in finals]
    identical = all(torch.equal(a[k], b[k]) for a, b in zip(*weights) for k in a)
    result = {"steps": steps, "stopped_at": stopped_at, "steps_compared": len(common),
              "max_loss_diff": diff["loss"], "max_grad_norm_diff": diff["grad_norm"],
              "weights_identical": identical, "final_step": finals[1]["step"]}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(0 if out["weights_identical"] and out["max_loss_diff"] == 0 and out["stopped_at"] else 1)
