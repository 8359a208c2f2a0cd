"""scripts/crosscheck/: the shared helper's own logic, on a stand-in reference package written by the test (the
official checkouts are not needed here; docs/samplers.md and docs/networks.md cite the runs against them)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CROSSCHECK = Path(__file__).resolve().parents[1] / "scripts" / "crosscheck"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"crosscheck_{name}", CROSSCHECK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # dataclasses look their module up while the file runs
    sys.path.insert(0, str(CROSSCHECK))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(CROSSCHECK))
    return module


@pytest.fixture
def common():
    return load_script("common")


def stand_in_checkout(root: Path, package: str, body: str, git: bool = True) -> Path:
    """A tiny 'official repository': `package/` with one module, committed to a fresh git repository."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "ops.py").write_text(body)
    if git:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(root)}
        for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "stand-in"]):
            subprocess.run(["git", "-C", str(root), *cmd], check=True, env=env, capture_output=True)
    return root


def test_reference_is_imported_from_the_checkout_and_its_commit_read(common, tmp_path):
    checkout = stand_in_checkout(tmp_path / "ref", "standin_reference_pkg", "def double(x):\n    return 2 * x\n")
    ops = common.load_reference(checkout, "standin_reference_pkg.ops")
    assert ops.double(torch.tensor(3.0)) == 6.0 and Path(ops.__file__).is_relative_to(checkout.resolve())
    commit = common.reference_commit(checkout)
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert len(commit) == 40 and commit == head.strip()
    sys.modules.pop("standin_reference_pkg.ops"), sys.modules.pop("standin_reference_pkg")


def test_a_checkout_without_the_package_is_refused(common, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no standin_missing/ or standin_missing.py in it"):
        common.load_reference(tmp_path / "empty", "standin_missing.ops")
    assert common.reference_commit(tmp_path / "empty") == "unknown (not a git checkout)"


def test_compare_and_report_fail_on_a_difference_beyond_the_tolerance(common, capsys):
    ref = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    same = common.compare("same", ref.clone(), ref, 1e-6)
    off = common.compare("off", ref + torch.tensor([0.0, 0.004, 0.0], dtype=torch.float64), ref, 1e-4)
    assert same.max_abs == 0 and same.ok
    assert off.max_abs == pytest.approx(0.004) and off.max_ref == 4.0 and off.relative == pytest.approx(1e-3)
    assert not off.ok
    assert common.report("title", "abc123", "python x.py", [same]) == 0
    assert common.report("title", "abc123", "python x.py", [same, off]) == 1
    out = capsys.readouterr().out
    assert "reference commit: abc123" in out and "| off | 0.004 | 4 | 0.001 | 0.0001 | NO |" in out
    assert "failed: off" in out
    with pytest.raises(ValueError, match="shapes differ"):
        common.compare("shape", torch.zeros(2), torch.zeros(3), 1.0)


def test_learned_variance_script_refuses_a_checkout_without_improved_diffusion(tmp_path):
    """The script's command line: a folder that is not an improved-diffusion checkout stops with one line."""
    (tmp_path / "not_a_checkout").mkdir()
    script = load_script("learned_variance")
    with pytest.raises(SystemExit, match=r"no improved_diffusion/ or improved_diffusion.py in it"):
        script.main(["--reference", str(tmp_path / "not_a_checkout")])


def test_bare_packages_skip_an_init_that_imports_the_world(common, tmp_path):
    """SpeeD's speed/__init__.py imports its datasets and networks (transformers, ...): registered bare, only the
    module asked for is loaded."""
    checkout = stand_in_checkout(tmp_path / "ref", "standin_heavy_pkg", "VALUE = 7\n", git=False)
    (checkout / "standin_heavy_pkg" / "__init__.py").write_text("raise ImportError('needs the whole world')\n")
    with pytest.raises(ImportError, match="whole world"):
        common.load_reference(checkout, "standin_heavy_pkg.ops")
    sys.modules.pop("standin_heavy_pkg", None)
    ops = common.load_reference(checkout, "standin_heavy_pkg.ops", bare_packages=("standin_heavy_pkg",))
    assert ops.VALUE == 7
    sys.modules.pop("standin_heavy_pkg.ops"), sys.modules.pop("standin_heavy_pkg")
