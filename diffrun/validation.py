"""Every value of a run checked before any work: before the run directory exists, before data is read.

`validate_run(cfg)` raises a one-line ConfigError (DataError for data that is not there) naming the key,
the value and what is allowed. The checks, cheapest first:

    complete     no `???` left, every interpolation resolves;
    keys         no key that nothing reads (`+foo=1`, `+train.foo=1`, `+weighting.gama=2`): schema sections
                 against the dataclasses of config.py, `_target_` nodes against their target's signature;
    values       ranges and NaN/inf of every number of the schema, the group values diffrun reads itself,
                 names that become folders, the forms of `device`, `resume` and `dist.backend`;
    groups       schedule, weighting, model and optimizer built once, cheaply: the schedule's λ(t) probed,
                 the strategy bound to it, the model built on the meta device and run on a 2-image meta
                 batch (no memory), the optimizer and its learning-rate schedule on one dummy parameter;
    environment  devices and distributed backends that exist on this machine, files and folders that must
                 exist. Skipped (`environment=False`) where a sweep is checked by the machine that submits it.

It runs in a Hydra callback before the run directory is made (diffrun.launching.preflight), in every job
of a multirun, and in the Trainer's constructor (`diffrun.config.validate`).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrun.config import META_KEYS, RunConfig, build_spec, check_argument_types, option, show, spec_values
from diffrun.errors import ConfigError, DataError, DiffrunError

GROUPS = ("dataset", "schedule", "weighting", "model", "optimizer")
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Keys of a group option that diffrun reads itself: (keys it must have, keys it may have). Everything else in
# the option is a constructor argument of a `_target_` node, or a value such a node interpolates (image_folder's
# `root: ???`). The schedule and weighting options are `_target_` nodes themselves.
GROUP_KEYS = {
    "dataset": (("image_size", "channels", "loader"), ("name", "num_classes", "placement", "order", "workers")),
    "model": (("net", "prediction"), ("name", "sigma_data", "learn_sigma", "init_from")),
    "optimizer": (("optim",), ("name", "warmup_steps", "warmup_kimg", "decay", "min_lr_ratio",
                               "no_decay_norms_biases_embeddings")),
}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N, mps"
BACKENDS = ("auto", "gloo", "nccl", "mpi")
SAFE_NAME = "one folder name: not empty, no slash or backslash, not '.' or '..'"


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

# Every int and float key of the schema (tests/test_validation.py checks that none is missing).
RANGES: dict[str, Interval] = {
    "seed": SEED,
    "train.steps": POSITIVE,
    "train.kimg": Interval(0, low_open=True, note="or null: the budget is train.steps"),
    "train.batch_size": POSITIVE,
    "train.log_every": POSITIVE,
    "train.grad_clip": Interval(0, note="0 disables clipping"),
    "train.max_skipped_fraction": FRACTION,
    "train.label_dropout": FRACTION,
    "ema.decay": Interval(0, 1, high_open=True, note="or null with ema.halflife_kimg"),
    "ema.halflife_kimg": Interval(0, low_open=True, note="or null: a decay per step (ema.decay)"),
    "ema.rampup_ratio": Interval(0, low_open=True, note="or null: no ramp-up of the half-life"),
    "augment.p": Interval(0, 1, note="0: no augmentation; EDM CIFAR-10: 0.12"),
    **{f"augment.{name}": Interval(0, note="probability multiplier; 0: transform off")
       for name in ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")},
    "augment.scale_std": NON_NEGATIVE,
    "augment.rotate_frac_max": NON_NEGATIVE,
    "augment.aniso_std": NON_NEGATIVE,
    "augment.aniso_rotate_prob": FRACTION,
    "augment.translate_frac_std": NON_NEGATIVE,
    "sample.steps": POSITIVE,
    "sample.eta": Interval(0, 1, note="0: deterministic DDIM, 1: the DDPM posterior variance"),
    "sample.num_images": Interval(0, note="0: no sample grid"),
    "sample.every_steps": Interval(0, note="0: only at the end"),
    "sample.seed": SEED,
    "checkpoint.every_steps": Interval(0, note="0: only at the end"),
    "checkpoint.keep": POSITIVE,
    "eval.every_steps": Interval(0, note="0: only at the end"),
    "eval.num_samples": POSITIVE,
    "eval.num_reference": Interval(0, low_open=True, note="or null: the whole training set"),
    "eval.repeats": Interval(1, note="FID evaluations with different sample seeds"),
    "eval.steps": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.kid_subset_size": POSITIVE,
    "eval.seed": SEED,
    "stats.bins": POSITIVE,
    "stats.logsnr_min": FINITE,
    "stats.logsnr_max": FINITE,
    "report.target_fid": Interval(0, low_open=True, note="or null"),
    "dist.devices": POSITIVE,
    "dist.timeout_s": Interval(0, low_open=True, note="seconds"),
    "dist.interrupt_check_every": POSITIVE,
}
# Sampler keys of `sample.*` and `eval.*` checked by diffrun.sampling.SamplerOptions, which states their ranges
# once for the trainer, diffrun-eval and this check.
SAMPLER_OPTION_KEYS = ("eta", "rho", "sigma_min", "sigma_max", "s_churn", "s_min", "s_max", "s_noise", "cfg_scale",
                       "guidance_sigma_min", "guidance_sigma_max")


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


def validate_run(cfg: DictConfig, environment: bool = True) -> None:
    """All checks of the module docstring, in its order. Raises ConfigError / DataError (one line each)."""
    check_complete(cfg)
    check_keys(cfg)
    check_values(cfg)
    check_groups(cfg)
    if environment:
        check_environment(cfg)


# ------------------------------------------------------------------------------------------------
# complete: no ??? left, every interpolation resolves
# ------------------------------------------------------------------------------------------------
def _missing(node: DictConfig | ListConfig, prefix: str) -> Iterator[str]:
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if prefix == "" and key == "hydra":
            continue
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            yield from _missing(child, f"{prefix}{key}.")


def check_complete(cfg: DictConfig) -> None:
    for key in _missing(cfg, ""):
        group = key.split(".")[0]
        option = OmegaConf.select(cfg, f"{group}.name", default=None) if group in GROUPS else None
        where = f"{group}={option} sets no default for it" if option else "it has no default"
        raise ConfigError(f"{key}=??? is required: {where}; add {key}=<value> to the command line")
    for key in (k for k in cfg.keys() if k != "hydra"):  # the callback sees Hydra's own node too
        try:
            resolved(cfg[key])
        except OmegaConfBaseException as exc:
            full_key = getattr(exc, "full_key", None) or key
            raise ConfigError(f"{full_key}: {str(exc).splitlines()[0]}") from None


def resolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


# ------------------------------------------------------------------------------------------------
# keys: nothing that nobody reads
# ------------------------------------------------------------------------------------------------
def _schema_keys(kind: type) -> dict[str, Any]:
    """{field: the field's dataclass type or None} of a schema dataclass."""
    return {f.name: f.default_factory if is_dataclass(getattr(f, "default_factory", None)) else None
            for f in fields(kind)}


def _unknown(where: str, key: str, node: DictConfig, allowed: set[str], owner: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    try:
        value = show(resolved(node[key]))
    except OmegaConfBaseException:
        value = "?"
    near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {where}.{near[0]}? " if near and where else f"did you mean {near[0]}? " if near else ""
    return ConfigError(f"{full}={value}: unknown key; {hint}{owner} takes {', '.join(sorted(allowed))}")


def check_schema_keys(node: DictConfig, kind: type, where: str) -> None:
    known = _schema_keys(kind)
    for key in node.keys():
        if where == "" and key == "hydra":
            continue
        if key not in known:
            raise _unknown(where, key, node, set(known), where or "the top level")
        if known[key] is not None and isinstance(node[key], DictConfig):
            check_schema_keys(node[key], known[key], f"{where}.{key}" if where else key)


def target_parameters(target_path: str) -> tuple[set[str] | None, set[str]]:
    """(keyword arguments `_target_` accepts, or None when it takes **kwargs or cannot be inspected here;
    the arguments it requires)."""
    from hydra.utils import get_object

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
        raise _unknown(where, key, node, accepted, str(node._target_))
    missing = sorted(required - set(node.keys()))
    if missing and not node.get("_partial_", False):
        raise ConfigError(f"{where}.{missing[0]} is required by {node._target_}: add {where}.{missing[0]}=<value>")


def _interpolated_keys(node: DictConfig, group: str) -> set[str]:
    """Keys of a group that its own interpolations read (`${..root}` in dataset.loader, `${dataset.root}` → root)."""
    text = json.dumps(OmegaConf.to_container(node, resolve=False))
    return set(re.findall(rf"\$\{{(?:\.\.|{group}\.)(\w+)\}}", text))


def check_keys(cfg: DictConfig) -> None:
    check_schema_keys(cfg, RunConfig, "")
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or node._is_none():
            raise ConfigError(f"{group}={show(resolved(node))}: allowed a {group} option (conf/{group}/*.yaml), "
                              f"e.g. {group}=<name>")
        option = f"{group}={node.get('name')}"
        if group not in GROUP_KEYS:
            if "_target_" not in node:
                raise ConfigError(f"{group}._target_ is required: {option} does not set it; allowed a class path")
            check_target_keys(node, group, top_level=True)
            continue
        required, optional = GROUP_KEYS[group]
        for key in required:
            if key not in node:
                raise ConfigError(f"{group}.{key} is required: {option} does not set it; add {group}.{key}=<value>")
        allowed = {*required, *optional, *META_KEYS, *_interpolated_keys(node, group)}
        for key in node.keys():
            child = node._get_node(key)
            if key not in allowed:
                raise _unknown(group, key, node, allowed, option)
            if isinstance(child, DictConfig) and "_target_" in child:
                check_target_keys(node[key], f"{group}.{key}")


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------
def _nan_keys(value: Any, where: str) -> Iterator[str]:
    if isinstance(value, float) and math.isnan(value):
        yield where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nan_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nan_keys(item, f"{where}[{i}]")


def check_values(cfg: DictConfig) -> None:
    from diffrun.sampling import SamplerOptions

    # --- the schema ------------------------------------------------------------------------------
    for section in ("sample", "eval"):
        SamplerOptions.from_config(resolved(cfg[section]), section)
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key)
        check_number(key, value, allowed, integer=type(value) is int)  # the schema has made each an int or a float
    for key in (*(f"{g}.name" for g in GROUPS), "name", "sweep_name"):  # `name` is made of the group names
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None or key in ("name", "sweep_name"):
            check_folder_name(key, value)
    device = str(cfg.device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device={show(cfg.device)}: allowed {DEVICE_FORMS}")
    if not (cfg.resume in ("auto", "never", "force") or str(cfg.resume).endswith((".pt", ".pth"))):
        raise ConfigError(f"resume={show(cfg.resume)}: allowed auto, never, force (continue a run whose config "
                          f"changed), or a path to a .pt checkpoint")
    check_choice("dist.backend", cfg.dist.backend, BACKENDS)
    if cfg.stats.logsnr_min >= cfg.stats.logsnr_max:
        raise ConfigError(f"stats.logsnr_min={cfg.stats.logsnr_min} must be < stats.logsnr_max={cfg.stats.logsnr_max}")
    if cfg.eval.reference_stats is not None and cfg.eval.num_reference is not None:
        raise ConfigError(f"eval.num_reference={cfg.eval.num_reference} with eval.reference_stats="
                          f"{show(cfg.eval.reference_stats)}: the statistics file is the reference; set one of them")
    if cfg.dist.devices > 1 and cfg.train.batch_size % cfg.dist.devices:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by "
                          f"dist.devices={cfg.dist.devices} (each rank draws batch_size / dist.devices)")
    check_budget(cfg)
    check_ema_values(cfg)

    # --- what diffrun reads from the groups itself ------------------------------------------------
    check_number("dataset.image_size", cfg.dataset.get("image_size"), POSITIVE, integer=True)
    check_choice("model.prediction", cfg.model.get("prediction"), _predictions())
    check_number("model.sigma_data", cfg.model.get("sigma_data", 0.5), POSITIVE)
    check_learned_variance(cfg)
    check_dataset_values(cfg)
    check_conditioning(cfg)
    check_optimizer_values(cfg)
    check_augment_values(cfg)
    for group in GROUPS:
        for key in _nan_keys(resolved(cfg[group]), group):
            raise ConfigError(f"{key}=nan is not a number: allowed a finite value")


def check_budget(cfg: DictConfig) -> None:
    """One budget: with train.kimg set, train.steps must be the steps it gives (presets write
    `steps: ${diffrun.kimg_to_steps:${train.kimg},${train.batch_size}}`)."""
    from diffrun.config import kimg_to_steps

    kimg = cfg.train.kimg
    steps = None if kimg is None else kimg_to_steps(kimg, cfg.train.batch_size)
    if steps is not None and cfg.train.steps != steps:
        raise ConfigError(f"train.steps={cfg.train.steps} disagrees with train.kimg={kimg} (at train.batch_size="
                          f"{cfg.train.batch_size} that is ⌈kimg·1000 / batch⌉ = {steps} steps): give one budget, "
                          f"train.kimg=null with train.steps=<N>, or train.kimg=<K> with train.steps following it "
                          f"(as the presets that count in images do; elsewhere add "
                          f"train.steps='${{diffrun.kimg_to_steps:${{train.kimg}},${{train.batch_size}}}}')")


def check_ema_values(cfg: DictConfig) -> None:
    """A decay per step or a half-life in images, not both; each with its own ramp-up."""
    ema = cfg.ema
    if (ema.decay is None) == (ema.halflife_kimg is None):
        raise ConfigError(f"ema.decay={ema.decay} and ema.halflife_kimg={ema.halflife_kimg}: give exactly one, a decay "
                          f"per step (DDPM: 0.9999) or a half-life in thousands of images (EDM: 500) with ema.decay=null")
    if ema.halflife_kimg is not None and ema.warmup:
        raise ConfigError(f"ema.warmup=true is the ramp of the per-step decay; with ema.halflife_kimg={ema.halflife_kimg} "
                          f"set ema.warmup=false and ramp the half-life with ema.rampup_ratio (EDM: 0.05)")
    if ema.rampup_ratio is not None and ema.halflife_kimg is None:
        raise ConfigError(f"ema.rampup_ratio={ema.rampup_ratio} ramps a half-life; it needs ema.halflife_kimg "
                          f"(or ema.rampup_ratio=null with ema.decay)")


def check_augment_values(cfg: DictConfig) -> None:
    """With augmentation on, the network must take its labels, exactly as many as the enabled transforms give."""
    from diffrun.data.augment import AugmentPipe

    if cfg.augment.p == 0:
        if (cfg.model.net.get("augment_dim") or 0) > 0:
            raise ConfigError(f"model.net.augment_dim={cfg.model.net.augment_dim} but augment.p=0: the network would "
                              f"never be given augmentation labels; set augment.p>0 (EDM: 0.12) or "
                              f"model.net.augment_dim=0")
        return
    pipe = AugmentPipe(**resolved(cfg.augment))
    if "augment_dim" not in cfg.model.net:
        raise ConfigError(f"augment.p={cfg.augment.p} needs a network that takes augmentation labels "
                          f"(model.net.augment_dim, EDM's SongUNet: model=edm_ddpmpp_cifar10); model={cfg.model.get('name')} "
                          f"has none; set augment.p=0")
    if cfg.model.net.augment_dim != pipe.label_dim:
        raise ConfigError(f"model.net.augment_dim={cfg.model.net.augment_dim} but the enabled augmentations "
                          f"({', '.join(pipe.enabled)}) give {pipe.label_dim} labels: set "
                          f"model.net.augment_dim={pipe.label_dim}")


def _predictions() -> tuple[str, ...]:
    from diffrun.models.parameterization import PREDICTIONS

    return PREDICTIONS


def _loader(cfg: DictConfig) -> tuple[Any, dict]:
    from hydra.utils import get_object

    spec = resolved(cfg.dataset.loader)
    try:
        return get_object(spec["_target_"]), spec
    except Exception:
        raise ConfigError(f"dataset.loader._target_={show(spec.get('_target_'))}: not an importable function") from None


def check_dataset_values(cfg: DictConfig) -> None:
    from diffrun.data.loaders import (CIFAR_RELEASES, CIFAR_SHAPE, CIFAR_SPLITS, LABELS, load_celeba, load_cifar,
                                      load_digits, load_image_folder, load_imagenet64, load_latents)
    from diffrun.data.placement import ORDERS, PLACEMENTS

    target, spec = _loader(cfg)
    check_argument_types(spec, "dataset.loader")
    size, channels = cfg.dataset.image_size, cfg.dataset.get("channels")
    if target is load_latents:
        check_number("dataset.channels", channels, POSITIVE, integer=True)
        check_number("dataset.loader.scale_factor", spec.get("scale_factor"),
                     Interval(0, low_open=True, note="or null: the latent folder's own"))
    else:
        check_choice("dataset.channels", channels, (1, 3))
    for key, wanted in (("image_size", size), ("channels", channels)):
        if key in spec and spec[key] != wanted:
            raise ConfigError(f"dataset.loader.{key}={show(spec[key])} differs from dataset.{key}={wanted}: "
                              f"set dataset.{key} (the loader follows it)")
    check_number("dataset.num_classes", cfg.dataset.get("num_classes", 0), Interval(0, note="0: unconditional"),
                 integer=True)
    placement, order = cfg.dataset.get("placement", "auto"), cfg.dataset.get("order", "auto")
    check_choice("dataset.placement", placement, PLACEMENTS)
    check_choice("dataset.order", order, ORDERS)
    if placement == "stream" and order == "iid":
        raise ConfigError("dataset.order='iid' draws from the global RNG on the device and cannot be streamed "
                          "(dataset.placement='stream'): allowed dataset.order=epoch or auto")
    check_number("dataset.workers", cfg.dataset.get("workers", 4), Interval(0, note="0: read in the training process"),
                 integer=True)
    if target is load_cifar:
        check_choice("dataset.loader.release", spec.get("release"), CIFAR_RELEASES)
        check_choice("dataset.loader.split", spec.get("split", "train"), CIFAR_SPLITS)
        check_number("dataset.loader.limit", spec.get("limit"), Interval(0, low_open=True, note="or null: every image"),
                     integer=True)
        if (channels, size) != CIFAR_SHAPE:
            key, value = ("dataset.image_size", size) if size != CIFAR_SHAPE[1] else ("dataset.channels", channels)
            raise ConfigError(f"{key}={value}: CIFAR images are {CIFAR_SHAPE[0]}x{CIFAR_SHAPE[1]}x{CIFAR_SHAPE[1]} "
                              f"and are not resized; allowed dataset.channels={CIFAR_SHAPE[0]}, "
                              f"dataset.image_size={CIFAR_SHAPE[1]}")
    elif target is load_digits and channels != 1:
        raise ConfigError(f"dataset.channels={channels}: the digits are grayscale; allowed 1")
    elif target is load_image_folder:
        check_choice("dataset.loader.labels", spec.get("labels", "none"), LABELS)
        if spec.get("resize") and spec.get("center_crop"):
            raise ConfigError("dataset.loader.resize=true and dataset.loader.center_crop=true: allowed one of them")
    elif target is load_imagenet64:
        check_choice("dataset.loader.split", spec.get("split", "train"), ("train", "val"))
        if channels != 3:
            raise ConfigError(f"dataset.channels={channels}: ImageNet is RGB; allowed 3")
    elif target is load_celeba:
        check_choice("dataset.loader.split", spec.get("split", "train"), ("train", "validation", "test"))
        check_number("dataset.loader.crop", spec.get("crop", 140), POSITIVE, integer=True)
        if channels != 3:
            raise ConfigError(f"dataset.channels={channels}: CelebA is RGB; allowed 3")


def dataset_has_labels(cfg: DictConfig) -> bool | None:
    """Whether the configured dataset comes with class labels (None: only its files can tell)."""
    from diffrun.data.loaders import load_celeba, load_cifar, load_digits, load_image_folder, load_imagenet64

    target, spec = _loader(cfg)
    if target in (load_digits, load_cifar, load_imagenet64):
        return True
    if target is load_image_folder:
        return spec.get("labels", "none") != "none"
    if target is load_celeba:
        return False
    return None


def model_num_classes(cfg: DictConfig) -> int:
    """The classes of the configured network (0: unconditional, or a network without class labels)."""
    value = resolved(cfg.model.net).get("num_classes", 0) if isinstance(cfg.model.get("net"), DictConfig) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def check_learned_variance(cfg: DictConfig) -> None:
    """model.learn_sigma: a bool; IDDPM's variational bound lives on the discrete T-step grid; sampling with the
    learned variance needs a model that learns it."""
    learn_sigma = cfg.model.get("learn_sigma", False)
    check_choice("model.learn_sigma", learn_sigma, (True, False))
    if learn_sigma and cfg.schedule.get("timesteps") is None:
        raise ConfigError(f"model.learn_sigma=true trains the variance with IDDPM's variational bound, defined on the "
                          f"discrete T-step grid, but schedule.timesteps=null (continuous t); allowed "
                          f"schedule.timesteps=1000 (DiT, SpeeD: schedule=linear) or model.learn_sigma=false")
    for section in ("sample", "eval"):
        if option(cfg[section].ddpm_variance) == "learned" and not learn_sigma:
            raise ConfigError(f"{section}.ddpm_variance=learned needs a model that learns its variance, and "
                              f"model.learn_sigma=false; allowed {section}.ddpm_variance=fixed_large|fixed_small "
                              f"or model.learn_sigma=true")


def check_conditioning(cfg: DictConfig) -> None:
    """Labels, model and guidance agree: a conditional model gets labels of its classes, and only a model that
    learned the null label (conditional, with label dropout) is guided."""
    classes, model_classes = cfg.dataset.get("num_classes", 0) or 0, model_num_classes(cfg)
    if classes and dataset_has_labels(cfg) is False:
        raise ConfigError(f"dataset.num_classes={classes}, but dataset={cfg.dataset.get('name')} has no class labels; "
                          f"allowed dataset.num_classes=0 (unconditional)"
                          + (" or dataset.loader.labels=subfolder|dataset_json" if "labels" in cfg.dataset.loader else ""))
    if model_classes != classes:
        if not classes:
            raise ConfigError(f"model.net.num_classes={model_classes} is a class-conditional model, but "
                              f"dataset.num_classes=0 gives it no labels; set dataset.num_classes={model_classes} "
                              f"(a labelled dataset) or model.net.num_classes=0")
        has_key = isinstance(cfg.model.get("net"), DictConfig) and "num_classes" in cfg.model.net
        raise ConfigError(f"dataset.num_classes={classes}, but "
                          + (f"model.net.num_classes={model_classes}; allowed model.net.num_classes={classes}"
                             if has_key else f"model={cfg.model.get('name')} takes no class labels; allowed a "
                             f"class-conditional network (the U-Nets, DiT, Min-SNR's ViT) or dataset.num_classes=0"))
    for section in ("sample", "eval"):
        scale = cfg[section].cfg_scale
        if scale == 1:
            continue
        if not classes:
            raise ConfigError(f"{section}.cfg_scale={scale}: classifier-free guidance needs a class-conditional "
                              f"model, and this one is unconditional (dataset.num_classes=0); allowed "
                              f"{section}.cfg_scale=1")
        if cfg.train.label_dropout == 0:
            raise ConfigError(f"{section}.cfg_scale={scale} contrasts with the null label, which "
                              f"train.label_dropout=0 never trains; allowed train.label_dropout>0 (DiT 0.1, "
                              f"Min-SNR 0.15) or {section}.cfg_scale=1")


def check_optimizer_values(cfg: DictConfig) -> None:
    optim = cfg.optimizer.get("optim")
    if not isinstance(optim, DictConfig) or "_target_" not in optim:
        raise ConfigError(f"optimizer.optim={show(resolved(optim))}: allowed a node with _target_ "
                          f"(e.g. torch.optim.AdamW)")
    check_number("optimizer.optim.lr", optim.get("lr", 1e-3), POSITIVE)
    check_number("optimizer.optim.eps", optim.get("eps"), NON_NEGATIVE)
    check_number("optimizer.optim.weight_decay", optim.get("weight_decay"), NON_NEGATIVE)
    betas = resolved(optim.get("betas"))
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != 2:
            raise ConfigError(f"optimizer.optim.betas={show(betas)}: allowed two numbers in [0, 1), e.g. [0.9, 0.999]")
        for i, beta in enumerate(betas):
            check_number(f"optimizer.optim.betas[{i}]", beta, Interval(0, 1, high_open=True))
    warmup = cfg.optimizer.get("warmup_steps")
    check_number("optimizer.warmup_steps", warmup, Interval(0, note="linear warm-up steps; 0: none"), integer=True)
    if (warmup or 0) >= cfg.train.steps:
        raise ConfigError(
            f"optimizer.warmup_steps={warmup} is not shorter than train.steps={cfg.train.steps}: "
            f"the learning rate would never reach its peak; use warmup_steps < train.steps"
        )
    check_number("optimizer.min_lr_ratio", cfg.optimizer.get("min_lr_ratio"), FRACTION)
    warmup_kimg = cfg.optimizer.get("warmup_kimg")
    check_number("optimizer.warmup_kimg", warmup_kimg,
                 Interval(0, note="learning-rate ramp in thousands of images (EDM: 10000); 0: none"))
    if (warmup_kimg or 0) > 0 and (warmup or 0) > 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} and optimizer.warmup_kimg={warmup_kimg}: give one warm-up, "
                          f"in steps or in images (set the other to 0)")


