"""Loss-weighting and timestep-sampling strategies (conf/weighting/*.yaml; table in docs/strategies.md)."""
from diffrun.strategies.adaptive_histogram import AdaptiveHistogram
from diffrun.strategies.adaptive_timestep import AdaptiveTimestep, BetaPolicy
from diffrun.strategies.base import NoiseDraw, Strategy, uniform_t_log_density
from diffrun.strategies.densities import EDM, LogitNormal, LogNormal
from diffrun.strategies.importance import ImportanceSampling
from diffrun.strategies.speed import SpeeD, SpeeDP2
from diffrun.strategies.variance_aware import BinnedVariance, VarianceAware
from diffrun.strategies.weights import (
    P2,
    SNR,
    Debiased,
    MinSNR,
    Sigmoid,
    SNRPlusOne,
    SoftMinSNR,
    TruncatedSNR,
    Uniform,
)

__all__ = [
    "NoiseDraw",
    "Strategy",
    "uniform_t_log_density",
    # closed-form weights, t ~ U
    "Uniform",
    "MinSNR",
    "SNR",
    "TruncatedSNR",
    "SNRPlusOne",
    "SoftMinSNR",
    "P2",
    "Debiased",
    "Sigmoid",
    # noise-level densities
    "LogNormal",
    "EDM",
    "LogitNormal",
    # adaptive
    "ImportanceSampling",
    "SpeeD",
    "SpeeDP2",
    "AdaptiveHistogram",
    "VarianceAware",
    "BinnedVariance",
    "AdaptiveTimestep",
    "BetaPolicy",
]
