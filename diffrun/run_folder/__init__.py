"""The files of a run folder and of a sweep folder: their names, the job-folder name, and (one module per
format, reader beside writer) `status`, `metrics` and `index`.

    <sweep>/index.jsonl                           index.py: one line per job start (append-only)
    <sweep>/multirun.yaml                         Hydra's plan of the sweep
    <sweep>/<num>_<weighting>_seed<seed>/         a job's run folder, named as JOB_FOLDER reads it
    <run>/status.json                             status.py: how far the run got
    <run>/metrics.jsonl                           metrics.py: training and evaluation records
    <run>/config.yaml                             the resolved config
    <run>/.lock                                   who trains it (diffrun.training.run_directory)

This package sits low: it imports only the standard library, numpy and diffrun.files, so every layer can use it.
"""
from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
RUN_FILES = (STATUS, METRICS, CONFIG)           # any of them: a run was started in the folder

INDEX = "index.jsonl"
MULTIRUN = "multirun.yaml"
SUBMITIT = ".submitit"

JOB_FOLDER = re.compile(r"^(?P<num>\d+)_(?P<strategy>.+)_seed(?P<seed>-?\d+)$")   # hydra.sweep.subdir's name


def holds_run(path: Path) -> bool:
    """A folder a run was started in (it has a status, metrics or config file)."""
    return any((Path(path) / name).exists() for name in RUN_FILES)
