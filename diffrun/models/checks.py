"""Checks of the model option: constructor arguments of the backbones (a bad `model.net.<key>` fails when the
model is built, with the key, the value and what is allowed, not after training from deep inside a layer), and
the network built once on the meta device and run on a batch of the dataset's shape (`check_forward`)."""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence

import torch

from diffrun.building import build_failure, build_spec, spec_values
from diffrun.errors import ConfigError, DiffrunError
from diffrun.models.parameterization import Denoiser


def require_int(key: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.net.{key}={value!r}: must be an integer >= {minimum}")


def require_ints(key: str, values, minimum: int = 1, allow_empty: bool = False) -> None:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or (not values and not allow_empty):
        raise ConfigError(f"model.net.{key}={values!r}: must be a {'' if allow_empty else 'non-empty '}list of "
                          f"integers >= {minimum}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"model.net.{key}={list(values)!r}: every entry must be an integer >= {minimum}")


def require_float(key: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                  high_open: bool = True) -> None:
    """low ≤ value < high by default; low_open / high_open make either end strict."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"model.net.{key}={value!r}: must be a finite number in {interval}")


@functools.lru_cache(maxsize=16)
def _check_forward(spec_json: str, prediction: str, sigma_data: float, channels: int, image_size: int,
                learn_sigma: bool = False) -> None:
    """Build the denoiser on the meta device (no memory, no init cost) and run it on a 2-image meta batch, so
    shape errors show here; cached, since a sweep checks the same model for every job."""
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
            raise build_failure("model.net", spec, f"a {channels}x{image_size}x{image_size} image batch", exc) from None
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


def check_forward(spec: dict, prediction: str, sigma_data: float, channels: int, image_size: int,
                  learn_sigma: bool = False) -> None:
    _check_forward(json.dumps(spec, sort_keys=True), prediction, sigma_data, channels, image_size, learn_sigma)
