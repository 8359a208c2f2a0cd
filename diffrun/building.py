"""Building a config node into an object: Hydra `instantiate` of a `_target_` node, after checking that its
keys are arguments the target takes and that its scalar values have the types the target declares. Errors
come out as one-line ConfigErrors naming the key."""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrun.checks import resolved, show
from diffrun.config import META_KEYS
from diffrun.errors import ConfigError, DiffrunError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


# Python types a constructor argument may declare, and the config values that fit them. Group configs
# (weighting, schedule, ...) are free-form for the schema, so without this `dual_sampling=maybe` would
# reach `bool("maybe")` and train silently with True.
_SCALAR_TYPES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def check_argument_types(spec: dict, where: str) -> None:
    """Each key of an instantiate spec against the scalar type its `_target_` declares for it (bool, int,
    float, str, optionally None); other annotations are left to the constructor. Nested specs too."""


    try:
        target = get_object(spec["_target_"])
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # no target, not importable, or annotations that do not resolve: nothing to check
        return
    for key, value in spec.items():
        if isinstance(value, dict) and "_target_" in value:
            check_argument_types(value, f"{where}.{key}")
            continue
        hint = hints.get(key)
        if hint is None or key.startswith("_"):
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        arms = typing.get_args(hint) if union else (hint,)
        kinds = [a for a in arms if a is not type(None)]
        if len(kinds) != 1 or kinds[0] not in _SCALAR_TYPES or (value is None and type(None) in arms):
            continue
        kind = kinds[0]
        if not isinstance(value, _SCALAR_TYPES[kind]) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}={value!r}: expected {kind.__name__}"
                              f"{' (true or false)' if kind is bool else ''}{' or null' if type(None) in arms else ''}")


def spec_values(spec: dict, where: str) -> str:
    """`where.key=value, ...` for the arguments of an instantiate spec (what an error message should show)."""
    items = []
    for key, value in spec.items():
        if key.startswith("_") or key in META_KEYS:
            continue
        if isinstance(value, dict) and "_target_" in value:
            value = value["_target_"]
        items.append(f"{where}.{key}={show(value)}")
    return ", ".join(items)


