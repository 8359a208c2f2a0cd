"""Strategies: closed forms, conversions, extremes of λ, unbiasedness, checkpoints, no host sync."""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import diffrun.strategies as S

GOOD = torch.tensor(True)   # the step the strategy is told about was applied
from diffrun.building import build
from diffrun.models.parameterization import PREDICTIONS, Denoiser
from diffrun.errors import ConfigError
from diffrun.schedules import (CosineSchedule, EDMSchedule, LinearSchedule, QuadSchedule, ShiftedCosineSchedule,
                               alpha_sigma)

CONF = Path(__file__).resolve().parents[1] / "conf" / "weighting"
CONFIGS = sorted(CONF.glob("*.yaml"))
SCHEDULES = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "shifted_cosine": lambda: ShiftedCosineSchedule(image_size=32),
    "edm": EDMSchedule,
    "quad": QuadSchedule,
}
# CPU-sized overrides so that every config can run its per-step path quickly
SMALL = {"importance": {"num_timesteps": 100}, "speed": {"num_timesteps": 100, "tau": 70}, "speed_p2": {"num_timesteps": 100},
         "adaptive_timestep": {"num_timesteps": 50, "in_channels": 1},
         "adaptive_timestep_fixed_large": {"num_timesteps": 50, "in_channels": 1}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contention on shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _composed(stem: str):
    from conftest import compose_config

    return compose_config([f"weighting={stem}", "dataset=cifar10"], fast=False).weighting   # 3 channels


def composed(path: Path):
    """The weighting option as Hydra composes it (a thin preset inherits its base option's keys)."""
    return copy.deepcopy(_composed(path.stem))


def load(path: Path, **overrides) -> S.Strategy:
    node = composed(path)
    for key, value in {**SMALL.get(path.stem, {}), **overrides}.items():
        node[key] = value
    return build(node, _keep_meta=("name", "citation"))


def lam(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def bound(strategy: S.Strategy, prediction: str = "eps", schedule=None) -> S.Strategy:
    return strategy.bind(schedule or CosineSchedule(), prediction, 0.5)


def toy_loss(logsnr: torch.Tensor) -> torch.Tensor:
    """A fixed positive per-sample loss, peaked at λ = 2 (plays L(λ) in the Monte-Carlo tests)."""
    return 0.2 + torch.exp(-0.5 * (logsnr.double() - 2.0) ** 2) + 0.05 * torch.sigmoid(-logsnr.double())


# ------------------------------------------------------------------------------------------------
# closed forms at a few λ, in the paper's space and converted
# ------------------------------------------------------------------------------------------------
L = [-3.0, -0.5, 0.0, math.log(5.0), 4.0]


def _closed_forms():
    snr = np.exp(np.array(L, dtype=np.float64))
    sd2 = 0.25
    sigma2 = 1 / snr                                             # EDM's σ² = e^{−λ}
    return {
        # name: (strategy, {space: expected})
        "uniform": (S.Uniform(), {"eps": np.ones_like(snr), "x0": snr, "v": snr / (snr + 1)}),  # bound on eps
        "min_snr": (S.MinSNR(gamma=5.0), {"x0": np.minimum(snr, 5), "eps": np.minimum(1, 5 / snr),
                                            "v": np.minimum(snr, 5) / (snr + 1)}),
        "snr": (S.SNR(), {"x0": snr, "eps": np.ones_like(snr), "v": snr / (1 + snr)}),
        "truncated_snr": (S.TruncatedSNR(), {"x0": np.maximum(snr, 1), "eps": np.maximum(snr, 1) / snr}),
        "snr_plus_one": (S.SNRPlusOne(), {"x0": snr + 1, "v": np.ones_like(snr), "eps": (snr + 1) / snr}),
        "soft_min_snr": (S.SoftMinSNR(gamma=4.0), {"x0": 1 / (1 / snr + 1 / 4),
                                                   # k-diffusion's weight on the EDM F-loss: (σ σ_d)²/(σ² + σ_d²)²
                                                   "edm": sigma2 * sd2 / (sigma2 + sd2) ** 2}),
        "p2": (S.P2(gamma=1.0, k=1.0), {"eps": 1 / (1 + snr), "x0": snr / (1 + snr)}),
        "p2_gamma05": (S.P2(gamma=0.5, k=1.0), {"eps": (1 + snr) ** -0.5, "v": snr / (1 + snr) ** 1.5}),
        "debiased": (S.Debiased(), {"eps": snr**-0.5, "x0": snr**0.5}),
        "edm": (S.EDM(), {"x0": (sigma2 + sd2) / (sigma2 * sd2), "edm": np.ones_like(snr),
                          "eps": 1 + 1 / (snr * sd2)}),
        "sigmoid": (S.Sigmoid(bias=1.0), {"eps": 1 / (1 + np.exp(-(1.0 - np.log(snr))))}),
    }


@pytest.mark.parametrize("name", list(_closed_forms()))
def test_closed_form_weights(name):
    strategy, expected = _closed_forms()[name]
    bound(strategy, "eps")
    for space, values in expected.items():
        got = strategy.weight_in(space, lam(*L)).double().numpy()
        np.testing.assert_allclose(got, values, rtol=2e-5, err_msg=f"{name} in {space}")


def test_loss_weights_use_the_run_target():
    for prediction in PREDICTIONS:
        s = bound(S.MinSNR(gamma=5.0), prediction)
        draw = S.NoiseDraw(logsnr=lam(*L), proposal_weight=torch.full((len(L),), 2.0))
        torch.testing.assert_close(s.loss_weights(draw, torch.ones(len(L))), 2 * s.weight_in(prediction, lam(*L)))


def test_edm_weight_is_one_on_F_and_matches_the_denoiser_loss():
    s = bound(S.EDM(), "edm")
    torch.testing.assert_close(s.weight_in("edm", lam(-30, -5, 0, 5, 30)), torch.ones(5))
    # λ(σ)·‖D − x‖² equals the F-loss of the EDM-preconditioned Denoiser (weight 1), for any raw output
    torch.manual_seed(0)
    den = Denoiser(nn.Identity(), "edm", 0.5)
    x0, eps, out = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    logsnr = lam(-2.0, 1.0, 4.0)
    a, sg = (c.view(-1, 1, 1, 1) for c in alpha_sigma(logsnr))
    z = a * x0 + sg * eps
    f_loss = (out - den.target(x0, eps, z, logsnr)).square().mean((1, 2, 3))
    x0_hat, _ = den.predict_x0_eps(z, logsnr, out)
    d_loss = (x0_hat - x0).square().mean((1, 2, 3))
    torch.testing.assert_close(s.weight_in("x0", logsnr) * d_loss, s.weight_in("edm", logsnr) * f_loss,
                               rtol=1e-4, atol=1e-6)


# λ → −∞ (zero terminal SNR) and λ → +∞: the limit of each converted formula (inf where the formula is)
INF = math.inf
LIMITS = {  # name: {space: (limit at λ = −∞, limit at λ = +∞)}
    "min_snr": {"x0": (0, 5), "eps": (1, 0), "v": (0, 0), "edm": (0, 0)},
    "snr": {"x0": (0, INF), "eps": (1, 1), "v": (0, 1), "edm": (0, 1)},
    "truncated_snr": {"x0": (1, INF), "eps": (INF, 1), "v": (1, 1), "edm": (0.25, 1)},
    "snr_plus_one": {"x0": (1, INF), "eps": (INF, 1), "v": (1, 1), "edm": (0.25, 1)},
    "soft_min_snr": {"x0": (0, 4), "eps": (1, 0), "v": (0, 0), "edm": (0, 0)},
    "p2": {"x0": (0, 1), "eps": (1, 0), "v": (0, 0), "edm": (0, 0)},
    "speed_p2": {"x0": (0, 1), "eps": (1, 0), "v": (0, 0), "edm": (0, 0)},           # P2 with k = 1, γ = 1
    "debiased": {"x0": (0, INF), "eps": (INF, 0), "v": (0, 0), "edm": (0, 0)},
    "edm": {"x0": (4, INF), "eps": (INF, 1), "v": (4, 1), "edm": (1, 1)},
    "sigmoid": {"x0": (0, math.exp(2)), "eps": (1, 0), "v": (0, 0), "edm": (0, 0)},   # b = 2: x0-space → e^b
}


@pytest.mark.parametrize("name", list(LIMITS))
def test_extremes_of_logsnr(name):
    strategy = bound(load(CONF / f"{name}.yaml"), "eps")
    for space, (lo, hi) in LIMITS[name].items():
        got = strategy.weight_in(space, lam(-INF, -1e4, 1e4, INF)).double()
        want = torch.tensor([lo, lo, hi, hi], dtype=torch.float64)
        assert not torch.isnan(got).any(), f"{name}/{space}: {got}"
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"{name} in {space}: {got}")
    # Min-SNR's zero-terminal-SNR guard (Hang et al. PR #4) in particular: weight 1 at SNR = 0 on ε
    if name == "min_snr":
        assert strategy.weight_in("eps", lam(-INF)).item() == 1.0


def test_uniform_t_density_on_cosine_is_sech():
    """Kingma & Gao: t ~ U on the cosine schedule gives p(λ) ≈ (1+s)·sech(λ/2)/(2π) (s = 0.008; away from λ_max,
    where the f(0) normalisation bends it)."""
    sched = CosineSchedule()
    x = torch.linspace(-12, 2, 15, dtype=torch.float64)
    want = (1 + sched.s) / (2 * math.pi) / torch.cosh(x / 2)
    torch.testing.assert_close(S.uniform_t_log_density(sched, x).exp(), want, rtol=5e-3, atol=0)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_uniform_t_density_is_one_over_dlambda_dt(schedule):
    """p(λ(t)) = 1/|dλ/dt|, with dλ/dt from the forward curve (independent of t_of_logsnr)."""
    sched, h = SCHEDULES[schedule](), 1e-6
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    dldt = (sched.logsnr(t + h) - sched.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(S.uniform_t_log_density(sched, sched.logsnr(t)).exp(), 1 / dldt.abs(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", [CONF / "uniform.yaml", CONF / "lognormal.yaml", CONF / "logit_normal.yaml",
                                  CONF / "speed.yaml", CONF / "speed_p2.yaml"],
                         ids=lambda p: p.stem)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_density_is_a_density_and_matches_draws(path, schedule):
    # speed draws T discrete λ; its density is the continuous-t approximation, close at the config's T only
    grid_t = {"num_timesteps": 1000, "tau": 700} if path.stem == "speed" else {"num_timesteps": 1000}
    s = bound(load(path, **(grid_t if path.stem.startswith("speed") else {})), "eps", SCHEDULES[schedule]())
    grid = torch.linspace(-40, 40, 40001, dtype=torch.float64)
    p = s.log_density(grid).exp()
    mass = torch.trapezoid(p, grid).item()
    assert abs(mass - 1) < 5e-3, mass
    torch.manual_seed(0)
    draws = s.sample(torch.zeros(40000, 1, 1, 1)).logsnr.double()
    mean = torch.trapezoid(p * grid, grid).item() / mass
    assert abs(draws.mean().item() - mean) < 0.05 * max(1.0, draws.std().item()), (draws.mean(), mean)


def test_lognormal_matches_edm_parameters():
    s = bound(S.LogNormal(p_mean=-1.2, p_std=1.2))
    torch.manual_seed(0)
    x = s.sample(torch.zeros(100000, 1, 1, 1)).logsnr
    assert abs(x.mean().item() - 2.4) < 0.05 and abs(x.std().item() - 2.4) < 0.05   # λ ~ N(2.4, 2.4²)


def test_sigmoid_density_corrected_has_sigmoid_effective_weighting():
    for schedule in ("cosine", "linear"):
        s = bound(S.Sigmoid(bias=1.5, density_corrected=True), "eps", SCHEDULES[schedule]())
        x = lam(-6, -2, 0, 2, 6)
        effective = s.log_density(x).exp() * s.weight_in("eps", x)
        torch.testing.assert_close(effective, torch.sigmoid(1.5 - x), rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------------
# every config: builds, binds to every schedule × prediction, gives finite weights; round-trips
# ------------------------------------------------------------------------------------------------
def run_steps(s: S.Strategy, steps: int, batch: int = 64, shape=(1, 8, 8), seed: int = 0):
    torch.manual_seed(seed)
    for _ in range(steps):
        x0 = torch.randn(batch, *shape)
        draw = s.sample(x0)
        loss = (toy_loss(draw.logsnr) * torch.distributions.Exponential(1.0).sample((batch,))).float()
        s.loss_weights(draw, loss)
        s.observe(draw, loss, GOOD)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_binds_everywhere_with_finite_weights(path):
    node = composed(path)
    assert node.name == path.stem and node.citation, "name must equal the file name; citation required"
    for sched_name, make in SCHEDULES.items():
        for prediction in PREDICTIONS:
            s = bound(load(path), prediction, make())
            assert s.name == path.stem
            torch.manual_seed(1)
            x0 = torch.randn(32, 1, 8, 8)
            draw = s.sample(x0)
            loss = toy_loss(draw.logsnr).float()
            w = s.loss_weights(draw, loss)
            assert w.shape == (32,) and draw.logsnr.shape == (32,)
            assert torch.isfinite(w).all() and (w >= 0).all(), (path.stem, sched_name, prediction, w)
            assert torch.isfinite(draw.logsnr).all()
            s.observe(draw, loss, GOOD)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_published_config_as_is(path, make_cfg):
    """The file exactly as published (no test overrides), standalone and composed into a full run config."""
    s = bound(build(composed(path), _keep_meta=("name", "citation")), "v")
    draw = s.sample(torch.randn(16, 3, 8, 8))
    assert torch.isfinite(s.loss_weights(draw, toy_loss(draw.logsnr).float())).all()
    cfg = make_cfg([f"weighting={path.stem}"])
    in_run = build(cfg.weighting, _keep_meta=("name", "citation"))
    assert type(in_run) is type(s) and in_run.name == path.stem
    if path.stem == "adaptive_timestep":   # the policy CNN follows the dataset's channels (digits: 1)
        assert in_run.policy.features[0].in_channels == cfg.dataset.channels


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_state_round_trip_gives_identical_draws(path):
    fast = {"warmup": 3, "min_count": 2} if path.stem == "variance_aware_binned" else {}
    a = bound(load(path, **fast))
    run_steps(a, 6)
    state = copy.deepcopy(a.state_dict())
    b = bound(load(path, **fast))
    b.load_state_dict(state)
    for key, value in a.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    for s in (a, b):
        torch.manual_seed(123)
        x0 = torch.randn(64, 1, 8, 8)
        s._draw = s.sample(x0)
        s._w = s.loss_weights(s._draw, toy_loss(s._draw.logsnr).float())
    torch.testing.assert_close(a._draw.logsnr, b._draw.logsnr, rtol=0, atol=0)
    torch.testing.assert_close(a._draw.proposal_weight, b._draw.proposal_weight, rtol=0, atol=0)
    torch.testing.assert_close(a._w, b._w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# no host synchronisation in the per-step path
# ------------------------------------------------------------------------------------------------
def _forbid(*_a, **_k):
    raise AssertionError("host sync in the per-step path")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_per_step_path_does_not_sync(path, monkeypatch):
    s = bound(load(path, **({"warmup": 1, "min_count": 2} if path.stem == "variance_aware_binned" else {})))
    run_steps(s, 3)                                          # past warm-ups, adaptive state populated
    x0 = torch.randn(64, 1, 8, 8)
    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, attr, _forbid)
        for _ in range(2):
            draw = s.sample(x0)
            loss = toy_loss(draw.logsnr).float()
            s.loss_weights(draw, loss)
            s.observe(draw, loss, GOOD)
    with pytest.raises(AssertionError), monkeypatch.context() as m:   # the guard itself works
        m.setattr(torch.Tensor, "item", _forbid)
        torch.ones(1).item()


# ------------------------------------------------------------------------------------------------
# unbiasedness of the importance-corrected samplers (Monte Carlo on a fixed toy loss)
# ------------------------------------------------------------------------------------------------
def _mc_estimate(s: S.Strategy, draws: int, batch: int = 4000):
    values = []
    for _ in range(draws // batch):
        d = s.sample(torch.zeros(batch, 1, 1, 1))
        loss = toy_loss(d.logsnr) * torch.distributions.Exponential(1.0).sample((batch,)).double()
        values.append(s.loss_weights(d, loss.float()).double() * loss)
    v = torch.cat(values)
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def test_importance_sampling_is_unbiased_after_warmup():
    torch.manual_seed(0)
    s = bound(S.ImportanceSampling(num_timesteps=100), "eps")
    run_steps(s, 40, batch=256, shape=(1, 1, 1))                  # ≈ 100 losses per timestep
    assert (s.filled >= s.history).all(), "warm-up did not finish"
    p = s.probabilities()
    assert p.max() / p.min() > 3, "proposal did not adapt"
    est, se = _mc_estimate(s, 200000)
    exact = toy_loss(s.logsnr_table).mean().item()          # E_{t~U{1..T}}[L(λ_t)]
    assert abs(est - exact) < 4 * se, (est, exact, se)


def test_importance_is_uniform_before_warmup():
    s = bound(S.ImportanceSampling(num_timesteps=50), "eps")
    run_steps(s, 1, batch=100, shape=(1, 1, 1))
    torch.testing.assert_close(s.probabilities(), torch.full((50,), 1 / 50))


def test_ring_buffer_keeps_the_last_entries_with_duplicates():
    s = S.ImportanceSampling(num_timesteps=5, history=2)
    draw = S.NoiseDraw(logsnr=torch.zeros(5), proposal_weight=torch.ones(5), index=torch.tensor([3, 1, 3, 3, 1]))
    s.observe(draw, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), GOOD)
    # row 3 saw 1, 3, 4 → keeps the last two (3 in slot 0 after wrap: slots (0,1,0) → [4, 3]); row 1 → [2, 5]
    torch.testing.assert_close(s.loss_history[3], torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(s.loss_history[1], torch.tensor([2.0, 5.0]))
    assert s.filled.tolist() == [0, 2, 0, 3, 0]
    s.observe(S.NoiseDraw(logsnr=torch.zeros(1), proposal_weight=torch.ones(1), index=torch.tensor([3])),
              torch.tensor([9.0]), GOOD)
    torch.testing.assert_close(s.loss_history[3], torch.tensor([4.0, 9.0]))     # slot 3 mod 2 = 1
    s.observe(S.NoiseDraw(logsnr=torch.zeros(1), proposal_weight=torch.ones(1), index=torch.tensor([3])),
              torch.tensor([float("nan")]), ~GOOD)                             # a skipped step changes nothing
    torch.testing.assert_close(s.loss_history[3], torch.tensor([4.0, 9.0]))
    assert s.filled.tolist() == [0, 2, 0, 4, 0]


def test_adaptive_histogram_is_unbiased():
    torch.manual_seed(0)
    s = bound(S.AdaptiveHistogram(bins=50), "eps")
    run_steps(s, 60, batch=512, shape=(1, 1, 1))
    p = s.bin_probabilities()
    assert p.max() / p.min() > 10, "proposal did not adapt"
    est, se = _mc_estimate(s, 200000)
    t = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    exact = toy_loss(CosineSchedule().logsnr(t)).mean().item()   # E_{t~U[0,1]}[L(λ(t))]
    assert abs(est - exact) < 4 * se, (est, exact, se)


def test_adaptive_histogram_keeps_the_base_objective():
    """With a weighted base (Min-SNR on ε), the effective weighting is the base's, whatever the bins hold."""
    s = bound(S.AdaptiveHistogram(bins=20, base=S.MinSNR(gamma=5.0)), "eps")
    run_steps(s, 5, batch=256, shape=(1, 1, 1))
    x = lam(-5, 0, 3)
    torch.testing.assert_close(s.weight_in("eps", x), torch.clamp(5 / x.exp(), max=1.0))
    torch.testing.assert_close(s.log_density(x), S.Uniform().bind(CosineSchedule(), "eps").log_density(x))


# ------------------------------------------------------------------------------------------------
# variance-aware variants
# ------------------------------------------------------------------------------------------------
def test_variance_aware_factors_by_hand():
    x = lam(0.0, 1.0, 3.0)
    mu = 4.0 / 3.0
    loss = torch.tensor([1.0, 2.0, 6.0])
    for variant, want in [("gaussian", torch.exp(-0.05 * (x - mu) ** 2)), ("cauchy", 1 / (1 + 0.05 * (x - mu) ** 2))]:
        s = bound(S.VarianceAware(variant=variant, alpha=0.05), "edm")
        draw = S.NoiseDraw(logsnr=x, proposal_weight=torch.ones(3))
        torch.testing.assert_close(s.loss_weights(draw, loss), want)              # EDM base weight is 1 on F
        s_eps = bound(S.VarianceAware(variant=variant, alpha=0.05), "eps")
        torch.testing.assert_close(s_eps.loss_weights(draw, loss), want * (1 + 4 * torch.exp(-x)))
    s = bound(S.VarianceAware(variant="loss_zscore", alpha=0.05), "edm")
    z = (loss - 3.0) / loss.std()
    torch.testing.assert_close(s.loss_weights(S.NoiseDraw(logsnr=x, proposal_weight=torch.ones(3)), loss), 1 + 0.05 * z)


def test_binned_variance_downweights_noisy_bins():
    s = bound(S.BinnedVariance(bins=2, logsnr_min=0.0, logsnr_max=2.0, warmup=5, min_count=4, clip=(0.01, 100.0)),
              "edm")
    torch.manual_seed(0)
    x = torch.cat([torch.full((64,), 0.5), torch.full((64,), 1.5)])
    for step in range(6):
        if step < 5:
            torch.testing.assert_close(s.bin_weights(), torch.ones(2))          # warm-up: uniform
        noise = torch.randn(128)
        loss = torch.where(x < 1, 1 + 0.8 * noise, 1 + 0.2 * noise).abs()        # bin 0 four times noisier
        s.observe(S.NoiseDraw(logsnr=x, proposal_weight=torch.ones(128)), loss, GOOD)
    w = s.bin_weights()
    assert w[0] < w[1] / 2, w
    torch.testing.assert_close((s.bin_mass * w).sum(), torch.tensor(1.0))       # mean 1 under the sampling density
    s.clip = (0.9, 1.1)
    assert 0.9 - 1e-6 <= s.bin_weights().min() and s.bin_weights().max() <= 1.1 + 1e-6


# ------------------------------------------------------------------------------------------------
# adaptive timestep sampler (Kim et al. 2025)
# ------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels + 1, 8, 3, padding=1), nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, z, c_noise):
        c = c_noise.view(-1, 1, 1, 1).expand(z.shape[0], 1, *z.shape[2:])
        return self.conv2(torch.relu(self.conv1(torch.cat([z, c], 1))))


def _train(strategy, denoiser, steps, seed=0, batch=8, start=0):
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(64, 1, 8, 8, generator=gen).tanh()
    torch.manual_seed(seed)
    for step in range(start, start + steps):
        x0 = data[torch.randint(64, (batch,))]
        draw = strategy.sample(x0)
        eps = torch.randn_like(x0)
        a, sg = (c.view(-1, 1, 1, 1) for c in alpha_sigma(draw.logsnr))
        z = a * x0 + sg * eps
        loss = (denoiser(z, draw.logsnr) - denoiser.target(x0, eps, z, draw.logsnr)).square().mean((1, 2, 3))
        total = (strategy.loss_weights(draw, loss.detach()) * loss).mean()
        opt.zero_grad()
        strategy.on_before_update(denoiser, x0, step)
        total.backward()
        opt.step()
        strategy.on_after_update(denoiser, x0, step, GOOD)
        if strategy.observes:
            strategy.observe(draw, loss.detach(), GOOD)


def _beta_params(strategy):
    with torch.no_grad():
        a, b = strategy.policy(torch.zeros(1, 1, 8, 8))
    return torch.stack([a, b]).flatten()


def test_adaptive_timestep_updates_its_policy_on_schedule():
    torch.manual_seed(0)
    s = bound(S.AdaptiveTimestep(num_timesteps=50, in_channels=1, update_every=40), "eps", LinearSchedule())
    den = Denoiser(TinyNet(), "eps")
    ab0 = _beta_params(s)
    torch.testing.assert_close(ab0, torch.full((2,), math.log1p(math.exp(0.5)) + 1e-5))   # ≈ Beta(0.974, 0.974)
    _train(s, den, 39, start=1)                                      # steps 1..39: no update
    assert s.policy_updates.item() == 0 and s.extra_forwards.item() == 0
    torch.testing.assert_close(_beta_params(s), ab0)
    _train(s, den, 1, start=40)                                      # step 40: the update
    assert s.policy_updates.item() == 1
    assert s.extra_forwards.item() == 2 * (50 + 8 * 3)
    assert not torch.allclose(_beta_params(s), ab0), "policy update did not change Beta(a, b)"


def test_adaptive_timestep_state_round_trip_after_updates():
    torch.manual_seed(0)
    make = lambda: bound(S.AdaptiveTimestep(num_timesteps=30, in_channels=1, update_every=2, probe_timesteps=10),
                         "eps", CosineSchedule())
    a, den = make(), Denoiser(TinyNet(), "eps")
    _train(a, den, 10)
    assert a.policy_updates.item() == 5 and a.buffer_rows.item() == 5
    assert a.probe_grid.numel() == 12 and set(a.selected.tolist()) <= set(a.probe_grid.tolist())
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert len(b.policy_optimizer.state) > 0
    den_b = copy.deepcopy(den)
    _train(a, den, 2, seed=5, start=10)
    _train(b, den_b, 2, seed=5, start=10)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(va):
            torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_adaptive_timestep_kl_matches_the_ddpm_posterior():
    """The KL probe equals KL(q(x_{t−1}|x_t,x0) ‖ N(μ_θ, σ²)) computed from the DDPM betas directly."""
    T = 50
    for variance in ("fixed_small", "fixed_large"):
        s = bound(S.AdaptiveTimestep(num_timesteps=T, in_channels=1, model_variance=variance), "x0", LinearSchedule())
        torch.manual_seed(0)
        den = Denoiser(TinyNet(), "x0")
        x0, noise = torch.randn(T, 1, 8, 8), torch.randn(T, 1, 8, 8)
        idx = torch.arange(T)
        got = s._kl_bits(den, x0, idx, noise).double()
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)   # LinearSchedule discretised
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        post_var[0] = post_var[1]
        p_var = post_var if variance == "fixed_small" else torch.cat([post_var[1:2], betas[1:]])
        v = lambda c: c.view(-1, 1, 1, 1)
        z = v(abar.sqrt()) * x0.double() + v((1 - abar).sqrt()) * noise.double()
        with torch.no_grad():
            x0_hat = den.predict_x0_eps(z.float(), s.logsnr_table, den(z.float(), s.logsnr_table))[0].double()
        coef_x0, coef_z = v(abar_prev.sqrt() * betas / (1 - abar)), v((1 - betas).sqrt() * (1 - abar_prev) / (1 - abar))
        q = torch.distributions.Normal(coef_x0 * x0.double() + coef_z * z, v(post_var.sqrt()).expand_as(z))
        p = torch.distributions.Normal(coef_x0 * x0_hat + coef_z * z, v(p_var.sqrt()).expand_as(z))
        want = torch.distributions.kl_divergence(q, p).flatten(1).mean(1) / math.log(2)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# SpeeD (Wang et al. 2024): the official default (speed) and the README variant (speed_p2)
# ------------------------------------------------------------------------------------------------
def ddpm_linear_alpha_bar() -> np.ndarray:
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def test_speed_pivot_matches_the_official_rule_on_ddpm_betas():
    """M = argmax(np.gradient(√(1 − ᾱ)) < 1e-4) + 1 on DDPM's linear betas (NUS-HPC-AI-Lab/SpeeD), from
    the betas directly, against ours from the λ-table of the linear schedule."""
    want = int(np.argmax(np.gradient(np.sqrt(1 - ddpm_linear_alpha_bar())) < 1e-4)) + 1
    for config in ("speed", "speed_p2"):
        s = bound(load(CONF / f"{config}.yaml", num_timesteps=1000, **({"tau": 700} if config == "speed" else {})),
                  "eps", LinearSchedule())
        assert s.pivot == want == 642


def test_speed_levels_are_k_before_tau_and_1_after():
    """Speed_IDDPM: p = normalize([k]·τ + [1]·(T − τ)), τ = 700."""
    for k in (1.0, 2.0, 5.0):
        s = bound(load(CONF / "speed.yaml", num_timesteps=1000, tau=700, k=k), "eps", LinearSchedule())
        want = torch.tensor([k] * 700 + [1.0] * 300, dtype=torch.float64)
        torch.testing.assert_close(s.probs.double(), want / want.sum(), rtol=1e-6, atol=0)


def test_speed_change_aware_weight_closed_form():
    """w_t = 0.4 + 0.2·(g_t − g_min)/(g_max − g_min) for t < 700, 1 after, g = np.gradient(1 − ᾱ) on DDPM's linear
    betas (Speed_IDDPM._weights("ours"), lam = 0.6), computed here from the betas; ours through `weight_in` at
    the grid's λ (so also through the λ → step lookup)."""
    g = np.gradient(1 - ddpm_linear_alpha_bar())
    want = np.where(np.arange(1000) < 700, 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min()), 1.0)
    s = bound(load(CONF / "speed.yaml", num_timesteps=1000, tau=700), "eps", LinearSchedule())
    got = s.weight_in("eps", s.logsnr_table).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert 0.4 <= got[:700].min() and got[:700].max() == pytest.approx(0.6) and (got[700:] == 1).all()
    # in the target's own space the same per-step table: drawn λ land on their own step
    draw = s.sample(torch.zeros(64, 1, 1, 1))
    torch.testing.assert_close(s.loss_weights(draw, torch.ones(64)).double(), torch.from_numpy(want)[draw.index],
                               rtol=1e-6, atol=0)
    flat = bound(load(CONF / "speed.yaml", num_timesteps=1000, tau=700, change_aware_weight=False), "eps",
                 LinearSchedule())
    assert torch.all(flat.weight_in("eps", flat.logsnr_table) == 1)


def test_speed_rejects_bad_values():
    for bad, key in (({"k": 0.5}, "k"), ({"tau": 0}, "tau"), ({"tau": 700.5}, "tau"), ({"lam": 1.5}, "lam"),
                     ({"epsilon": 0.0}, "epsilon"), ({"num_timesteps": 1}, "num_timesteps")):
        with pytest.raises(ConfigError, match=rf"weighting\.{key}"):
            S.SpeeD(**bad)
    with pytest.raises(ConfigError, match=r"weighting\.tau=700 exceeds the grid's T=100"):
        bound(S.SpeeD(num_timesteps=100), "eps", LinearSchedule())


def test_speed_p2_levels_follow_the_official_tanh():
    """P ∝ tanh(10⁶(dσ_t/dt − 10⁻⁴)) + 1.5 (Speed_Mask_IDDPM / README), from DDPM's betas; two levels 5 apart
    away from the step, which falls at M − 1."""
    increment = np.gradient(np.sqrt(1 - ddpm_linear_alpha_bar()))
    want = np.tanh(1e6 * (increment - 1e-4)) + 1.5
    s = bound(S.SpeeDP2(num_timesteps=1000, dual_sampling=False), "eps", LinearSchedule())
    np.testing.assert_allclose(s.probs.double().numpy(), want / want.sum(), rtol=1e-5, atol=0)
    p = s.probs.double()
    assert p[0] / p[-1] == pytest.approx(5.0) and p[s.pivot - 2] > p[s.pivot - 1] > p[s.pivot]
    flat = bound(S.SpeeDP2(num_timesteps=1000, suppression=1.0, dual_sampling=False), "eps", LinearSchedule())
    torch.testing.assert_close(flat.probs, torch.full((1000,), 1e-3))          # k = 1: uniform


def test_speed_duals_by_hand():
    for s in (bound(S.SpeeDP2(num_timesteps=1000), "eps", LinearSchedule()),
              bound(S.SpeeD(num_timesteps=1000), "eps", LinearSchedule())):             # M = 642
        got = s.dual(torch.tensor([0, 5, 641, 642, 700, 999]))
        assert got.tolist() == [642, 637, 1, 0, 58, 357]


@pytest.mark.parametrize("make", [lambda: S.SpeeDP2(num_timesteps=50), lambda: S.SpeeD(num_timesteps=50, tau=35)],
                         ids=["speed_p2", "speed"])
def test_speed_draws_follow_the_batch_marginal(make):
    """Half the batch from P, the rest their duals: timestep frequencies over many batches match
    `marginal(batch)` (total-variation distance of a 64k-draw histogram)."""
    torch.manual_seed(0)
    s = bound(make(), "eps", LinearSchedule())
    batch = 64
    counts = torch.zeros(50, dtype=torch.float64)
    for _ in range(1000):
        d = s.sample(torch.zeros(batch, 1, 1, 1))
        counts.index_add_(0, d.index, torch.ones(batch, dtype=torch.float64))
        assert torch.equal(d.logsnr, s.logsnr_table[d.index]) and torch.all(d.proposal_weight == 1)
    tv = 0.5 * (counts / counts.sum() - s.marginal(batch)).abs().sum().item()
    assert tv < 0.02, tv
    assert 0 < s.pivot < 50 and (s.marginal(batch)[: s.pivot].mean() > s.marginal(batch)[s.pivot:].mean())


def test_speed_p2_weight_is_p2_and_rejects_bad_values():
    s = bound(load(CONF / "speed_p2.yaml"), "eps", LinearSchedule())
    x = lam(*L)
    torch.testing.assert_close(s.weight_in("eps", x), 1 / (1 + x.exp()), rtol=1e-5, atol=0)
    for bad in ({"suppression": 0.5}, {"epsilon": 0.0}, {"num_timesteps": 1}, {"p2_k": 0.0}):
        with pytest.raises(Exception, match="weighting\\."):
            S.SpeeDP2(**bad)


# ------------------------------------------------------------------------------------------------
# discrete time: schedule.timesteps = T
# ------------------------------------------------------------------------------------------------
# draw λ from a continuous density (the variance-aware configs sample as EDM does)
CONTINUOUS_ONLY = {"lognormal", "edm", "edm_narrow", "logit_normal", "adaptive_histogram", "variance_aware", "variance_aware_binned",
                   "variance_aware_cauchy", "variance_aware_gaussian", "variance_aware_zscore"}


def test_uniform_on_a_discrete_schedule_draws_the_ddpm_table():
    """k ~ U{1..T}: every draw is a grid point, λ is the exact DDPM table's, and the timesteps are uniform."""
    sched = LinearSchedule(timesteps=1000)
    s = bound(S.Uniform(), "eps", sched)
    torch.manual_seed(0)
    draw = s.sample(torch.zeros(200000, 1, 1, 1))
    table = sched.discrete_logsnr(1000)
    assert draw.index.dtype == torch.long and 0 <= draw.index.min() and draw.index.max() < 1000
    assert torch.equal(draw.logsnr, table.float()[draw.index])
    torch.testing.assert_close(draw.t, (draw.index + 1).float() / 1000)
    counts = torch.bincount(draw.index, minlength=1000).double()
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum().item()                      # 999 degrees of freedom
    assert 999 - 5 * math.sqrt(2 * 999) < chi2 < 999 + 5 * math.sqrt(2 * 999), chi2
    assert set(torch.unique(draw.logsnr).tolist()) == set(table.float().tolist())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_on_a_discrete_schedule(path):
    sched = QuadSchedule(timesteps=50)
    fixed_t = {"num_timesteps": None} if "num_timesteps" in SMALL.get(path.stem, {}) else {}
    if path.stem == "speed":
        fixed_t["tau"] = 35                                                     # τ must lie on the 50-step grid
    strategy = load(path, **fixed_t)
    if path.stem in CONTINUOUS_ONLY:
        with pytest.raises(ConfigError, match=rf"weighting={path.stem} draws λ from a continuous density; "
                                              r"schedule\.timesteps=50 is not supported"):
            bound(strategy, "eps", sched)
        return
    s = bound(strategy, "eps", sched)
    torch.manual_seed(0)
    draw = s.sample(torch.randn(64, 1, 8, 8))
    table = sched.discrete_logsnr(50).float()
    assert draw.index is not None and torch.equal(draw.logsnr, table[draw.index]), path.stem
    assert torch.isfinite(s.loss_weights(draw, toy_loss(draw.logsnr).float())).all()


@pytest.mark.parametrize("make", [
    lambda **kw: S.ImportanceSampling(**kw),
    lambda **kw: S.SpeeD(tau=40, **kw),
    lambda **kw: S.SpeeDP2(**kw),
    lambda **kw: S.AdaptiveTimestep(in_channels=1, probe_timesteps=10, **kw),
], ids=["importance", "speed", "speed_p2", "adaptive_timestep"])
def test_grid_strategies_take_T_from_the_schedule(make):
    s = bound(make(), "eps", QuadSchedule(timesteps=200))
    assert s.num_timesteps == 200
    torch.testing.assert_close(s.logsnr_table, QuadSchedule().discrete_logsnr(200).float())
    draw = s.sample(torch.randn(16, 1, 8, 8))
    assert draw.index.max() < 200
    assert bound(make(num_timesteps=200), "eps", QuadSchedule(timesteps=200)).num_timesteps == 200
    assert bound(make(), "eps", QuadSchedule()).num_timesteps == 1000          # continuous schedule: DDPM's T
    assert bound(make(num_timesteps=64), "eps", QuadSchedule()).num_timesteps == 64
    with pytest.raises(ConfigError, match=r"weighting\.num_timesteps=100 differs from schedule\.timesteps=200"):
        bound(make(num_timesteps=100), "eps", QuadSchedule(timesteps=200))


def test_grid_strategy_buffers_follow_the_schedule_T():
    s = bound(S.ImportanceSampling(history=3), "eps", LinearSchedule(timesteps=40))
    assert s.loss_history.shape == (40, 3) and s.filled.shape == (40,)
    a = bound(S.AdaptiveTimestep(in_channels=1), "eps", LinearSchedule(timesteps=40))
    assert a.probe_grid.numel() == 40 and a.delta_kl.shape == (20, 40) and a.kl_mean_coef.shape == (40,)


def test_discrete_uniform_density_is_the_histogram_of_the_draws():
    """On a T-step grid p(λ) has mass 1/T on the cell around each table value: it integrates to 1, is finite at
    every draw, and density-corrected sigmoid weights give Σ_k sigmoid(b − λ_k)·width_k."""
    sched = QuadSchedule(timesteps=50)
    table = sched.discrete_logsnr(50)
    grid = torch.linspace(-10, 12, 200001, dtype=torch.float64)
    p = S.uniform_t_log_density(sched, grid).exp()
    assert abs(torch.trapezoid(p, grid).item() - 1) < 1e-3
    at_draws = S.uniform_t_log_density(sched, table)
    assert torch.isfinite(at_draws).all()
    ascending = table.flip(0)
    inner = 0.5 * (ascending[2:] - ascending[:-2])                  # the cell width of an inner point
    torch.testing.assert_close(at_draws.flip(0)[1:-1].exp(), 1 / (50 * inner))
    # E_k[w(λ_k)] of the density-corrected sigmoid ≈ ∫ sigmoid(b − λ) dλ over the cells = softplus(b − lo) − softplus(b − hi)
    s = bound(S.Sigmoid(bias=1.5, density_corrected=True), "eps", sched)
    mean_weight = s.weight_in("eps", table.float()).double().mean().item()
    lo = (ascending[0] - 0.5 * (ascending[1] - ascending[0])).item()
    hi = (ascending[-1] + 0.5 * (ascending[-1] - ascending[-2])).item()
    integral = math.log1p(math.exp(1.5 - lo)) - math.log1p(math.exp(1.5 - hi))
    assert mean_weight == pytest.approx(integral, rel=0.01)
