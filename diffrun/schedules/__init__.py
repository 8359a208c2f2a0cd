"""Noise schedules, all written as a log-SNR curve λ(t) on continuous t ∈ [0, 1].

Every schedule is variance preserving: z_t = α_t x + σ_t ε with α² = sigmoid(λ), σ² = sigmoid(−λ),
so a schedule only has to say λ(t) (and its inverse, for strategies that sample λ directly).
t = 0 is the clean end (λ_max), t = 1 the noisy end (λ_min). `timesteps = T` puts training on the
DDPM grid t = k/T instead (λ from the exact T-step product where the schedule has betas).
"""
from diffrun.schedules.base import NoiseSchedule, alpha_sigma
from diffrun.schedules.curves import (
    BetaSchedule,
    CosineSchedule,
    EDMSchedule,
    LinearSchedule,
    QuadSchedule,
    ShiftedCosineSchedule,
)

__all__ = [
    "NoiseSchedule",
    "alpha_sigma",
    "BetaSchedule",
    "LinearSchedule",
    "QuadSchedule",
    "CosineSchedule",
    "ShiftedCosineSchedule",
    "EDMSchedule",
]
