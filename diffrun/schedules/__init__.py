"""Noise schedules, all written as a log-SNR curve λ(t) on continuous t ∈ [0, 1].

Every schedule is variance preserving: z_t = α_t x + σ_t ε with α² = sigmoid(λ), σ² = sigmoid(−λ),
so a schedule only has to say λ(t) (and its inverse, for strategies that sample λ directly).
t = 0 is the clean end (λ_max), t = 1 the noisy end (λ_min).
"""
from diffrun.schedules.base import NoiseSchedule, alpha_sigma, snr
from diffrun.schedules.curves import (
    CosineSchedule,
    EDMSchedule,
    LinearSchedule,
    ShiftedCosineSchedule,
)

__all__ = [
    "NoiseSchedule",
    "alpha_sigma",
    "snr",
    "LinearSchedule",
    "CosineSchedule",
    "ShiftedCosineSchedule",
    "EDMSchedule",
]
