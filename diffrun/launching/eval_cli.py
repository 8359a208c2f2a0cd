"""`diffrun-eval ckpt=PATH [key=value ...]`: FID/KID of a checkpoint's EMA model, as a Hydra app (conf/eval.yaml).

The checkpoint's own config is the base; `key=value` overrides change it with the groups, values and checks
of `diffrun` (checkpoint_eval.py). The record, with its protocol, is appended to the run's metrics.jsonl and
sent to W&B (conf/callbacks/eval.yaml); `diffrun-report` reads it. docs/evaluation.md has the paper protocols.

    diffrun-eval ckpt=outputs/runs/<run>/checkpoints/ckpt_00200000.pt eval.num_samples=50000 eval.repeats=3
    diffrun-eval ckpt=... eval.reference_stats=~/fid-refs/cifar10-32x32.npz       # EDM's published statistics
    diffrun-eval ckpt=... dataset.loader.root=/scratch/cifar device=cuda           # the run's data elsewhere
    diffrun-eval -m ckpt=<run>/checkpoints/ckpt_00000250.pt,<run>/checkpoints/ckpt_00000500.pt \\
                 hydra/launcher=slurm_gpu                                          # any Hydra launcher

Keys inside the checkpoint's groups (`dataset.loader.root=...`) need no `+`: the app adds the one Hydra would
ask for, since the groups here are the checkpoint's, not Hydra's defaults.
"""
from __future__ import annotations

import logging
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffrun.checks import check_writable_dir
from diffrun.cli import CONF_DIR, JobFailed
from diffrun.config import GROUPS, RunConfig
from diffrun.errors import DiffrunError
from diffrun.evaluation.callback import summary_line
from diffrun.launching.eval_checkpoint import (checkpoints_in, evaluate_checkpoint, evaluation_config,
                                               run_dir_of_checkpoint)
from diffrun.launching.eval_folder import score_folder
from diffrun.launching.preflight import BASIC_LAUNCHER, override_character_errors, refuse, sweep_jobs

log = logging.getLogger("diffrun.eval")


def register_eval_configs() -> None:
    """`eval_app_schema`: every key of a run with its default, untyped (the checkpoint's config is typed by the
    schema when the overrides are applied, so `eval.num_samples=abc` is refused in one line), and `ckpt`."""
    keys = OmegaConf.to_container(OmegaConf.structured(RunConfig), enum_to_str=True)
    ConfigStore.instance().store(name="eval_app_schema", node={**keys, "ckpt": "???"})
    OmegaConf.register_new_resolver("diffrun.eval_dir", lambda ckpt: str(run_dir_of_checkpoint(Path(ckpt)) / "eval"),
                                    replace=True)


register_eval_configs()


def with_group_keys_added(args: list[str]) -> list[str]:
    """`dataset.loader.root=X` → `+dataset.loader.root=X` where the command line chooses no `dataset`: the
    app's groups are empty (the checkpoint has them), and Hydra adds keys to an empty group only with `+`."""
    chosen = {m.group(1) for a in args if (m := re.match(rf"^\+*({'|'.join(GROUPS)})=", a))}
    pattern = re.compile(rf"^({'|'.join(GROUPS)})\.[^=]+=")
    return [f"+{a}" if (m := pattern.match(a)) and m.group(1) not in chosen else a for a in args]


