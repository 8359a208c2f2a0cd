"""`diffrun-report`: one Markdown report (tables, tests, figures) for a finished or partial sweep.

    diffrun-report outputs/sweeps/min_snr_cifar10                  # → outputs/sweeps/min_snr_cifar10/report/
    diffrun-report outputs/sweeps/smoke --baseline uniform --target-fid 50 --out /tmp/smoke_report
    diffrun-report outputs/sweeps/calibration --calibrate          # + false-positive rate from relabellings
    diffrun-report outputs/sweeps/smoke --wandb-summary my-team/diffrun  # + the verdicts as a W&B run's summary
    diffrun-report --wandb my-team/diffrun --group min_snr_cifar10  # runs read from W&B (needs network + login)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from diffrun.errors import DiffrunError
from diffrun.reporting import stats
from diffrun.reporting.collect import ReportError, collect_sweep
from diffrun.reporting.figures import make_figures
from diffrun.reporting.markdown import write_report
from diffrun.reporting.stats import MAX_SEEDS, analyse
from diffrun.reporting.summary import wandb_summary
from diffrun.reporting.wandb_runs import collect_wandb

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
    p.add_argument("--max-seeds", type=int, default=MAX_SEEDS, metavar="N",
                   help=f"a difference that needs more than N seeds per arm is 'not shown', not 'underpowered' "
                        f"(default {MAX_SEEDS})")
    p.add_argument("--calibrate", action="store_true",
                   help="add the false-positive rate of the test from relabellings of the per-seed values (A/A sweeps)")
    p.add_argument("--wandb-summary", metavar="ENTITY/PROJECT",
                   help="also write the comparisons as summary scalars of a W&B run `<sweep>-report` (job_type "
                        "report, group <sweep>); WANDB_MODE=offline keeps it on disk under the report folder")
    return p


def report(sweep_dir: Optional[Path] = None, out: Optional[Path] = None, baseline: Optional[str] = None,
           target_fid: Optional[float] = None, wandb: Optional[str] = None, group: Optional[str] = None,
           figures: bool = True, max_seeds: int = MAX_SEEDS, calibrate: bool = False,
           wandb_summary_to: Optional[str] = None) -> Path:
    """Read the sweep, analyse, draw, write `report.md`; returns its path."""
    if max_seeds < 2:
        raise ReportError(f"--max-seeds {max_seeds}: a t-test needs at least 2 seeds per arm; give an integer ≥ 2")
    if wandb_summary_to is not None and (wandb_summary_to.count("/") != 1 or not all(wandb_summary_to.split("/"))):
        raise ReportError(f"--wandb-summary {wandb_summary_to!r}: expected ENTITY/PROJECT, e.g. my-team/diffrun")
    if wandb:
        sweep = collect_wandb(wandb, group)
        out = out or (Path(sweep_dir) / "report" if sweep_dir else Path("outputs/reports") / str(group))
    elif sweep_dir is None:
        raise ReportError("give a sweep directory (e.g. outputs/sweeps/smoke) or --wandb ENTITY/PROJECT --group G")
    else:
        sweep = collect_sweep(sweep_dir)
        out = out or Path(sweep_dir) / "report"
    analysis = analyse(sweep, baseline, target_fid, max_seeds)
    if calibrate:
        stats.calibrate(analysis)
    plots, missing = make_figures(analysis, Path(out)) if figures else ([], ["all figures: --no-figures"])
    path = write_report(analysis, plots, missing, Path(out))
    if wandb_summary_to:
        log_wandb_summary(analysis, wandb_summary_to, Path(out))
    return path


def log_wandb_summary(analysis, entity_project: str, out: Path) -> None:
    """One W&B run per report, `<sweep>-report` in the sweep's group, whose summary holds `wandb_summary(analysis)`.
    W&B's own settings apply (WANDB_MODE, WANDB_API_KEY); its files go under the report folder."""
    import wandb

    entity, project = entity_project.split("/")
    name = analysis.sweep.name
    try:
        run = wandb.init(entity=entity, project=project, group=name, job_type="report", name=f"{name}-report",
                         dir=str(out), config={"sweep": name, "source": analysis.sweep.source},
                         settings=wandb.Settings(init_timeout=30, x_disable_viewer=True))
    except Exception as exc:  # auth, network: the report on disk is written; say what did not happen
        raise ReportError(f"report written, but the W&B summary run could not start: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'} (WANDB_MODE=offline keeps it "
                          f"on disk; upload later with wandb sync)") from None
    run.summary.update(wandb_summary(analysis))
    run.finish()


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    if args.group and not args.wandb:
        parser().error("--group is only used with --wandb ENTITY/PROJECT")
    try:
        path = report(args.sweep_dir, args.out, args.baseline, args.target_fid, args.wandb, args.group,
                      figures=not args.no_figures, max_seeds=args.max_seeds, calibrate=args.calibrate,
                      wandb_summary_to=args.wandb_summary)
    except DiffrunError as exc:
        print(f"diffrun-report: error: {exc}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
