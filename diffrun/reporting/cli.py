"""`diffrun-report`: one Markdown report (tables, tests, figures) for a finished or partial sweep.

    diffrun-report outputs/sweeps/min_snr_cifar10                  # → outputs/sweeps/min_snr_cifar10/report/
    diffrun-report outputs/sweeps/smoke --baseline uniform --target-fid 50 --out /tmp/smoke_report
    diffrun-report --wandb my-team/diffrun --group min_snr_cifar10  # runs read from W&B (needs network + login)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from diffrun.errors import DiffrunError
from diffrun.reporting.collect import ReportError, collect_sweep, collect_wandb
from diffrun.reporting.figures import make_figures
from diffrun.reporting.markdown import write_report
from diffrun.reporting.stats import analyse

log = logging.getLogger("diffrun.report")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrun-report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("sweep_dir", nargs="?", type=Path, help="sweep directory (one <num>_<weighting>_seed<seed>/ per job)")
    p.add_argument("--out", type=Path, help="report folder (default: SWEEP_DIR/report, or outputs/reports/<group> for W&B)")
    p.add_argument("--baseline", help="strategy the others are compared against (default: the runs' report.baseline)")
    p.add_argument("--target-fid", type=float, help="FID for the steps-to-target column (default: report.target_fid)")
    p.add_argument("--no-figures", action="store_true", help="tables and tests only (fast; no PNGs)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead of SWEEP_DIR")
    p.add_argument("--group", help="W&B group of the sweep's runs (with --wandb)")
    return p


def report(sweep_dir: Optional[Path] = None, out: Optional[Path] = None, baseline: Optional[str] = None,
           target_fid: Optional[float] = None, wandb: Optional[str] = None, group: Optional[str] = None, figures: bool = True) -> Path:
    """Read the sweep, analyse, draw, write `report.md`; returns its path."""
    if wandb:
        sweep = collect_wandb(wandb, group)
        out = out or (Path(sweep_dir) / "report" if sweep_dir else Path("outputs/reports") / str(group))
    elif sweep_dir is None:
        raise ReportError("give a sweep directory (e.g. outputs/sweeps/smoke) or --wandb ENTITY/PROJECT --group G")
    else:
        sweep = collect_sweep(sweep_dir)
        out = out or Path(sweep_dir) / "report"
    analysis = analyse(sweep, baseline, target_fid)
    plots, missing = make_figures(analysis, Path(out)) if figures else ([], ["all figures: --no-figures"])
    return write_report(analysis, plots, missing, Path(out))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    if args.group and not args.wandb:
        parser().error("--group is only used with --wandb ENTITY/PROJECT")
    try:
        path = report(args.sweep_dir, args.out, args.baseline, args.target_fid, args.wandb, args.group,
                      figures=not args.no_figures)
    except DiffrunError as exc:
        print(f"diffrun-report: error: {exc}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