# ------------------------------------------------------------------------------------------------
# groups: built once, cheaply
# ------------------------------------------------------------------------------------------------
def _spec(cfg: DictConfig, key: str, keep_meta: tuple[str, ...] = ()) -> dict:
    spec = resolved(OmegaConf.select(cfg, key))
    for meta in META_KEYS:
        if meta not in keep_meta:
            spec.pop(meta, None)
    return spec


def _failure(where: str, spec: dict, what: str, exc: BaseException) -> ConfigError:
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return ConfigError(f"{where} ({spec_values(spec, where)}): {what} fails with {reason}; check the {where}.* values")


def build_schedule(spec: dict):
    """The schedule, with λ(t) probed on [0, 1]: no NaN, and decreasing from λ(0) to λ(1)."""
    schedule = build_spec(spec, "schedule")
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    try:
        logsnr = schedule.logsnr(t)
    except Exception as exc:
        raise _failure("schedule", spec, "λ(t) on t ∈ [0, 1]", exc) from None
    bad = torch.isnan(logsnr)
    rises = logsnr[1:] > logsnr[:-1]
    if bad.any() or rises.any() or not logsnr[0] > logsnr[-1]:
        where = f"is NaN at t={float(t[bad][0]):.3g}" if bad.any() else (
            f"rises at t={float(t[1:][rises][0]):.3g}" if rises.any() else "is constant")
        raise ConfigError(f"schedule ({spec_values(spec, 'schedule')}): its log-SNR λ(t) {where}; allowed values "
                          f"give a λ(t) that decreases from t=0 to t=1 without NaN")
    return schedule


