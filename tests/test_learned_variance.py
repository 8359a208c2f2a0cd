"""IDDPM's learned variance and hybrid loss (diffrun/models/learned_variance.py), checked in closed form; the
comparison with openai/improved-diffusion itself is scripts/crosscheck/learned_variance.py (docs/samplers.md)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.models.learned_variance import (DiscretePosterior, discretized_gaussian_log_likelihood,
                                             hybrid_vb_term)
from diffrun.models.parameterization import Denoiser
from diffrun.models.unet import UNet
from diffrun.sampling.samplers import sample
from diffrun.schedules import LinearSchedule, alpha_sigma
from diffrun.cli import train

T = 50
TINY_UNET = dict(in_channels=1, image_size=8, channels=8, channel_mult=[1], num_res_blocks=1,
                 attention_resolutions=[])


def ddpm_tables(T: int):
    """Ho et al. 2020 Eq. 6–7 straight from the betas (improved-diffusion's arrays), float64."""
    betas = torch.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return betas, abar, abar_prev, post_var


def test_posterior_is_ddpm_eq_7_from_the_betas():
    betas, abar, abar_prev, post_var = ddpm_tables(T)
    posterior = DiscretePosterior(LinearSchedule(timesteps=T).timestep_table())
    torch.testing.assert_close(posterior.log_beta.exp(), betas, rtol=1e-10, atol=0)
    torch.testing.assert_close(posterior.log_posterior_var[1:].exp(), post_var[1:], rtol=1e-10, atol=0)
    assert posterior.log_posterior_var[0] == posterior.log_posterior_var[1]      # clipped at the first step
    torch.testing.assert_close(posterior.coef_x0, abar_prev.sqrt() * betas / (1 - abar), rtol=1e-10, atol=0)
    torch.testing.assert_close(posterior.coef_z, (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar), rtol=1e-10, atol=0)


def test_learned_range_spans_posterior_to_beta():
    posterior = DiscretePosterior(LinearSchedule(timesteps=T).timestep_table())
    index = torch.tensor([3, 17, T - 1])
    ones = torch.ones(3, 1, 2, 2)
    top, bottom = posterior.learned_log_variance(index, ones), posterior.learned_log_variance(index, -ones)
    torch.testing.assert_close(top[:, 0, 0, 0], posterior.log_beta[index].float())
    torch.testing.assert_close(bottom[:, 0, 0, 0], posterior.log_posterior_var[index].float())
    middle = posterior.learned_log_variance(index, 0 * ones)[:, 0, 0, 0]        # v = 0: the geometric mean
    torch.testing.assert_close(middle, (0.5 * (posterior.log_beta + posterior.log_posterior_var))[index].float())


def test_vb_is_zero_for_the_true_posterior_and_positive_otherwise():
    posterior = DiscretePosterior(LinearSchedule(timesteps=T).timestep_table())
    index = torch.tensor([1, 10, T - 1])
    x0, z = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    v_posterior = -torch.ones_like(x0)                                         # Σ = β̃: the true variance
    assert posterior.vb_bits(index, x0, z, x0, v_posterior).abs().max() < 1e-5
    worse = posterior.vb_bits(index, x0, z, x0 + 0.1, torch.zeros_like(x0))
    assert (worse > 0).all()
    # the KL in closed form for a mean offset δ at Σ = β̃: δ² coef_x0² / (2 β̃) nats per pixel
    delta = 0.1
    offset = posterior.vb_bits(index, x0, z, x0 + delta, v_posterior)
    expected = (delta * posterior.coef_x0[index]) ** 2 / (2 * posterior.log_posterior_var[index].exp()) / math.log(2)
    torch.testing.assert_close(offset.double(), expected, rtol=1e-3, atol=1e-10)


def test_decoder_nll_at_the_first_step():
    """t = 1: the discretised Gaussian. A mean on the pixel with a tiny scale holds all the bin's mass (NLL ≈ 0);
    a wide one spreads it: NLL ≈ −log(2/255 · N(0; 0, s²)) in the interior."""
    x = torch.tensor([-1.0, 0.0, 1.0])
    sharp = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(1e-4)))
    assert sharp.abs().max() < 1e-6
    s = 0.5
    wide = discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([math.log(s)]))
    expected = math.log(2 / 255 / (s * math.sqrt(2 * math.pi)))
    assert abs(float(wide) - expected) < 1e-3
    posterior = DiscretePosterior(LinearSchedule(timesteps=T).timestep_table())
    x0 = torch.zeros(1, 1, 2, 2)
    bits = posterior.vb_bits(torch.tensor([0]), x0, x0, x0, torch.ones_like(x0))
    sigma = math.exp(0.5 * float(posterior.log_beta[0]))
    torch.testing.assert_close(float(bits), -math.log(math.erf(1 / 255 / (sigma * math.sqrt(2)))) / math.log(2),
                               rtol=1e-3, atol=0)


