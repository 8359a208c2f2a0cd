"""Which `_target_`s a config read back from a file may name.

The command line and the user's own config files (conf/, `-cd DIR`, $DIFFRUN_CONF) are trusted, as in Hydra:
their `_target_`s are built as written. A config read back from a file that anyone may have written — the
config embedded in a checkpoint or a `.safetensors` export (a run folder's config.yaml and W&B's copy are
only ever read as values) — may name only

    - a class defined in diffrun (found by importing diffrun's own modules, nothing else), or
    - a target that a config file of the config folder names (`torch.optim.AdamW`, `diffrun.data.load_cifar`).

Anything else is refused, naming the key and the target, before anything is imported or built: a
`_target_: os.system` would otherwise run a command when the config is instantiated.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import yaml

from diffrun import conf_dir
from diffrun.errors import ConfigError


class UntrustedTargetError(ConfigError):
    """A config read from a file names a `_target_` outside diffrun and its config files."""


@functools.lru_cache(maxsize=1)
def config_folder_targets() -> frozenset[str]:
    """Every `_target_` the YAML files of the config folder name."""
    found: set[str] = set()
    for path in sorted(conf_dir().rglob("*.yaml")):
        _collect(yaml.safe_load(path.read_text()), found)
    return frozenset(found)


def _collect(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found.add(node["_target_"])
        for value in node.values():
            _collect(value, found)
    elif isinstance(node, list):
        for value in node:
            _collect(value, found)


def is_diffrun_class(target: str) -> bool:
    """`target` names a class defined in diffrun. Only `diffrun.*` modules are imported to find out; a path
    through one of them to another module's object (`diffrun.training.environment.os.system`) is not one."""
    if not target.startswith("diffrun."):
        return False
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 — not found in diffrun: not a diffrun class
        return False
    return isinstance(obj, type) and obj.__module__.split(".")[0] == "diffrun"


def trusted(target: Any) -> bool:
    return isinstance(target, str) and (target in config_folder_targets() or is_diffrun_class(target))


def check_targets(tree: Any, source: str, replaced: Iterable[str] = ()) -> None:
    """Refuse (UntrustedTargetError) the first `_target_` in `tree`, a config read from `source`, that is not
    trusted (module docstring). Keys in `replaced`, and everything under them, are not checked: the command
    line replaces them."""
    replaced = set(replaced)
    for key, target in _targets(tree, ""):
        parts = key.split(".")
        if any(".".join(parts[:i]) in replaced for i in range(1, len(parts) + 1)):
            continue
        if not trusted(target):
            raise UntrustedTargetError(
                f"{key}={target!r} in {source}: a config read from a file may name only diffrun's classes and the "
                f"targets of diffrun's config files (e.g. torch.optim.AdamW), so nothing of it was imported or run; "
                f"if you trust this file, give the key on the command line ({key}=...)")


def _targets(node: Any, prefix: str):
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_target_":
                yield path, value
            else:
                yield from _targets(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{prefix}.{i}" if prefix else str(i))