@functools.lru_cache(maxsize=16)
def check_model(spec_json: str, prediction: str, sigma_data: float, channels: int, image_size: int,
                learn_sigma: bool = False) -> None:
    """Build the denoiser on the meta device (no memory, no init cost) and run it on a 2-image meta batch, so
    shape errors show here; cached, since a sweep checks the same model for every job."""
    from diffrun.models.parameterization import Denoiser

    spec = json.loads(spec_json)
    with torch.device("meta"):
        net = build_spec(spec, "model.net")
        denoiser = Denoiser(net, prediction, sigma_data, learn_sigma)
        x = torch.empty(2, channels, image_size, image_size)
        try:
            out = denoiser(x, torch.zeros(2))
        except DiffrunError:
            raise
        except NotImplementedError:  # an op without a meta kernel: the shapes cannot be checked this way
            return
        except Exception as exc:
            if "meta" in str(exc):   # a tensor the model made on a fixed device met the meta ones: not the config's fault
                return
            raise _failure("model.net", spec, f"a {channels}x{image_size}x{image_size} image batch", exc) from None
    if learn_sigma and tuple(out.shape) != (2, 2 * channels, image_size, image_size):
        raise ConfigError(f"model.learn_sigma=true needs a network with twice the input's channels out (the "
                          f"prediction and the variance), but model.net ({spec_values(spec, 'model.net')}) returns "
                          f"{tuple(out.shape)} for {tuple(x.shape)}; allowed model.net.learn_sigma=true (DiT, UNet) "
                          f"or model.learn_sigma=false")
    if not learn_sigma and tuple(out.shape) != tuple(x.shape):
        raise ConfigError(f"model.net ({spec_values(spec, 'model.net')}): returns {tuple(out.shape)} for a batch of "
                          f"{tuple(x.shape)}; it must return the input's shape"
                          + (" (a net with learn_sigma=true needs model.learn_sigma=true)"
                             if out.shape[1] == 2 * channels else ""))


