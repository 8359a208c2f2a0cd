"""Per-step losses of every weighting preset over a few tiny steps: a guard for refactors that must not
change numbers.

    python scripts/loss_trace.py --out before.json             # on the commit before a change
    python scripts/loss_trace.py --out after.json              # on the commit after it
    python scripts/loss_trace.py --compare before.json after.json

Each preset trains `model=unet_tiny` for `--steps` steps through the CLI (`python -m diffrun.cli`, one
process each), so the trace reads only what a user sees: `metrics.jsonl` with `train.log_every=1`. The
comparison is exact (float equality, per step, per key); run both traces on the same machine and torch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "diffrun" / "conf" / "weighting"
KEYS = ("loss", "weighted_loss", "grad_norm", "lr", "ema_decay")
TINY = ["model=unet_tiny", "train.batch_size=8", "train.log_every=1", "train.progress=false",
        "optimizer.warmup_steps=2", "checkpoint.every_steps=0", "sample.num_images=0", "eval.enabled=false",
        "device=cpu", "seed=0"]


def trace(weighting: str, steps: int, workdir: Path) -> list[dict]:
    run = workdir / weighting
    cmd = [sys.executable, "-m", "diffrun.cli", f"weighting={weighting}", f"train.steps={steps}", *TINY,
           f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"weighting={weighting} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{"step": r["step"], **{k: r.get(k) for k in KEYS}} for r in map(json.loads, lines) if "loss" in r]


def compare(before: dict, after: dict) -> int:
    differences = 0
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            differences += 1
            print(f"{name}: differs")
    same = len(set(before) & set(after)) - differences
    print(f"{same} preset(s) identical, {differences} differ")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--weighting", nargs="*", default=sorted(p.stem for p in CONF.glob("*.yaml")))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    if args.out is None:
        parser.error("give --out FILE (or --compare BEFORE AFTER)")
    with tempfile.TemporaryDirectory() as workdir:
        traces = {}
        for name in args.weighting:
            traces[name] = trace(name, args.steps, Path(workdir))
            print(f"{name:32s} step {args.steps} loss {traces[name][-1]['loss']!r}", flush=True)
    args.out.write_text(json.dumps(traces, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
