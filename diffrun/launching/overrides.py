"""Hydra's override failures said in diffrun's one line, with a did-you-mean from the schema and the group options.

    train.step=10       → train.step=10: no such key; did you mean train.steps? ...
    weighting=minsnr    → weighting=minsnr: no such option; did you mean weighting=min_snr? ...
    optimizer.lr=1e-4   → optimizer.lr=1e-4: no such key; did you mean optimizer.optim.lr? ...

A typo is never answered with Hydra's "use +key=value to append" (that would add a key nothing reads). Unknown
keys added with `+` (`+weighting.gama=3`) are refused by diffrun.validation, which lists the plugin's keys.
A `_target_` that does not import names its module and where Python looks for it.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig

from diffrun import conf_dir

GROUP_MISSING = re.compile(r"Could not find '(?P<group>[\w/]+)/(?P<option>[^']+)'")
KEY_MISSING = re.compile(r"Could not override '(?P<key>[^']+)'")
IMPORT_FAILED = re.compile(r"Error locating target '(?P<target>[^']+)'")


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate nearest to `word`, also across a left-out or extra `_` (minsnr → min_snr); None if none is
    close."""
    squashed = {c.replace("_", ""): c for c in candidates}
    if word.replace("_", "") in squashed:
        return squashed[word.replace("_", "")]
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def group_options(group: str, config_dirs: list[str]) -> list[str]:
    folders = [conf_dir() / group, *(Path(d) / group for d in config_dirs)]
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def dotted_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        if prefix == "" and key == "hydra":
            continue
        keys.append(f"{prefix}{key}")
        if isinstance(value, DictConfig) and not value._is_none():
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def suggest_key(key: str, keys: list[str]) -> str | None:
    """A key of the config for the mistyped `key`: a close leaf under the same parent (train.step → train.steps),
    the same leaf deeper under the same section (optimizer.lr → optimizer.optim.lr), else the nearest key."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    near = closest(leaf, siblings)
    if near:
        return f"{parent}.{near}" if parent else near
    section = key.split(".")[0]
    deeper = [k for k in keys if k.startswith(f"{section}.") and k.rpartition(".")[2] == leaf]
    if deeper:
        return min(deeper, key=len)
    return closest(key, keys)


def composed_without(overrides: list[str], key: str, config_dirs: list[str]) -> DictConfig | None:
    """The config composed from `overrides` less those of `key` (what the user's groups make), or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key and "=" in o and "," not in o]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=kept)
    except Exception:  # noqa: BLE001 — another bad override: answer with what is known
        return None
    finally:
        GlobalHydra.instance().clear()


def override_error(exc: BaseException, overrides: list[str], config_dirs: list[str] = ()) -> str | None:
    """diffrun's one line for a Hydra composition failure of `overrides` (the command line's), or None when `exc`
    is not one."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    text = str(exc)
    given = {o.split("=", 1)[0]: o for o in overrides if "=" in o}
    found = GROUP_MISSING.search(text)
    if found:
        group, option = found["group"], found["option"]
        options = group_options(group, list(config_dirs))
        near = closest(option, options)
        typed = given.get(group, given.get(f"+{group}", f"{group}={option}"))
        hint = f"did you mean {group}={near}? " if near else ""
        listed = ", ".join(options) if len(options) <= 12 else f"the {len(options)} options `diffrun --help` lists"
        return f"{typed}: no such option of {group}; {hint}allowed {listed}"
    found = KEY_MISSING.search(text)
    if found:
        key = found["key"]
        cfg = composed_without(overrides, key, list(config_dirs))
        typed = given.get(key, key)
        if cfg is None:
            return f"{typed}: no such key"
        keys = dotted_keys(cfg)
        near = suggest_key(key, keys)
        parent = key.rpartition(".")[0]
        siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
        takes = f"; {parent} takes {', '.join(siblings)}" if parent and siblings else ""
        return f"{typed}: no such key" + (f"; did you mean {near}?" if near else "") + (
            takes.replace(";", "", 1) if near else takes)
    found = IMPORT_FAILED.search(text)
    if found or isinstance(exc, InstantiationException) and "ModuleNotFoundError" in text:
        target = found["target"] if found else "?"
        return (f"_target_={target} does not import ({text.splitlines()[-1].strip()}): its module must be on "
                f"PYTHONPATH (PYTHONPATH=. diffrun ... from the folder that holds it) or in the package of a "
                f"-cd config folder")
    first = " ".join(text.split("\n")[0].split())
    if isinstance(exc.__cause__, OmegaConfBaseException):   # "Error merging override K=V": OmegaConf says why
        return f"{first}: {' '.join(str(exc.__cause__).splitlines()[0].split())}"
    return first
