"""The package's shape, checked: strategies know nothing of launching, callbacks are typed, files are written once."""
import ast
from pathlib import Path

import diffrun
from diffrun.training.callbacks import Callback, build_callbacks

from conftest import compose_config

PACKAGE = Path(diffrun.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_strategy_imports_the_launching_layer():
    offenders = {path.name: sorted(m for m in imported_modules(path) if m.startswith("diffrun.launching"))
                 for path in (PACKAGE / "strategies").glob("*.py")}
    assert not any(offenders.values()), offenders


def test_every_default_callback_is_typed(make_cfg):
    callbacks = build_callbacks(make_cfg([]))
    assert callbacks and all(isinstance(cb, Callback) for cb in callbacks)
    assert {type(cb).__name__ for cb in callbacks} >= {"MetricsFile", "StatsWriter", "WandbLogger", "Progress",
                                                       "SampleGrids", "FIDCallback"}


def test_no_duck_typed_callback_dispatch():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "hasattr(cb" not in text and "hasattr(callback" not in text, path


def test_one_atomic_write_helper():
    """Temp file + fsync + rename lives in diffrun/files.py only; other modules call it (os.replace elsewhere only
    moves an existing file aside)."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "files.py" and path.parent == PACKAGE:
            continue
        text = path.read_text()
        assert "fsync" not in text and "mkstemp" not in text and '".tmp"' not in text, path


def test_one_ownership_lock():
    """The non-blocking exclusive lock a process owns a run (or its W&B id) with is `files.try_lock`, nowhere else."""
    holders = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "LOCK_NB" in path.read_text())
    assert holders == ["files.py"], holders


def test_no_callback_reads_the_trainer():
    """Callbacks get a RunView and their own node's arguments: none reads `trainer.` or duck-types `job_type`."""
    modules = {type(cb).__module__ for cb in build_callbacks(compose_config([]))} | {Callback.__module__}
    for module in modules:
        text = (PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text()
        assert "trainer." not in text and '"job_type",' not in text, module