def test_hybrid_term_is_lambda_t_vb_and_stops_the_mean_gradient():
    posterior = DiscretePosterior(LinearSchedule(timesteps=T).timestep_table())
    index = torch.tensor([5, 20])
    x0, z = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    eps_hat = torch.randn(2, 1, 4, 4, requires_grad=True)
    v = torch.zeros(2, 1, 4, 4, requires_grad=True)
    lam = LinearSchedule(timesteps=T).timestep_table(dtype=torch.float32)[index]
    x0_hat, _ = Denoiser(torch.nn.Identity(), "eps").predict_x0_eps(z, lam, eps_hat.detach())
    term = hybrid_vb_term(posterior, T, index, x0, z, x0_hat, v)
    torch.testing.assert_close(term, 0.001 * T * posterior.vb_bits(index, x0, z, x0_hat, v))
    term.sum().backward()
    assert eps_hat.grad is None and v.grad.abs().sum() > 0


def test_learned_sampler_at_the_range_ends_is_fixed_large_and_fixed_small():
    """v ≡ +1 is β_t (fixed_large), v ≡ −1 is β̃_t (fixed_small): same draws, same images."""
    schedule = LinearSchedule(timesteps=T)

    class Constant(torch.nn.Module):
        def __init__(self, v: float):
            super().__init__()
            self.v = v

        def forward(self, x, c_noise):
            return torch.cat([0.3 * x, torch.full_like(x, self.v)], 1)

    for v, fixed in ((1.0, "fixed_large"), (-1.0, "fixed_small")):
        learned = sample(Denoiser(Constant(v), "eps", learn_sigma=True), schedule, (2, 1, 4, 4), steps=10,
                         sampler="ddpm", ddpm_variance="learned", generator=torch.Generator().manual_seed(1))
        reference = sample(Denoiser(lambda x, c: 0.3 * x, "eps"), schedule, (2, 1, 4, 4), steps=10,
                           sampler="ddpm", ddpm_variance=fixed, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(learned, reference, rtol=1e-5, atol=1e-6)


def test_learned_sampler_refuses_a_model_without_variance():
    with pytest.raises(ConfigError, match=r"sample\.ddpm_variance=learned needs a model that learns its variance"):
        sample(Denoiser(UNet(**TINY_UNET), "eps"), LinearSchedule(timesteps=T), (1, 1, 8, 8), steps=2,
               sampler="ddpm", ddpm_variance="learned")


@pytest.mark.parametrize("overrides,match", [
    (["model.learn_sigma=true"], r"model\.learn_sigma=true .* schedule\.timesteps=null"),
    (["sample.ddpm_variance=learned"], r"sample\.ddpm_variance=learned needs a model that learns"),
    (["eval.ddpm_variance=learned"], r"eval\.ddpm_variance=learned needs a model that learns"),
    (["model.learn_sigma=true", "schedule.timesteps=100", "model.net.learn_sigma=false"],
     r"model\.learn_sigma=true needs a network with twice"),
    (["schedule.timesteps=100", "model.net.learn_sigma=true"], r"a net with learn_sigma=true needs model\.learn_sigma"),
    (["model=dit_s_2"], r"schedule\.timesteps=1000 \(DiT, SpeeD"),
    (["model.learn_sigma=3", "schedule.timesteps=100"], r"model\.learn_sigma=3"),
])
def test_learned_variance_config_errors(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(make_cfg(overrides))


def test_dit_trains_with_learned_variance_on_the_discrete_grid(make_cfg):
    """The DiT configs learn Σ, as DiT trains; on DiT's grid they validate, and the suggested keys exist."""
    cfg = make_cfg(["model=dit_s_2", "schedule=linear", "schedule.timesteps=1000", "model.net.depth=1",
                    "model.net.hidden_size=32", "model.net.num_heads=2", "dataset.image_size=8"])
    validate(cfg)
    assert cfg.model.learn_sigma is True and cfg.model.net.learn_sigma is True
    validate(make_cfg(["model=dit_s_2", "model.learn_sigma=false", "model.net.depth=1", "model.net.hidden_size=32",
                       "model.net.num_heads=2", "dataset.image_size=8"]))


@pytest.mark.slow
def test_a_hybrid_run_trains_and_samples_with_its_variance(make_cfg, tmp_path):
    cfg = make_cfg(["model.learn_sigma=true", "schedule=linear", "schedule.timesteps=100", "weighting=min_snr",
                    "sample.sampler=ddpm", "sample.ddpm_variance=learned", "sample.steps=4", "train.steps=3",
                    "checkpoint.every_steps=0"])
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