def check_groups(cfg: DictConfig) -> None:
    from diffrun.training.optim import build_lr_schedule, build_optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedule = build_schedule(_spec(cfg, "schedule"))
        prediction, sigma_data = cfg.model.prediction, cfg.model.get("sigma_data", 0.5)
        check_model(json.dumps(_spec(cfg, "model.net"), sort_keys=True), prediction, sigma_data,
                    cfg.dataset.channels, cfg.dataset.image_size, bool(cfg.model.get("learn_sigma", False)))
        weighting = _spec(cfg, "weighting", keep_meta=("name", "citation"))
        strategy = build_spec(weighting, "weighting")
        try:
            strategy.bind(schedule, prediction, sigma_data)
        except DiffrunError:
            raise
        except Exception as exc:
            raise _failure("weighting", weighting, f"binding to schedule={cfg.schedule.get('name')}", exc) from None
        optim = _spec(cfg, "optimizer.optim")
        try:
            optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))], torch.device("cpu"))
            build_lr_schedule(cfg.optimizer, optimizer, cfg.train.steps, cfg.train.batch_size)
        except DiffrunError:
            raise
        except Exception as exc:
            raise _failure("optimizer.optim", optim, "building the optimizer", exc) from None
    check_capture(cfg, strategy, bool(optimizer.defaults.get("fused")))


