"""`diffrun-eval images=FOLDER dataset=NAME [key=value ...]`: FID/KID of a folder of images against a dataset, as
EDM's `fid.py calc --images=... --ref=...`.

The reference is the one a run of that dataset is scored against (the training set, `eval.num_reference` of it, or
`eval.reference_stats`), with the same Inception weights and KID settings (protocol.py: `evaluate_images`), so the
number compares with a run's own FID. The folder's images must have the dataset's size and channels.
"""
from __future__ import annotations

from pathlib import Path

from diffrun import conf_dir
from diffrun.building import build
from diffrun.data.loaders import load_image_folder
from diffrun.errors import ConfigError
from diffrun.evaluation.protocol import evaluate_images
from diffrun.training.environment import resolve_device
from diffrun.validation import check_dataset_files, validate


def score_folder(folder: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra


    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"images={folder!r}: not a folder; allowed a folder of PNG/JPEG images (EDM's fid.py calc)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    validate(cfg, environment=False)
    check_dataset_files(cfg)
    images = load_image_folder(folder, cfg.dataset.image_size, cfg.dataset.channels, random_flip=False,
                               resize=False).materialize()
    device = str(resolve_device(str(cfg.device)))
    return {**evaluate_images(images, build(cfg.dataset.loader), cfg.eval, cfg.dataset, device),
            "images": str(folder)}
