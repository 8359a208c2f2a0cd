"""Schedule formulas against hand-computed values (METHODS.md §6) and their inverses."""
import math

import pytest
import torch

from diffrun.schedules import CosineSchedule, EDMSchedule, LinearSchedule, ShiftedCosineSchedule, alpha_sigma


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


@pytest.mark.parametrize("sched", [LinearSchedule(), CosineSchedule(), ShiftedCosineSchedule(), EDMSchedule()],
                         ids=lambda s: s.name)
def test_monotone_and_inverse(sched):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    lam = sched.logsnr(t)
    assert torch.all(lam[1:] < lam[:-1]), "λ(t) must decrease"
    torch.testing.assert_close(sched.t_of_logsnr(lam), t, atol=1e-6, rtol=1e-6)