def build_spec(spec: Any, where: str, **kwargs: Any) -> Any:
    """Hydra `instantiate` of a resolved spec whose config key is `where`, after checking the scalar argument
    types its target declares. Any error comes out as a DiffrunError naming `where` and the values given."""
    if isinstance(spec, dict):
        check_argument_types(spec, where)
    try:
        return instantiate(spec, **kwargs)
    except DiffrunError:
        raise
    except Exception as exc:  # Hydra wraps constructor errors; unwrap ours so the message stays clean
        cause, root, imports = exc.__cause__ or exc.__context__, exc, None
        while cause is not None:
            if isinstance(cause, DiffrunError):
                raise cause from None
            if isinstance(cause, ImportError) and imports is None:
                imports = cause
            root, cause = cause, cause.__cause__ or cause.__context__
        target = spec.get("_target_", where) if isinstance(spec, dict) else where
        if imports is not None:   # a user's plugin that Python cannot find, not a bad value
            module = getattr(imports, "name", None) or str(target).rpartition(".")[0]
            raise ConfigError(f"{where}._target_={target}: module {module} cannot be imported "
                              f"({type(imports).__name__}: {' '.join(str(imports).split())[:200]}); put the folder "
                              f"that holds it on PYTHONPATH (PYTHONPATH=. diffrun -cd <your config folder> ...) "
                              f"or install it") from exc
        values = spec_values(spec, where) if isinstance(spec, dict) else ""
        reason = " ".join(f"{type(root).__name__}: {root}".split())
        raise ConfigError(f"{where} cannot be built ({target} with {values or 'no arguments'}): {reason}; "
                          f"check the {where}.* values") from exc


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra `instantiate` of a group node, without the descriptive keys (name, citation, ...), after
    checking the scalar argument types its target declares."""
    spec = OmegaConf.to_container(node, resolve=True)
    meta_ok = kwargs.pop("_keep_meta", ())
    for key in META_KEYS:
        if key not in meta_ok:
            spec.pop(key, None)
    where = node._get_full_key(None) or (str(spec.get("_target_", "config")) if isinstance(spec, dict) else "config")
    return build_spec(spec, where, **kwargs)


def unknown_key(where: str, key: str, node: DictConfig, allowed: set[str], owner: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    try:
        value = show(resolved(node[key]))
    except OmegaConfBaseException:
        value = "?"
    near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {where}.{near[0]}? " if near and where else f"did you mean {near[0]}? " if near else ""
    return ConfigError(f"{full}={value}: unknown key; {hint}{owner} takes {', '.join(sorted(allowed))}")


def target_parameters(target_path: str) -> tuple[set[str] | None, set[str]]:
    """(keyword arguments `_target_` accepts, or None when it takes **kwargs or cannot be inspected here;
    the arguments it requires)."""
    try:
        target = get_object(target_path)
        parameters = list(inspect.signature(target).parameters.values())
    except Exception:  # not importable or no signature: instantiate reports it when the group is built
        return None, set()
    named = [p for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    required = {p.name for p in named if p.default is inspect.Parameter.empty}
    # a class whose __init__ passes **kwargs on to its base's (MinSNR → Strategy): the base's arguments are its
    for base in (target.__mro__[1:] if inspect.isclass(target) else ()):
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) or base is object:
            break
        if "__init__" not in vars(base):
            continue
        parameters = list(inspect.signature(base.__init__).parameters.values())[1:]
        named += [p for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD)]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None, required
    return {p.name for p in named}, required


def check_target_keys(node: DictConfig, where: str, top_level: bool = False) -> None:
    """Every key of a `_target_` node is an argument of its target, and every argument it requires is there
    (unless `_partial_`: the caller gives the rest); nested `_target_` nodes too."""
    accepted, required = target_parameters(str(node._target_))
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and "_target_" in child:
            check_target_keys(node[key], f"{where}.{key}")
        if accepted is None or key in accepted or key in HYDRA_KEYS or (top_level and key in META_KEYS):
            continue
        raise unknown_key(where, key, node, accepted, str(node._target_))
    missing = sorted(required - set(node.keys()))
    if missing and not node.get("_partial_", False):
        raise ConfigError(f"{where}.{missing[0]} is required by {node._target_}: add {where}.{missing[0]}=<value>")


def build_failure(where: str, spec: dict, what: str, exc: BaseException) -> ConfigError:
    """The ConfigError of a node that builds but fails when first used (`what`: the use)."""
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return ConfigError(f"{where} ({spec_values(spec, where)}): {what} fails with {reason}; check the {where}.* values")


def _schema_keys(kind: type) -> dict[str, Any]:
    """{field: the field's dataclass type or None} of a schema dataclass."""
    return {f.name: f.default_factory if is_dataclass(getattr(f, "default_factory", None)) else None
            for f in fields(kind)}


def check_schema_keys(node: DictConfig, kind: type, where: str) -> None:
    known = _schema_keys(kind)
    for key in node.keys():
        if where == "" and key == "hydra":
            continue
        if key not in known:
            raise unknown_key(where, key, node, set(known), where or "the top level")
        if known[key] is not None and isinstance(node[key], DictConfig):
            check_schema_keys(node[key], known[key], f"{where}.{key}" if where else key)


def spec_without_meta(cfg: DictConfig, key: str, keep_meta: tuple[str, ...] = ()) -> dict:
    """The resolved node at `key`, without the descriptive keys (name, citation, ...) except `keep_meta`."""
    spec = resolved(OmegaConf.select(cfg, key))
    for meta in META_KEYS:
        if meta not in keep_meta:
            spec.pop(meta, None)
    return spec
