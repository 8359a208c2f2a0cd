"""What every crosscheck script shares: the official code imported from a checkout given at run time (never copied
into this repository), the commit it was read at, and the max |Δ| table.

    python scripts/crosscheck/<name>.py --reference /path/to/checkout
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch


def parser(description: str, repository: str) -> argparse.ArgumentParser:
    """The common command line: `--reference` (a checkout of `repository`) and `--seed`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reference", required=True, type=Path, help=f"a checkout of {repository} (outside this repository)")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_reference(checkout: Path, module: str, bare_packages: tuple[str, ...] = ()):
    """Import `module` from the checkout (and only from there): a clear error if it is not a checkout holding it.
    `bare_packages` are registered without running their `__init__.py` (where it imports the whole repository
    and its dependencies, e.g. SpeeD's `speed/__init__.py`), so only the modules named are loaded."""
    checkout = checkout.resolve()
    for package in bare_packages:
        if package not in sys.modules:
            bare = types.ModuleType(package)
            bare.__path__ = [str(checkout / package.replace(".", "/"))]
            sys.modules[package] = bare
    top = module.split(".")[0]
    if not (checkout / top).is_dir() and not (checkout / f"{top}.py").is_file():
        raise SystemExit(f"--reference {checkout}: no {top}/ or {top}.py in it; give a checkout of the official "
                         f"repository")
    sys.path.insert(0, str(checkout))
    loaded = importlib.import_module(module)
    where = Path(loaded.__file__).resolve()
    if checkout not in where.parents:
        raise SystemExit(f"{module} was imported from {where}, not from --reference {checkout}: an installed copy "
                         f"shadows the checkout; uninstall it or run from a clean environment")
    return loaded


def reference_commit(checkout: Path) -> str:
    """The checkout's commit (`git rev-parse HEAD`), or 'unknown (not a git checkout)'."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip()


@dataclass
class Row:
    case: str
    max_abs: float     # max |ours − reference|
    max_ref: float     # max |reference|
    tolerance: float   # on the relative difference max_abs / max_ref

    @property
    def relative(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref > 0 else self.max_abs

    @property
    def ok(self) -> bool:
        return self.relative <= self.tolerance


def compare(case: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> Row:
    """One row: max |Δ| of two same-shaped tensors (float64), relative to max |reference|."""
    ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
    if ours.shape != reference.shape:
        raise ValueError(f"{case}: shapes differ, ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    return Row(case, float((ours - reference).abs().max()), float(reference.abs().max()), tolerance)


def report(title: str, commit: str, command: str, rows: list[Row]) -> int:
    """Print the table (markdown) and return the exit status: 0 when every row is within its tolerance."""
    print(f"## {title}\n\nreference commit: {commit}\ncommand: {command}\n")
    print("| case | max abs Δ | max abs reference | relative | tolerance | ok |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.case} | {r.max_abs:.3g} | {r.max_ref:.3g} | {r.relative:.3g} | {r.tolerance:g} | "
              f"{'yes' if r.ok else 'NO'} |")
    failed = [r.case for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} within tolerance" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
