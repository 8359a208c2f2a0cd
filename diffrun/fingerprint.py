"""Which run a config describes: the part of it that decides what is trained, and its SHA-256.

A run is its resolved config minus what does not change what is trained (budget, evaluation, logging, where
it runs). Those keys are marked where they are declared: `trained=False` on the schema's fields
(diffrun/config.py), and `Annotated[<type>, NOT_TRAINED]` on a plugin's arguments (a dataset's folder). The
fingerprint is written into every checkpoint and into `status.json` (diffrun/training/identity.py compares them).
Default run names get a short suffix of it when the command line changed what the name does not say.
"""
from __future__ import annotations

import functools
import hashlib
import json
import typing
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from diffrun.config import GROUP_NODES, NOT_TRAINED, PROSE_KEYS, RunConfig

NAMED = {"dataset", "model", "weighting", "seed", "experiment", "name"}   # what a default run name says


def schema_untrained(schema: type = RunConfig, prefix: str = "") -> Iterator[str]:
    """The dotted keys the schema declares `trained=False` (a section so marked stands for all its keys)."""
    for item in fields(schema):
        key = prefix + item.name
        if item.metadata.get("trained", True) is False:
            yield key
        elif is_dataclass(item.default_factory):
            yield from schema_untrained(item.default_factory, key + ".")


UNTRAINED = ("hydra", *schema_untrained(),            # the hydra node is Hydra's own settings
             *(key for group, node in GROUP_NODES.items() for key in schema_untrained(node, group + ".")))


def untrained_arguments(target: Any) -> frozenset[str]:
    """The arguments a `_target_` marks `Annotated[..., NOT_TRAINED]` (none when it cannot be imported here)."""
    return _untrained_arguments(str(target))


@functools.lru_cache(maxsize=None)   # every status write fingerprints the config; a target's marks never change
def _untrained_arguments(target: str) -> frozenset[str]:
    try:
        function = get_object(target)
        hints = typing.get_type_hints(function.__init__ if isinstance(function, type) else function,
                                      include_extras=True)
    except Exception:
        return frozenset()
    return frozenset(name for name, hint in hints.items() if NOT_TRAINED in getattr(hint, "__metadata__", ()))


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.get(key) if isinstance(tree, dict) else None
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def _drop_untrained_arguments(node: Any) -> None:
    if isinstance(node, dict):
        for name in untrained_arguments(node["_target_"]) if "_target_" in node else ():
            node.pop(name, None)
        for child in node.values():
            _drop_untrained_arguments(child)


def trained_config(cfg: DictConfig | dict) -> dict:
    """The part of the resolved config that decides what is trained. `train.steps` counts when the learning
    rate schedule depends on it (a decay over the run's length)."""
    tree = (OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig)
            else json.loads(json.dumps(cfg, default=str)))
    steps_matter = (tree.get("optimizer") or {}).get("decay", "constant") != "constant"
    steps = (tree.get("train") or {}).get("steps")
    for key in UNTRAINED:
        _drop(tree, key)
    for group in tree.values():
        if isinstance(group, dict):
            for key in PROSE_KEYS:
                group.pop(key, None)
            _drop_untrained_arguments(group)
    if steps_matter:
        tree.setdefault("train", {})["steps"] = steps
    return tree


def fingerprint_of(trained: dict) -> str:
    return hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(cfg: DictConfig | dict) -> str:
    return fingerprint_of(trained_config(cfg))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict, new: dict, limit: int = 12) -> list[str]:
    """`key: old → new` for every leaf that differs between two trained configs."""
    a, b = _flatten(old), _flatten(new)
    lines = [f"{key}: {a.get(key, '<absent>')!r} → {b.get(key, '<absent>')!r}"
             for key in sorted(set(a) | set(b)) if a.get(key, "<absent>") != b.get(key, "<absent>")]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def is_untrained(key: str, root: DictConfig) -> bool:
    """Whether the dotted `key` of the composed config is (inside) one that does not change what is trained."""
    if any(key == k or key.startswith(k + ".") for k in UNTRAINED):
        return True
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(root, parent, default=None) if parent else None
    return isinstance(node, DictConfig) and "_target_" in node and leaf in untrained_arguments(node._target_)


def name_suffix(root: DictConfig) -> str:
    """`_<6 hex>` of the fingerprint when the command line changed something the default run name does not
    say (anything but dataset, model, weighting, seed and the preset), else ''. Outside a Hydra app: ''."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        return ""
    relevant = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
        if key in NAMED or key.startswith("hydra") or is_untrained(key, root):
            continue
        relevant.append(override)
    if not relevant:
        return ""
    tree = OmegaConf.to_container(root, resolve=False)
    tree.pop("name", None)
    tree.pop("hydra", None)
    return "_" + fingerprint(OmegaConf.create(tree))[:6]