class ValidateBeforeEvaluation(Callback):
    """conf/eval.yaml `hydra.callbacks.validate`: the checkpoint read and its config checked before Hydra
    writes anything; a multirun checks every job the basic sweeper will start, each in one line."""
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            evaluation_config(config, list(config.hydra.overrides.task))
            check_writable_dir(config.hydra.run.dir, "hydra.run.dir")
        except DiffrunError as exc:
            refuse([str(exc)])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        except DiffrunError as exc:
            refuse([str(exc)])
        local = config.hydra.launcher._target_ == BASIC_LAUNCHER   # else devices and paths are the job machine's
        jobs = sweep_jobs(config)
        values = defaultdict(set)   # key → its overrides among the jobs; a job is named by those that vary
        for overrides, _ in jobs:
            for override in overrides:
                values[override.split("=", 1)[0]].add(override)
        swept = {override for overrides in values.values() if len(overrides) > 1 for override in overrides}
        failures = []
        for num, (overrides, job) in enumerate(jobs):
            try:
                evaluation_config(job, list(job.hydra.overrides.task), environment=local)
            except DiffrunError as exc:
                name = " ".join(o for o in overrides if o in swept)
                failures.append(f"job {num}{f' ({name})' if name else ''}: {exc}")
        if failures:
            refuse(failures)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def evaluate_job(cfg: DictConfig) -> float | None:
    """One checkpoint's evaluation (a Hydra job): the record goes to the callbacks; FID is returned."""
    hydra_cfg = HydraConfig.get()
    try:
        record = evaluate_checkpoint(cfg, list(hydra_cfg.overrides.task))
    except DiffrunError as exc:
        log.error("%s", exc)
        if hydra_cfg.mode.name == "RUN":
            sys.exit(1)
        raise JobFailed(str(exc)) from exc
    log.info("%s at step %d: %s (%s; %.0fs)", record["checkpoint"], record["step"], summary_line(record),
             record["fid_protocol"], record["eval_seconds"])
    return record["fid"]


USAGE = """usage: diffrun-eval ckpt=CHECKPOINT|RUN_DIR|SWEEP_DIR [key=value ...]

FID/KID of a checkpoint's EMA model; the checkpoint's own config is the base, key=value changes it.
  ckpt=<run>/checkpoints/ckpt_X.pt   that checkpoint
  ckpt=<run>                         the run's latest checkpoint
  ckpt=<sweep>                       the latest checkpoint of every run in the sweep, as a multirun (-m)
  images=FOLDER dataset=NAME         a folder of images against the dataset's reference (EDM's fid.py calc)

  eval.num_samples=50000 eval.repeats=3 eval.sampler=heun eval.steps=18
  eval.reference_stats=PATH.npz      published statistics instead of the training set
  dataset.loader.root=DIR device=cuda  the run's data elsewhere, another device
  -m ckpt=A,B hydra/launcher=slurm_gpu any Hydra launcher

The record and its protocol go to the run's metrics.jsonl, its W&B run and diffrun-report (docs/evaluation.md).
Every key: diffrun --cfg job (the keys of a run); Hydra's own help: diffrun-eval --hydra-help."""


def score_images_command(folder: str, overrides: list[str]) -> None:
    """`images=FOLDER`: print the folder's FID (and KID) against the dataset `overrides` choose."""
    from hydra.errors import HydraException


    try:
        result = score_folder(folder, overrides)
    except (DiffrunError, HydraException) as exc:
        refuse([" ".join(str(exc).split())])
    kid = f", KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f}" if "kid_mean" in result else ""
    print(f"FID {result['fid']:.4f}{kid} ({result['num_samples']} images of {folder} vs {result['reference']})")


def checkpoint_arguments(args: list[str]) -> list[str]:
    """`ckpt=<run or sweep folder>` → the checkpoint(s) it holds (a sweep's several: a multirun, `-m` added)."""
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "ckpt" or "," in value or not Path(value).expanduser().is_dir():
            out.append(arg)
            continue
        found = checkpoints_in(value)
        out.append(f"ckpt={','.join(str(p) for p in found)}")
        if len(found) > 1 and not {"-m", "--multirun"} & set(args):
            out.insert(0, "-m")
    return out


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(USAGE)
        return
    errors = override_character_errors(sys.argv[1:])
    if errors:
        refuse(errors)
    folders = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("images=")]
    if folders:
        score_images_command(folders[0], [a for a in sys.argv[1:] if not a.startswith("images=")])
        return
    try:
        args = checkpoint_arguments(sys.argv[1:])
    except DiffrunError as exc:
        refuse([str(exc)])
    sys.argv = [sys.argv[0], *with_group_keys_added(args)]
    evaluate_job()


if __name__ == "__main__":
    main()
