"""Schedule formulas against hand-computed values (METHODS.md §6) and their inverses."""
import math

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffrun.building import build
from diffrun.errors import ConfigError
from diffrun.schedules import (CosineSchedule, EDMSchedule, LinearSchedule, QuadSchedule, ShiftedCosineSchedule,
                               alpha_sigma)

CONF = Path(__file__).resolve().parents[1] / "conf" / "schedule"


def test_alpha_sigma_variance_preserving():
    lam = torch.linspace(-20, 20, 101, dtype=torch.float64)
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(a**2 / s**2), lam)


def test_linear_discrete_matches_ddpm_product():
    lam = LinearSchedule().discrete_logsnr(1000)
    # hand computation: ᾱ_1 = 1 − 1e-4 → λ_1 = log(0.9999/1e-4) = 9.2102
    assert lam[0].item() == pytest.approx(math.log(0.9999 / 1e-4), abs=1e-6)
    assert lam[-1].item() == pytest.approx(-10.12, abs=0.01)
    assert lam[499].item() == pytest.approx(-2.46, abs=0.01)
    assert int((lam > 0).sum()) in range(257, 261)  # λ = 0 at t ≈ 259


def test_linear_continuous_close_to_discrete():
    sched = LinearSchedule()
    cont = sched.logsnr(torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert cont[1].item() == pytest.approx(-math.log(math.expm1(0.1 + 9.95)), rel=1e-9)
    assert cont[0].item() == pytest.approx(sched.discrete_logsnr(1000)[499].item(), abs=0.05)


def test_cosine_values():
    sched = CosineSchedule()
    lam = sched.discrete_logsnr(1000)
    assert lam[0].item() == pytest.approx(10.10, abs=0.05)           # METHODS.md: λ_1 = 10.10
    assert int((lam > 0).sum()) in range(494, 499)                  # λ = 0 at t ≈ 496
    assert lam[-1].item() == pytest.approx(-20.0)                   # clipped
    mid = sched.logsnr(torch.tensor(0.5, dtype=torch.float64)).item()
    s = 0.008
    f0 = math.cos(math.pi / 2 * s / (1 + s)) ** 2
    abar = math.cos(math.pi / 2 * (0.5 + s) / (1 + s)) ** 2 / f0
    assert mid == pytest.approx(math.log(abar / (1 - abar)), rel=1e-9)


def test_edm_values():
    sched = EDMSchedule()
    assert sched.logsnr_max == pytest.approx(-2 * math.log(0.002))
    assert sched.logsnr_min == pytest.approx(-2 * math.log(80.0))


def test_shifted_cosine_shift():
    base = ShiftedCosineSchedule(image_size=64, base_resolution=64)
    shifted = ShiftedCosineSchedule(image_size=32, base_resolution=64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    torch.testing.assert_close(shifted.logsnr(t) - base.logsnr(t), torch.full_like(t, 2 * math.log(2)))


@pytest.mark.parametrize("sched", [LinearSchedule(), QuadSchedule(), CosineSchedule(), ShiftedCosineSchedule(),
                                   EDMSchedule()], ids=lambda s: s.name)
def test_monotone_and_inverse(sched):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    lam = sched.logsnr(t)
    assert torch.all(lam[1:] < lam[:-1]), "λ(t) must decrease"
    torch.testing.assert_close(sched.t_of_logsnr(lam), t, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# quad (tqch/ddpm-torch, Kim et al.'s CIFAR-10 config)
# ------------------------------------------------------------------------------------------------
def test_quad_discrete_is_the_ddpm_product_of_squared_linspace():
    lam = QuadSchedule().discrete_logsnr(1000)
    betas = torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2      # ddpm-torch get_beta_schedule
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(lam, torch.log(abar / (1 - abar)), rtol=0, atol=1e-12)
    assert lam[0].item() == pytest.approx(math.log(0.9999 / 1e-4), abs=1e-6)         # β_1 = 1e-4 as linear's
    assert lam[-1].item() == pytest.approx(-7.22, abs=0.005)                         # METHODS.md §6
    assert int((lam > 0).sum()) == 418                                               # λ = 0 at t ≈ 418


def test_quad_continuous_agrees_with_the_discrete_table():
    """λ(k/T) of the continuous-β form within LinearSchedule's tolerance (0.05) at every k = 1..1000."""
    sched = QuadSchedule()
    k = torch.arange(1, 1001, dtype=torch.float64)
    gap = (sched.logsnr(k / 1000) - sched.discrete_logsnr(1000)).abs()
    assert gap.max().item() < 0.05, gap.max()
    # B(1) = 1000·((√β_T)³ − (√β_1)³)/(3(√β_T − √β_1)) in closed form
    a, b = math.sqrt(1e-4), math.sqrt(0.02)
    integral = 1000 * (b**3 - a**3) / (3 * (b - a))
    assert sched.logsnr_min == pytest.approx(-math.log(math.expm1(integral)), rel=1e-12)


def test_beta_schedules_rescale_for_other_T():
    """T ≠ 1000: betas × 1000/T (improved-diffusion's linear rule, applied to quad too)."""
    for sched, base in ((LinearSchedule(), torch.linspace(1e-4, 0.02, 250, dtype=torch.float64)),
                        (QuadSchedule(), torch.linspace(1e-4**0.5, 0.02**0.5, 250, dtype=torch.float64) ** 2)):
        abar = torch.cumprod(1 - 4 * base, 0)
        torch.testing.assert_close(sched.discrete_logsnr(250), torch.log(abar / (1 - abar)), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# discrete time and range checks
# ------------------------------------------------------------------------------------------------
def test_timesteps_moves_the_range_to_the_table():
    sched = LinearSchedule(timesteps=1000)
    table = sched.discrete_logsnr(1000)
    assert sched.logsnr_min == table[-1].item() and sched.logsnr_max == table[0].item()
    assert LinearSchedule().logsnr_min == pytest.approx(-10.05, abs=0.01)             # continuous λ(1)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("timesteps", [None, 1000])
def test_every_schedule_config_builds_continuous_and_discrete(path, timesteps):
    node = OmegaConf.load(path)
    assert "timesteps" in node and node.timesteps is None
    node.timesteps = timesteps
    if "image_size" in node:  # ${dataset.image_size} outside a run
        node.image_size = 32
    sched = build(node)
    assert sched.timesteps == timesteps and sched.logsnr_min < sched.logsnr_max


@pytest.mark.parametrize("make,match", [
    (lambda: CosineSchedule(s=-1.0), r"schedule\.s=-1\.0 is out of range: allowed \[0, ∞\)"),
    (lambda: CosineSchedule(s=-0.5), r"schedule\.s=-0\.5"),
    (lambda: CosineSchedule(s=float("nan")), r"schedule\.s=nan"),
    (lambda: CosineSchedule(logsnr_min=float("nan")), r"schedule\.logsnr_min=nan"),
    (lambda: CosineSchedule(logsnr_min=-math.inf), r"schedule\.logsnr_min=-inf"),
    (lambda: CosineSchedule(logsnr_min=40.0), r"schedule\.logsnr_min=40\.0 is out of range: allowed \(−∞, 27\.63\)"),
    (lambda: LinearSchedule(beta_start=0.0), r"schedule\.beta_start=0\.0"),
    (lambda: LinearSchedule(beta_end=1.5), r"schedule\.beta_end=1\.5 is out of range: allowed \(schedule\.beta_start=0\.0001, 1\)"),
    (lambda: LinearSchedule(beta_start=0.03), r"schedule\.beta_end=0\.02"),
    (lambda: LinearSchedule(beta_end=float("nan")), r"schedule\.beta_end=nan"),
    (lambda: LinearSchedule(t_min=0.0), r"schedule\.t_min=0\.0"),
    (lambda: QuadSchedule(beta_start=-1e-4), r"schedule\.beta_start=-0\.0001"),
    (lambda: QuadSchedule(beta_end=math.inf), r"schedule\.beta_end=inf"),
    (lambda: EDMSchedule(sigma_min=0.0), r"schedule\.sigma_min=0\.0"),
    (lambda: EDMSchedule(sigma_max=math.inf), r"schedule\.sigma_max=inf"),
    (lambda: EDMSchedule(sigma_max=0.001), r"schedule\.sigma_max=0\.001 is out of range: allowed \(0\.002, ∞\)"),
    (lambda: EDMSchedule(rho=0.0), r"schedule\.rho=0\.0"),
    (lambda: EDMSchedule(rho=float("nan")), r"schedule\.rho=nan"),
    (lambda: ShiftedCosineSchedule(image_size=0), r"schedule\.image_size=0"),
    (lambda: ShiftedCosineSchedule(logsnr_min=5.0, logsnr_max=-5.0), r"schedule\.logsnr_max=-5\.0"),
    (lambda: ShiftedCosineSchedule(logsnr_max=math.inf), r"schedule\.logsnr_max=inf"),
    (lambda: CosineSchedule(timesteps=0), r"schedule\.timesteps=0 is out of range: allowed null .* or an integer >= 2"),
    (lambda: CosineSchedule(timesteps=1), r"schedule\.timesteps=1 "),
    (lambda: EDMSchedule(timesteps=-5), r"schedule\.timesteps=-5"),
    (lambda: ShiftedCosineSchedule(timesteps=2.5), r"schedule\.timesteps=2\.5"),
    (lambda: LinearSchedule(timesteps=True), r"schedule\.timesteps=True"),
    (lambda: LinearSchedule(timesteps=20), r"schedule\.timesteps=20 is out of range: allowed null or an integer >= 21"),
    (lambda: QuadSchedule(timesteps=10), r"schedule\.timesteps=10 .* >= 21"),
])
def test_bad_schedule_values_name_key_value_and_range(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_beta_table_too_short_for_its_betas():
    with pytest.raises(ConfigError, match=r"linear schedule on T=10 steps: β_T = 2 >= 1 .* use T >= 21"):
        LinearSchedule().discrete_logsnr(10)
    assert torch.isfinite(LinearSchedule().discrete_logsnr(21)).all()
