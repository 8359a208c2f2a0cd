"""Every value of a run checked before any work: a walk over the composed config that asks each key's owner.

`validate(cfg)` raises a one-line ConfigError (DataError for data that is not there) naming the key, the value
and what is allowed. Cheapest first:

    complete     no `???` left, every interpolation resolves;
    keys         no key that nothing reads: the schema's sections against config.py's dataclasses, a group
                 option against its node declaration (DatasetNode, ...), `_target_` nodes against their target's
                 signature and argument types (diffrun/building.py);
    values       the ranges the schema declares, NaN/inf in the groups, names that become folders; each owner's
                 own check (sampler settings, EMA, the dataset's loader, optimizer, augmentation, learned
                 variance); the rule between groups written here (class conditioning);
    groups       the schedule (λ(t) probed), the strategy bound to it, the network run on a meta batch, the
                 optimizer and its learning-rate schedule on one dummy parameter, the step capture;
    environment  devices, backends, the files the run reads (not with `environment=False`: a sweep's submitter).

Once per process entry (docs/architecture.md): before Hydra makes a single run's folder, for each job of a multirun
before the first starts (launching/preflight.py), in a job started in a process of its own (a SLURM job).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrun import distributed
from diffrun.building import (build_failure, build_spec, check_schema_keys, check_target_keys, spec_without_meta,
                              unknown_key)
from diffrun.checks import check_choice, check_folder_name, check_number, nan_keys, resolved, show
from diffrun.config import GROUP_NODES, GROUPS, META_KEYS, RunConfig, check_budget, declared_ranges, option
from diffrun.data import augment, loader_checks
from diffrun.data.loader_checks import Needs
from diffrun.errors import ConfigError, DiffrunError
from diffrun.evaluation.reference import read_reference_statistics
from diffrun.models import learned_variance
from diffrun.models.checks import check_forward
from diffrun.models.parameterization import PREDICTIONS
from diffrun.sampling import SamplerOptions
from diffrun.schedules.base import build_schedule
from diffrun.training import capture, checkpoint, ema, export, optim
from diffrun.training.callbacks import build_callbacks
from diffrun.training.environment import check_device


def validate(cfg: DictConfig, environment: bool = True) -> None:
    """All checks of the module docstring, in its order. Raises ConfigError / DataError (one line each)."""
    check_complete(cfg)
    check_keys(cfg)
    check_values(cfg)
    check_groups(cfg)
    build_callbacks(cfg)     # each callback checks its own node (`~callbacks.wandb`: no wandb.* check)
    if environment:
        check_environment(cfg)


def check_complete(cfg: DictConfig) -> None:
    for key in _missing(cfg, ""):
        group = key.split(".")[0]
        name = OmegaConf.select(cfg, f"{group}.name", default=None) if group in GROUPS else None
        where = f"{group}={name} sets no default for it" if name else "it has no default"
        raise ConfigError(f"{key}=??? is required: {where}; add {key}=<value> to the command line")
    for key in (k for k in cfg.keys() if k != "hydra"):  # the callback sees Hydra's own node too
        try:
            resolved(cfg[key])
        except OmegaConfBaseException as exc:
            full_key = getattr(exc, "full_key", None) or key
            raise ConfigError(f"{full_key}: {str(exc).splitlines()[0]}") from None


def _missing(node: DictConfig | ListConfig, prefix: str):
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if prefix == "" and key == "hydra":
            continue
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            yield from _missing(child, f"{prefix}{key}.")


def check_keys(cfg: DictConfig) -> None:
    check_schema_keys(cfg, RunConfig, "")
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or node._is_none():
            raise ConfigError(f"{group}={show(resolved(node))}: allowed a {group} option (conf/{group}/*.yaml), "
                              f"e.g. {group}=<name>")
        chosen = f"{group}={node.get('name')}"
        if group not in GROUP_NODES:                 # the option is a `_target_` node itself
            if "_target_" not in node:
                raise ConfigError(f"{group}._target_ is required: {chosen} does not set it; allowed a class path")
            check_target_keys(node, group, top_level=True)
            continue
        declared = fields(GROUP_NODES[group])
        for item in declared:
            if item.default is item.default_factory and item.name not in node:    # both MISSING: required
                raise ConfigError(f"{group}.{item.name} is required: {chosen} does not set it; add "
                                  f"{group}.{item.name}=<value>")
        text = json.dumps(OmegaConf.to_container(node, resolve=False))
        interpolated = set(re.findall(rf"\$\{{(?:\.\.|{group}\.)(\w+)\}}", text))   # `root: ${..root}` reads root
        allowed = {item.name for item in declared
                   if not item.metadata.get("only_if_interpolated") or item.name in interpolated} | set(META_KEYS)
        for key in node.keys():
            if key not in allowed:
                raise unknown_key(group, key, node, allowed, chosen)
            child = node._get_node(key)
            if isinstance(child, DictConfig) and "_target_" in child:
                check_target_keys(node[key], f"{group}.{key}")


def check_values(cfg: DictConfig) -> None:
    # --- the schema and the group nodes: declared ranges ----------------------------------------------------
    for key, allowed, integer in declared_ranges():
        check_number(key, OmegaConf.select(cfg, key, default=None), allowed, integer)
    for group in GROUPS:
        for key in nan_keys(resolved(cfg[group]), group):
            raise ConfigError(f"{key}=nan is not a number: allowed a finite value")
    for key in (*(f"{g}.name" for g in GROUPS), "name", "sweep_name"):  # `name` is made of the group names
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None or key in ("name", "sweep_name"):
            check_folder_name(key, value)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(cfg.device)):
        raise ConfigError(f"device={show(cfg.device)}: allowed auto, cpu, cuda, cuda:N, mps")
    if not (cfg.resume in ("auto", "never", "force") or str(cfg.resume).endswith((".pt", ".pth"))):
        raise ConfigError(f"resume={show(cfg.resume)}: allowed auto, never, force (continue a run whose config "
                          f"changed), or a path to a .pt checkpoint")
    check_choice("dist.backend", cfg.dist.backend, distributed.BACKENDS)
    if cfg.stats.logsnr_min >= cfg.stats.logsnr_max:
        raise ConfigError(f"stats.logsnr_min={cfg.stats.logsnr_min} must be < stats.logsnr_max={cfg.stats.logsnr_max}")
    if cfg.eval.reference_stats is not None and cfg.eval.num_reference is not None:
        raise ConfigError(f"eval.num_reference={cfg.eval.num_reference} with eval.reference_stats="
                          f"{show(cfg.eval.reference_stats)}: the statistics file is the reference; set one of them")
    distributed.check_run_batch(cfg.train.batch_size, cfg.dist.devices)
    check_budget(cfg.train)

    # --- each owner's own values ---------------------------------------------------------------------------
    for section in ("sample", "eval"):
        SamplerOptions.from_config(resolved(cfg[section]), section)
    ema.check_settings(cfg.ema.decay, cfg.ema.warmup, cfg.ema.halflife_kimg, cfg.ema.rampup_ratio)
    loader_checks.check_dataset(cfg.dataset)
    check_choice("model.prediction", cfg.model.get("prediction"), PREDICTIONS)
    check_choice("model.learn_sigma", cfg.model.get("learn_sigma", False), (True, False))
    optim.check_settings(cfg.optimizer)
    augment.check_settings(resolved(cfg.augment), resolved(cfg.model.net), cfg.model.get("name"))

    # --- rules between groups ------------------------------------------------------------------------------
    learned_variance.check_settings(bool(cfg.model.get("learn_sigma", False)), cfg.schedule.get("timesteps"),
                                    {s: option(cfg[s].ddpm_variance) for s in ("sample", "eval")})
    check_conditioning(cfg)


def check_conditioning(cfg: DictConfig) -> None:
    """Labels, model and guidance agree: a conditional model gets labels of its classes, and only a model that
    learned the null label (conditional, with label dropout) is guided."""
    classes = cfg.dataset.get("num_classes", 0) or 0
    net = resolved(cfg.model.net) if isinstance(cfg.model.get("net"), DictConfig) else {}
    model_classes = net.get("num_classes", 0)
    model_classes = model_classes if isinstance(model_classes, int) and not isinstance(model_classes, bool) else 0
    loader, spec = loader_checks.loader_of(cfg.dataset)
    if classes and loader_checks.checks_of(loader).has_labels(spec) is False:
        raise ConfigError(f"dataset.num_classes={classes}, but dataset={cfg.dataset.get('name')} has no class labels; "
                          f"allowed dataset.num_classes=0 (unconditional)"
                          + (" or dataset.loader.labels=subfolder|dataset_json" if "labels" in spec else ""))
    if model_classes != classes:
        if not classes:
            raise ConfigError(f"model.net.num_classes={model_classes} is a class-conditional model, but "
                              f"dataset.num_classes=0 gives it no labels; set dataset.num_classes={model_classes} "
                              f"(a labelled dataset) or model.net.num_classes=0")
        raise ConfigError(f"dataset.num_classes={classes}, but "
                          + (f"model.net.num_classes={model_classes}; allowed model.net.num_classes={classes}"
                             if "num_classes" in net else f"model={cfg.model.get('name')} takes no class labels; "
                             "allowed a class-conditional network (the U-Nets, DiT, Min-SNR's ViT) or "
                             "dataset.num_classes=0"))
    for section in ("sample", "eval"):
        scale = cfg[section].cfg_scale
        if scale != 1 and not classes:
            raise ConfigError(f"{section}.cfg_scale={scale}: classifier-free guidance needs a class-conditional "
                              f"model, and this one is unconditional (dataset.num_classes=0); allowed "
                              f"{section}.cfg_scale=1")
        if scale != 1 and cfg.train.label_dropout == 0:
            raise ConfigError(f"{section}.cfg_scale={scale} contrasts with the null label, which "
                              f"train.label_dropout=0 never trains; allowed train.label_dropout>0 (DiT 0.1, "
                              f"Min-SNR 0.15) or {section}.cfg_scale=1")


def check_groups(cfg: DictConfig) -> None:
    """Each group built once, cheaply, and used once (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedule = build_schedule(spec_without_meta(cfg, "schedule"))
        prediction, sigma_data = cfg.model.prediction, cfg.model.get("sigma_data", 0.5)
        check_forward(spec_without_meta(cfg, "model.net"), prediction, sigma_data, cfg.dataset.channels,
                      cfg.dataset.image_size, bool(cfg.model.get("learn_sigma", False)))
        weighting = spec_without_meta(cfg, "weighting", keep_meta=("name", "citation"))
        strategy = build_spec(weighting, "weighting")
        try:
            strategy.bind(schedule, prediction, sigma_data)
        except DiffrunError:
            raise
        except Exception as exc:
            use = f"binding to schedule={cfg.schedule.get('name')}"
            raise build_failure("weighting", weighting, use, exc) from None
        try:
            optimizer = optim.build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))], torch.device("cpu"))
            optim.build_lr_schedule(cfg.optimizer, optimizer, cfg.train.steps, cfg.train.batch_size)
        except DiffrunError:
            raise
        except Exception as exc:
            optim_spec = spec_without_meta(cfg, "optimizer.optim")
            raise build_failure("optimizer.optim", optim_spec, "building the optimizer", exc) from None
    if option(cfg.train.capture) == "compile":
        reason = capture.refusal(strategy, fp16=option(cfg.precision) == "fp16", augment=float(cfg.augment.p) > 0,
                                 compiled_network=bool(cfg.train.compile), world_size=cfg.dist.devices,
                                 fused_optimizer=bool(optimizer.defaults.get("fused")))
        if reason is not None:
            raise ConfigError(reason)