def check_capture(cfg: DictConfig, strategy, fused_optimizer: bool) -> None:
    """train.capture=compile with a strategy, precision, network and optimizer it can capture (capture.refusal)."""
    if option(cfg.train.capture) != "compile":
        return
    from diffrun.training.capture import refusal

    reason = refusal(strategy, fp16=option(cfg.precision) == "fp16",
                     compiled_network=bool(cfg.train.compile), world_size=cfg.dist.devices,
                     fused_optimizer=fused_optimizer, augment=float(cfg.augment.p) > 0)
    if reason is not None:
        raise ConfigError(reason)


# ------------------------------------------------------------------------------------------------
# environment: this machine
# ------------------------------------------------------------------------------------------------
def check_environment(cfg: DictConfig) -> None:
    import torch.distributed as dist

    from diffrun.launching import distributed
    from diffrun.training.environment import resolve_device

    device = resolve_device(str(cfg.device))
    precision = option(cfg.precision)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision=fp16 on device={device.type} needs CUDA (GradScaler); "
                          f"allowed here auto, fp32, bf16")
    launched = distributed.env_info()
    world = launched.world_size if launched.enabled else cfg.dist.devices
    if world > 1:
        backend = distributed.backend_for(cfg.dist.backend, device)
        available = {"gloo": dist.is_available() and dist.is_gloo_available(),
                     "nccl": dist.is_available() and dist.is_nccl_available() and device.type == "cuda",
                     "mpi": dist.is_available() and dist.is_mpi_available()}
        if not available[backend]:
            usable = ", ".join(["auto", *(b for b, ok in available.items() if ok)])
            raise ConfigError(f"dist.backend={show(str(cfg.dist.backend))} ({backend}) is not available with "
                              f"device={device} here; allowed {usable}")
        if backend == "nccl" and not launched.enabled and cfg.dist.devices > torch.cuda.device_count():
            raise ConfigError(f"dist.devices={cfg.dist.devices} with nccl needs one GPU per rank, and this machine has "
                              f"{torch.cuda.device_count()}; allowed at most {torch.cuda.device_count()}")
        if cfg.train.batch_size % world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible by "
                              f"the {world} ranks (each draws batch_size / world_size)")
    if cfg.resume not in ("auto", "never", "force"):
        check_resume_file(cfg)
    if cfg.model.get("init_from"):
        from diffrun.training.export import read

        read(cfg.model.init_from, "model.init_from")          # ConfigError naming model.init_from
    if cfg.eval.enabled and cfg.eval.inception_weights is not None:
        path = Path(cfg.eval.inception_weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.inception_weights={show(cfg.eval.inception_weights)}: no such file; allowed a "
                              f"torch-fidelity Inception state dict, or null to search the cache")
    if cfg.eval.enabled and cfg.eval.reference_stats is not None:
        from diffrun.evaluation.reference import read_reference_statistics

        read_reference_statistics(cfg.eval.reference_stats)   # ConfigError naming eval.reference_stats
    check_dataset_files(cfg)


