"""Ancestral (DDPM) and DDIM samplers in continuous log-SNR time, always run with EMA weights."""
from diffrun.sampling.samplers import sample, save_grid, to_uint8

__all__ = ["sample", "save_grid", "to_uint8"]
