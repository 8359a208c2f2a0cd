"""What a dataset loader checks of its own node before any work. diffrun/validation.py asks the loader that
the dataset option names (`dataset.loader._target_`) through the `checks` its `@checked_by` attached, so a
new dataset brings its checks with its loader and nothing else changes:

    values(spec, dataset)              its arguments (`spec`: the resolved loader node) against the dataset
                                       node's keys (`dataset`: channels, image_size, num_classes, ...)
    files(spec, dataset, key, needs)   the data it will read is on this machine (`key`: the config key that names
                                       the folder; `needs`: what the run will do with the data)
    labels                             whether it gives class labels: True, False, a function of `spec`, or
                                       None (only its files can tell)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hydra.utils import get_object
from omegaconf import DictConfig

from diffrun.building import check_argument_types
from diffrun.checks import check_choice, resolved, show
from diffrun.data.placement import ORDERS, PLACEMENTS
from diffrun.errors import ConfigError


@dataclass(frozen=True)
class Needs:
    """What the run does with the data beyond training on it."""

    decoded: bool          # images are made (sample grids or FID), so latents must be decodable
    fid: bool              # FID is computed
    fid_reference: bool    # ... against the dataset's own images (no eval.reference_stats)


def _nothing(*_args) -> None:
    return None


@dataclass(frozen=True)
class LoaderChecks:
    values: Callable[[dict, dict], None] = _nothing
    files: Callable[[dict, dict, str, Needs], None] = _nothing
    labels: bool | Callable[[dict], bool] | None = None

    def has_labels(self, spec: dict) -> bool | None:
        return self.labels(spec) if callable(self.labels) else self.labels


def checked_by(checks: LoaderChecks):
    """Attach a loader's checks to it (a plain function attribute: Hydra still calls the loader itself)."""
    def attach(loader):
        loader.checks = checks
        return loader
    return attach


def checks_of(loader) -> LoaderChecks:
    """The checks a loader declares; none for a loader without them (a user's own, until it adds some)."""
    return getattr(loader, "checks", LoaderChecks())


def loader_of(dataset: DictConfig):
    """(the loader function `dataset.loader._target_` names, its resolved node)."""
    spec = resolved(dataset.loader)
    try:
        return get_object(spec["_target_"]), spec
    except Exception:
        raise ConfigError(f"dataset.loader._target_={show(spec.get('_target_'))}: not an importable function") from None


def check_dataset(dataset: DictConfig) -> None:
    """The dataset node's own keys, then what its loader checks of them (data/loader_checks.py)."""
    loader, spec = loader_of(dataset)
    check_argument_types(spec, "dataset.loader")
    for key in ("image_size", "channels"):
        if key in spec and spec[key] != dataset[key]:
            raise ConfigError(f"dataset.loader.{key}={show(spec[key])} differs from dataset.{key}={dataset[key]}: "
                              f"set dataset.{key} (the loader follows it)")
    placement, order = dataset.get("placement", "auto"), dataset.get("order", "auto")
    check_choice("dataset.placement", placement, PLACEMENTS)
    check_choice("dataset.order", order, ORDERS)
    if placement == "stream" and order == "iid":
        raise ConfigError("dataset.order='iid' draws from the global RNG on the device and cannot be streamed "
                          "(dataset.placement='stream'): allowed dataset.order=epoch or auto")
    checks_of(loader).values(spec, resolved(dataset))


def check_files(dataset: DictConfig, needs: Needs) -> None:
    """The data the loader will read is on this machine (the loader's own `files` check)."""
    loader, spec = loader_of(dataset)
    key = "dataset.root" if "root" in dataset else "dataset.loader.root"
    checks_of(loader).files(spec, resolved(dataset), key, needs)