def check_resume_file(cfg: DictConfig) -> None:
    """`resume=<path>` is a checkpoint diffrun wrote: read and verified here, before any folder is made."""
    from diffrun.errors import CheckpointError
    from diffrun.training import checkpoint

    allowed = "allowed auto, never, force, or a checkpoint written by diffrun (<run>/checkpoints/ckpt_<step>.pt)"
    path = Path(cfg.resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={show(cfg.resume)}: no such checkpoint; {allowed}")
    try:
        state = checkpoint.load(path, bool(cfg.checkpoint.get("allow_unverified", False)),
                                bool(cfg.checkpoint.get("allow_pickle", False)))
    except CheckpointError as exc:
        raise ConfigError(f"resume={show(cfg.resume)}: {exc}") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise ConfigError(f"resume={show(cfg.resume)}: not a diffrun training checkpoint (it holds no model, optimizer "
                          f"and step); {allowed}")


def check_dataset_files(cfg: DictConfig) -> None:
    """The data a loader will read is there (CIFAR may be missing where `download=true`: the loader fetches it,
    and offline it stops naming the archive to provide); a latent folder matches the config, and what decoding
    and FID need of it is on this machine."""
    from diffrun.data.loaders import (IMAGE_SUFFIXES, cifar_archive, cifar_folder, cifar_paths, load_celeba,
                                      load_cifar, load_image_folder, load_imagenet64, load_latents)

    target, spec = _loader(cfg)
    key = "dataset.root" if "root" in cfg.dataset else "dataset.loader.root"
    if target is load_cifar:
        folder, (archive, _url) = cifar_folder(spec["release"]), cifar_archive(spec["release"])
        root = Path(spec["root"]).expanduser()
        if root.exists() and not root.is_dir():
            raise DataError(f"dataset.loader.root={show(spec['root'])} is a file; allowed a folder that contains "
                            f"{folder}/")
        missing = [p for p in cifar_paths(spec["release"], spec["root"], spec.get("split", "train")) if not p.exists()]
        if missing and not spec.get("download", True):
            raise DataError(f"dataset.loader.root={show(spec['root'])} does not hold {folder}/{missing[0].name}: "
                            f"allowed a folder that contains {folder}/ (extract {archive} there), or "
                            f"dataset.loader.download=true to fetch it")
    elif target is load_image_folder:
        root = Path(spec["root"]).expanduser()
        if not root.is_dir():
            raise DataError(f"{key}={show(spec['root'])} is not a directory; allowed a folder of "
                            f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")):
            raise DataError(f"{key}={show(spec['root'])} holds no images; allowed a folder of "
                            f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images (searched recursively)")
    elif target in (load_imagenet64, load_celeba):
        if not Path(spec["root"]).expanduser().is_dir():
            raise DataError(f"{key}={show(spec['root'])} is not a directory; allowed the folder docs/data.md describes "
                            f"for dataset={cfg.dataset.get('name')}")
    elif target is load_latents:
        check_latent_files(cfg, spec, key)


def check_latent_files(cfg: DictConfig, spec: dict, key: str) -> None:
    """meta.json agrees with the config (shape, scale factor, classes); the VAE that decodes samples is on this
    machine when samples or FID are wanted; FID has a pixel reference (original images or statistics)."""
    from diffrun.data.latents import check_meta, missing_vae_message, read_meta, vae_location

    meta = read_meta(spec["root"], key)
    check_meta(meta, spec["root"], cfg.dataset.channels, cfg.dataset.image_size, spec.get("scale_factor"),
               cfg.dataset.get("num_classes", 0))
    vae = spec.get("vae") or meta["vae"]
    if (cfg.sample.num_images > 0 or cfg.eval.enabled) and vae_location(vae) is None:
        raise DataError(missing_vae_message(vae, "dataset.loader.vae"))
    reference = spec.get("reference_root")
    if cfg.eval.enabled and reference is None and cfg.eval.get("reference_stats") is None:
        raise ConfigError("eval.enabled=true on latents: FID compares pixels, so it needs "
                          "dataset.loader.reference_root=<folder of the original images> or "
                          "eval.reference_stats=<precomputed statistics>; or set eval.enabled=false")
    if cfg.eval.enabled and reference is not None and not Path(reference).expanduser().is_dir():
        raise DataError(f"dataset.loader.reference_root={show(reference)} is not a directory; allowed the folder "
                        f"of the original images the latents were encoded from")


def check_writable_dir(path: str | Path, key: str) -> None:
    """`path` can be made: its nearest existing ancestor is a folder in which a folder can be created (probed
    with a temporary folder, removed at once: file permissions alone do not tell, e.g. for root or /proc)."""
    import tempfile

    target = Path(path).expanduser().absolute()
    ancestor = next(p for p in (target, *target.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={show(str(path))}: {ancestor} is a file; allowed a writable folder")
    try:
        Path(tempfile.mkdtemp(prefix=".diffrun-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise ConfigError(f"{key}={show(str(path))}: cannot create folders in {ancestor} ({exc.strerror or exc}); "
                          f"allowed a writable folder") from None