def check_environment(cfg: DictConfig) -> None:
    """This machine: the device, precision and backend exist; the files the run reads are there and are data."""
    device = check_device(str(cfg.device), option(cfg.precision))
    distributed.check_backend(cfg.dist.backend, device, cfg.dist.devices)
    if cfg.resume not in ("auto", "never", "force"):
        checkpoint.check_resume_file(cfg.resume, bool(cfg.checkpoint.allow_unverified),
                                     bool(cfg.checkpoint.allow_pickle))
    if cfg.model.get("init_from"):
        export.read(cfg.model.init_from, "model.init_from")              # ConfigError naming model.init_from
    if cfg.eval.enabled and cfg.eval.inception_weights is not None:
        if not Path(cfg.eval.inception_weights).expanduser().is_file():
            raise ConfigError(f"eval.inception_weights={show(cfg.eval.inception_weights)}: no such file; allowed a "
                              f"torch-fidelity Inception state dict, or null to search the cache")
    if cfg.eval.enabled and cfg.eval.reference_stats is not None:
        read_reference_statistics(cfg.eval.reference_stats)               # ConfigError naming eval.reference_stats
    check_dataset_files(cfg)


def check_dataset_files(cfg: DictConfig) -> None:
    """The data the loader will read is on this machine, as far as the run will use it."""
    loader_checks.check_files(cfg.dataset, Needs(
        decoded=cfg.sample.num_images > 0 or bool(cfg.eval.enabled), fid=bool(cfg.eval.enabled),
        fid_reference=bool(cfg.eval.enabled) and cfg.eval.get("reference_stats") is None))


