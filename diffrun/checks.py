"""How a value is checked and how a refusal reads: the allowed numbers of a key (`Interval`) and the checks
every owner of a key uses, so that each message names the key, the value and what is allowed."""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffrun.errors import ConfigError

SAFE_NAME = "one folder name: not empty, no slash or backslash, not '.' or '..'"


def show(value: Any) -> str:
    """A config value as a user would type it after `key=` (strings quoted, so '' is visible)."""
    return repr(value) if isinstance(value, str) else str(value)


def resolved(node: Any) -> Any:
    """A config node as plain Python values, interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


@dataclass(frozen=True)
class Interval:
    """The numbers a key allows: finite, and between `low` and `high` (an end excluded where `open`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, x: float) -> bool:
        above = self.low is None or x > self.low or (x == self.low and not self.low_open)
        below = self.high is None or x < self.high or (x == self.high and not self.high_open)
        return math.isfinite(x) and above and below

    def describe(self, integer: bool = False) -> str:
        noun = "an integer" if integer else "a finite number"
        if self.low is not None and self.high is not None:
            text = f"{noun} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = noun
        return text + (f" ({self.note})" if self.note else "")


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
FRACTION = Interval(0, 1)
FINITE = Interval()
SEED = Interval(0, 2**63 - 1, note="each run's seed is part of its identity: there is no random seed")


def check_number(key: str, value: Any, allowed: Interval, integer: bool = False) -> None:
    """`value` is a number (an int where `integer`) inside `allowed`; None passes (the schema says where it may)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{key}={show(value)} is not {'an integer' if integer else 'a number'}: "
                          f"allowed {allowed.describe(integer)}")
    if value not in allowed:
        problem = "is not a number" if math.isnan(value) else "is out of range"
        raise ConfigError(f"{key}={show(value)} {problem}: allowed {allowed.describe(integer)}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={show(value)}: allowed {', '.join(map(str, allowed))}")


def check_folder_name(key: str, value: Any) -> None:
    """A value that becomes a folder name (outputs/runs/<name>) must stay one path component inside the output root."""
    if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ConfigError(f"{key}={show(value)}: must be {SAFE_NAME}, since it names a folder of the run's output")


def nan_keys(value: Any, where: str) -> Iterator[str]:
    """The keys under `where` whose value is NaN."""
    if isinstance(value, float) and math.isnan(value):
        yield where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from nan_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nan_keys(item, f"{where}[{i}]")


def check_writable_dir(path: str | Path, key: str) -> None:
    """`path` can be made: its nearest existing ancestor is a folder in which a folder can be created (probed
    with a temporary folder, removed at once: file permissions alone do not tell, e.g. for root or /proc)."""
    target = Path(path).expanduser().absolute()
    ancestor = next(p for p in (target, *target.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={show(str(path))}: {ancestor} is a file; allowed a writable folder")
    try:
        Path(tempfile.mkdtemp(prefix=".diffrun-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise ConfigError(f"{key}={show(str(path))}: cannot create folders in {ancestor} ({exc.strerror or exc}); "
                          f"allowed a writable folder") from None
