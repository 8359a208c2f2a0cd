"""What a sampler is asked to do (`sample.*` / `eval.*` in the config), checked before any work."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum

import torch

from diffrun.config import option
from diffrun.errors import ConfigError

SAMPLERS = ("ddim", "ddpm", "ddpm_continuous", "heun")
DDPM_VARIANCES = ("fixed_large", "fixed_small", "learned")
PRECISIONS = ("fp32", "bf16", "fp16", "train")


def network_evaluations(sampler: str, steps: int) -> int:
    """NFE: one per step, and Heun's 2nd-order correction on every step but the last (EDM: 18 steps = 35).
    A classifier-free-guided step evaluates the network once on a doubled batch and counts once."""
    return 2 * steps - 1 if sampler == "heun" else steps


@dataclass(frozen=True)
class SamplerOptions:
    sampler: str = "ddim"               # ddim | ddpm (discrete T-step grid) | ddpm_continuous | heun
    steps: int = 50                     # denoising steps (ddpm: respaced subset of the T-step grid; T = all of it)
    eta: float = 0.0                    # ddim: 0 deterministic, 1 = DDPM posterior variance (Song et al. 2021, Eq. 16)
    clip_x0: bool | None = None         # clip x̂0 to [−1, 1]; None: ddim/ddpm clip (improved-diffusion), heun not (EDM)
    ddpm_variance: str = "fixed_large"  # ddpm: β_t (fixed_large), posterior β̃_t (fixed_small), or the model's (learned)
    rho: float = 7.0                    # heun: EDM's ρ (Karras et al. 2022, Eq. 5)
    sigma_min: float = 0.002            # heun: σ range, clipped to the schedule's (EDM's net.sigma_min/max)
    sigma_max: float = 80.0
    s_churn: float = 0.0                # heun: EDM's stochasticity (Algorithm 2); 0 = deterministic
    s_min: float = 0.0                  # heun: churn only for σ ∈ [s_min, s_max]
    s_max: float = math.inf
    s_noise: float = 1.0                # heun: std of the added noise relative to the σ increase
    cfg_scale: float = 1.0              # classifier-free guidance s: uncond + s·(cond − uncond); 1 = conditional only
    guidance_sigma_min: float | None = None  # guide only for σ ∈ (min, max] (Kynkäänniemi et al. 2024); None: 0 / ∞
    guidance_sigma_max: float | None = None
    key: str = "sample"                 # config prefix named in error messages (sample, eval)

    def __post_init__(self) -> None:
        for f in fields(self):  # enums from the config arrive as Enum members
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                object.__setattr__(self, f.name, option(value))
        self._check()

    @property
    def nfe(self) -> int:
        return network_evaluations(self.sampler, self.steps)

    @property
    def clips(self) -> bool:
        return self.sampler != "heun" if self.clip_x0 is None else self.clip_x0

    def _fail(self, name: str, allowed: str) -> None:
        raise ConfigError(f"{self.key}.{name}={getattr(self, name)!r} is not allowed: {allowed}")

    def _number(self, name: str, ok, allowed: str, finite: bool = True) -> None:
        value = getattr(self, name)
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value)
                or (finite and math.isinf(value)) or not ok(value)):
            self._fail(name, allowed)

    def _check(self) -> None:
        if self.sampler not in SAMPLERS:
            self._fail("sampler", f"one of {', '.join(SAMPLERS)}")
        least = 2 if self.sampler == "heun" else 1
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < least:
            self._fail("steps", f"an integer >= {least}"
                       + (" for heun (EDM's grid divides by steps − 1; 18 steps = 35 NFE)" if least == 2 else ""))
        self._number("eta", lambda v: 0 <= v <= 1, "a number in [0, 1] (0: DDIM, 1: DDPM posterior variance)")
        if self.clip_x0 not in (None, True, False):
            self._fail("clip_x0", "true, false or null (the sampler's own default)")
        if self.ddpm_variance not in DDPM_VARIANCES:
            self._fail("ddpm_variance", f"one of {', '.join(DDPM_VARIANCES)}")
        self._number("rho", lambda v: v > 0, "a finite number > 0 (7 in EDM)")
        self._number("sigma_min", lambda v: v > 0, "a finite number > 0 (0.002 in EDM)")
        self._number("sigma_max", lambda v: v > self.sigma_min, f"a finite number > sigma_min = {self.sigma_min}")
        self._number("s_churn", lambda v: v >= 0, "a finite number >= 0 (0: deterministic Heun)")
        self._number("s_min", lambda v: v >= 0, "a finite number >= 0")
        self._number("s_max", lambda v: v >= self.s_min, f"a number >= s_min = {self.s_min} (inf allowed)",
                     finite=False)
        self._number("s_noise", lambda v: v > 0, "a finite number > 0 (1 = no noise inflation; EDM used 1.003-1.007)")
        self._number("cfg_scale", lambda v: v >= 0,
                     "a finite number >= 0 (0: unconditional, 1: conditional, no guidance)")
        if self.guidance_sigma_min is not None:
            self._number("guidance_sigma_min", lambda v: v >= 0, "null or a finite number >= 0")
        if self.guidance_sigma_max is not None:
            low = self.guidance_sigma_min or 0.0
            self._number("guidance_sigma_max", lambda v: v > low, f"null or a number > guidance_sigma_min = {low}",
                         finite=False)

    def guided_at(self, sigma: float) -> bool:
        """Whether guidance applies at noise level σ (EDM's σ: z/α = x + σ n): σ ∈ (guidance_sigma_min, max]."""
        low = self.guidance_sigma_min if self.guidance_sigma_min is not None else 0.0
        high = self.guidance_sigma_max if self.guidance_sigma_max is not None else math.inf
        return low < sigma <= high

    @classmethod
    def from_config(cls, node, key: str) -> "SamplerOptions":
        """From a `sample` or `eval` config node; keys it does not have keep their defaults."""
        names = [f.name for f in fields(cls) if f.name != "key"]
        given = {name: node[name] for name in names if name in node}
        return cls(**given, key=key)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "key"}


def autocast_dtype(precision, train_dtype: torch.dtype | None, key: str = "sample") -> torch.dtype | None:
    """The autocast dtype for `sample.precision` / `eval.precision`: fp32 → None (no autocast), bf16, fp16, or
    `train`: the training run's own autocast dtype (None when it trains in fp32)."""
    precision = option(precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}.precision={precision!r} is not allowed: one of {', '.join(PRECISIONS)}")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "train": train_dtype}[precision]
