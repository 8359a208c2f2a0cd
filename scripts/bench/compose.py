"""The benchmark's Trainer: the real Hydra config with synthetic CIFAR-shaped data, and every strategy built as the
Trainer builds it."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from diffrun.building import build
from diffrun.validation import validate
from diffrun.data import ArraySource

from bench.measure import error_text


def synthetic_cifar(num_images: int = 1024, image_size: int = 32, channels: int = 3, seed: int = 0,
                    random_flip: bool = True) -> ArraySource:
    """CIFAR-shaped random uint8 images: the dataset loader the benchmark puts in the config."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, channels, image_size, image_size), dtype=torch.uint8,
                           generator=generator)
    return ArraySource(images, "synthetic_cifar", random_flip)


def compose(overrides: list[str], num_images: int, seed: int) -> DictConfig:
    """The run config Hydra would compose for `diffrun dataset=cifar10 ...`, with the synthetic loader."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffrun.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["dataset=cifar10", *overrides])
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.dataset.loader = {"_target_": f"{__name__}.synthetic_cifar", "num_images": num_images,
                              "image_size": cfg.dataset.image_size, "channels": cfg.dataset.channels,
                              "seed": seed, "random_flip": True}
    return cfg


def weighting_names() -> list[str]:
    from diffrun.cli import CONF_DIR

    names = sorted(p.stem for p in (Path(CONF_DIR) / "weighting").glob("*.yaml"))
    return ["uniform", *[n for n in names if n != "uniform"]]


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides every Trainer and strategy of the benchmark is composed with."""
    base = [f"model={args.model}", f"device={args.device}", f"precision={args.precision}", f"seed={args.seed}",
            f"train.batch_size={args.batch}", f"train.compile={str(args.compile).lower()}",
            f"train.channels_last={str(args.channels_last).lower()}", "train.progress=false",
            "eval.enabled=false", "sample.num_images=0", "resume=never"]
    return [*base, "train.capture=compile"] if args.capture else base


def weighting_overrides(args: argparse.Namespace, strategy_name: str) -> list[str]:
    """`--weighting-override NAME:KEY=VALUE` (checked by `main`) → `weighting.KEY=VALUE` for strategy NAME only."""
    return [f"weighting.{item.partition(':')[2]}" for item in args.weighting_override
            if item.partition(":")[0] == strategy_name]


def build_strategies(args: argparse.Namespace, base: list[str], trainer) -> tuple[list[str], dict, dict]:
    """(names asked for with uniform first, {name: bound strategy}, {name: error}); uniform is the Trainer's own
    unless it has overrides."""
    wanted = weighting_names() if args.strategies == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "uniform" not in wanted:
        wanted = ["uniform", *wanted]
    strategies, errors = {}, {}
    for strategy_name in wanted:
        try:
            extra = weighting_overrides(args, strategy_name)
            cfg = compose([*base, f"weighting={strategy_name}", *extra], args.num_images, args.seed)
            own = strategy_name == "uniform" and not extra
            strategies[strategy_name] = trainer.strategy if own else build_strategy(cfg, trainer)
        except Exception as exc:
            errors[strategy_name] = error_text(exc)
    return wanted, strategies, errors


def build_strategy(cfg: DictConfig, trainer):
    """What `Trainer.__init__` does with `cfg.weighting`, bound to the trainer's schedule and device."""
    validate(cfg)
    strategy = build(cfg.weighting, _keep_meta=("name", "citation"))
    strategy.bind(trainer.schedule, cfg.model.prediction, cfg.model.sigma_data, trainer.parts.comm).to(trainer.device)
    return strategy


def strategy_state(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.state_dict().items() if torch.is_tensor(v)}


def changed_state(before: dict[str, torch.Tensor], strategy) -> list[str]:
    """Names of the strategy's state tensors that changed since `before` (adaptive strategies learn)."""
    after = strategy_state(strategy)
    return sorted(k for k, v in after.items() if k not in before or not torch.equal(before[k], v))
