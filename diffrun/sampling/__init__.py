"""Samplers (ddim, ddpm on the discrete grid, ddpm_continuous, EDM's heun) with classifier-free guidance;
always run with EMA weights. Formulas, options and their check against the official code: docs/samplers.md."""
from diffrun.sampling.images import save_grid, to_uint8
from diffrun.sampling.options import SAMPLERS, SamplerOptions, autocast_dtype, network_evaluations
from diffrun.sampling.samplers import PerImageGenerator, Samples, run_sampler, sample

__all__ = ["sample", "run_sampler", "Samples", "PerImageGenerator", "SamplerOptions", "SAMPLERS", "network_evaluations",
           "autocast_dtype", "save_grid", "to_uint8"]
