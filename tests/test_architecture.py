"""The package's shape, checked: the declared layers (pyproject.toml's import-linter contracts, drawn in
docs/architecture.md), no import cycle, function-level imports only to defer a heavy dependency, typed callbacks
that read no Trainer, one atomic-write helper, one lock."""
import ast
import os
import sys
from pathlib import Path

import grimp
import pytest

import diffrun
from diffrun.training.callbacks import Callback, build_callbacks

from conftest import compose_config

PACKAGE = Path(diffrun.__file__).parent


@pytest.fixture(scope="module")
def import_graph():
    sys.path.insert(0, str(PACKAGE.parent))     # grimp finds the package by its folder, not the editable install
    try:
        yield grimp.build_graph("diffrun", exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(PACKAGE.parent))


def test_the_declared_layers_hold(capsys):
    """pyproject.toml [tool.importlinter]: the layers from the entry points down to errors.py, and the parts
    that must not know each other (the data and the networks, the run-folder formats and torch, ...)."""
    from importlinter.cli import lint_imports

    sys.path.insert(0, str(PACKAGE.parent))
    cwd = os.getcwd()
    try:
        os.chdir(PACKAGE.parent)
        code = lint_imports(config_filename=str(PACKAGE.parent / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
        sys.path.remove(str(PACKAGE.parent))
    assert code == 0, capsys.readouterr().out[-4000:]


def test_no_import_cycle(import_graph):
    """Counting the imports inside functions too: a module never reaches itself again."""
    cycles = []
    for module in sorted(import_graph.modules):
        for imported in import_graph.find_modules_directly_imported_by(module):
            if imported != module and imported.startswith("diffrun") and import_graph.chain_exists(imported, module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(cycles[:20])


def test_function_level_imports_defer_a_heavy_dependency():
    """An import of diffrun inside a function is a deferral for speed (torch, matplotlib: `diffrun --help` must
    not load them) and says so with `# deferred` beside it; any other goes to the top of its module."""
    unmarked = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("diffrun") and \
                        "# deferred" not in " ".join(lines[sub.lineno - 1:sub.end_lineno]):
                    unmarked.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}")
    assert not unmarked, unmarked


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


def test_one_lock_implementation():
    """`flock` lives in diffrun/files.py: `try_lock` (a process owns a run or its W&B id) and `append_locked`
    (index.jsonl's concurrent appends); every other module calls them."""
    holders = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "fcntl" in path.read_text())
    assert holders == ["files.py"], holders


def test_no_callback_reads_the_trainer():
    """Callbacks get a RunView and their own node's arguments: none reads `trainer.` or duck-types `job_type`."""
    modules = {type(cb).__module__ for cb in build_callbacks(compose_config([]))} | {Callback.__module__}
    for module in modules:
        text = (PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text()
        assert "trainer." not in text and '"job_type",' not in text, module
