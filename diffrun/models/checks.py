"""Constructor-argument checks for the backbones: a bad `model.net.<key>` fails when the model is built,
with the key, the value and what is allowed (not after training, from deep inside a layer)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from diffrun.errors import ConfigError


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
