"""Samplers: closed forms on Gaussian data, saved outputs of the official samplers, NFE, guidance, precision, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffrun.config import EvalConfig, SampleConfig
from diffrun.errors import ConfigError
from diffrun.models.parameterization import Denoiser
from diffrun.sampling import SamplerOptions, autocast_dtype, network_evaluations, run_sampler, sample
from diffrun.sampling.grids import continuous_logsnr_grid, edm_sigma_grid, respaced_timesteps
from diffrun.schedules import CosineSchedule, EDMSchedule, LinearSchedule, QuadSchedule

FIXTURE = Path(__file__).parent / "data" / "sampler_references.pt"
MU, S = 0.3, 0.5  # the Gaussian data N(μ, s²) of the closed-form tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianPosteriorMean(nn.Module):
    """The exact x0-prediction for data N(μ, s²): E[x | z] = μ + α s²/(α² s² + σ²)·(z − α μ), λ = −8 c_noise."""

    def forward(self, z, c_noise):
        lam = (-8 * c_noise).double().view(-1, *[1] * (z.ndim - 1))
        alpha2, sigma2 = torch.sigmoid(lam), torch.sigmoid(-lam)
        alpha = alpha2.sqrt()
        return (MU + alpha * S**2 / (alpha2 * S**2 + sigma2) * (z.double() - alpha * MU)).float()


def exact_flow(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE of N(μ, s²) in EDM's σ, x(σ) − μ = (x(σ₀) − μ)·√((s² + σ²)/(s² + σ₀²)), then x̂0 there."""
    x = MU + (x_start - MU) * math.sqrt((S**2 + sigma_end**2) / (S**2 + sigma_start**2))
    return MU + S**2 / (S**2 + sigma_end**2) * (x - MU)


# ------------------------------------------------------------------------------------------------
# closed forms on Gaussian data
# ------------------------------------------------------------------------------------------------
def test_heun_converges_at_second_order_to_the_exact_flow():
    """Deterministic Heun against the exact ODE solution: the error falls ~4× per doubling of the steps."""
    den, shape = Denoiser(GaussianPosteriorMean(), "x0"), (256, 1, 1, 1)
    errors = []
    for steps in (16, 32, 64):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # the sampler's first draw
        out = run_sampler(den, EDMSchedule(), shape, SamplerOptions(sampler="heun", steps=steps),
                          generator=torch.Generator().manual_seed(0)).images
        sigmas = edm_sigma_grid(EDMSchedule(), steps, 0.002, 80.0, 7.0)
        # x_0 = σ_0 n (EDM), the flow to σ_{N−1}, then the last Euler step lands on x̂0 there
        exact = exact_flow(latents.double() * sigmas[0], sigmas[0], sigmas[-2])
        errors.append((out.double() - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < r < 6 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.01, errors


def test_ddim_converges_at_first_order_to_the_exact_flow():
    den, shape, sched = Denoiser(GaussianPosteriorMean(), "x0"), (256, 1, 1, 1), CosineSchedule()
    errors = []
    for steps in (32, 64, 128):
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        out = run_sampler(den, sched, shape, SamplerOptions(sampler="ddim", steps=steps, clip_x0=False),
                          generator=torch.Generator().manual_seed(0)).images
        lams = continuous_logsnr_grid(sched, steps)
        sigma_start, sigma_end = math.exp(-lams[0] / 2), math.exp(-lams[-1] / 2)
        exact = exact_flow(latents.double() * math.sqrt(1 + sigma_start**2), sigma_start, sigma_end)  # z/α
        errors.append((out.double() - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.6 < r < 2.4 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_1000_steps_samples_the_data_distribution(variance):
    """1000 ancestral steps with the exact denoiser draw N(μ, s²) (Monte Carlo, 4000 samples: ±4 standard errors)."""
    den = Denoiser(GaussianPosteriorMean(), "x0")
    out = run_sampler(den, QuadSchedule(), (4000, 1, 1, 1),
                      SamplerOptions(sampler="ddpm", steps=1000, ddpm_variance=variance, clip_x0=False),
                      generator=torch.Generator().manual_seed(0)).images
    assert abs(out.mean().item() - MU) < 4 * S / math.sqrt(4000)
    assert abs(out.std().item() - S) < 4 * S / math.sqrt(2 * 4000)


# ------------------------------------------------------------------------------------------------
# the official samplers' outputs on identical inputs (fixture from NVlabs/edm, improved-diffusion, ddpm-torch)
# ------------------------------------------------------------------------------------------------
class StandInNet(nn.Module):
    """The tiny fixed network the fixture was generated with (weights stored in the fixture)."""

    def __init__(self, channels=3, width=16):
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        h = self.inp(x) + self.emb(c_noise.view(-1, 1)).view(-1, self.width, 1, 1)
        return self.out(torch.tanh(h))


def _reference_cases():
    return torch.load(FIXTURE)["cases"] if FIXTURE.exists() else []


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda c: " ".join(c["name"].split()))
def test_matches_the_official_sampler(case):
    """Reference outputs of edm_sampler / p_sample_loop / ddim_sample_loop / ddpm-torch p_sample for the stand-in
    network and the same random draws (docs/samplers.md says how the fixture was made)."""
    fixture = torch.load(FIXTURE)
    net = StandInNet()
    net.load_state_dict(fixture["net"])
    den = Denoiser(net, case["prediction"]).eval()
    if case["sampler"] == "heun":
        schedule = {"edm": EDMSchedule, "linear": LinearSchedule, "cosine": CosineSchedule, "quad": QuadSchedule,
                    "quad_T1000": lambda: QuadSchedule(timesteps=1000)}[case["schedule"]]()
        options = SamplerOptions(sampler="heun", steps=case["steps"], s_churn=case["s_churn"], s_min=case["s_min"],
                                 s_max=case["s_max"], s_noise=case["s_noise"])
    else:
        make = {"linear": LinearSchedule, "cosine": CosineSchedule, "quad": QuadSchedule}[case["schedule"]]
        schedule = make(timesteps=1000)
        options = SamplerOptions(sampler=case["sampler"], steps=case["steps"], eta=case.get("eta", 0.0),
                                 ddpm_variance=case.get("variance", "fixed_large"))
    generator = None
    if case["rng"] == "global":  # improved-diffusion draws from the global generator (th.randn_like)
        torch.manual_seed(case["seed"])
    else:
        generator = torch.Generator().manual_seed(case["seed"])
    out = run_sampler(den, schedule, tuple(fixture["shape"]), options, generator=generator).images
    tol = dict(rtol=1e-5, atol=1e-5) if case["sampler"] == "heun" else dict(rtol=0, atol=1e-4)
    torch.testing.assert_close(out, case["reference"], **tol)


def test_fixture_is_present_and_covers_every_sampler():
    cases = _reference_cases()
    assert {c["sampler"] for c in cases} == {"ddpm", "ddim", "heun"}
    assert any(c["sampler"] == "heun" and c["s_churn"] > 0 for c in cases)
    assert {c.get("variance") for c in cases if c["sampler"] == "ddpm"} == {"fixed_large", "fixed_small"}


def test_respacing_matches_improved_diffusion_examples():
    # space_timesteps(1000, [10]) = round(i·111) for i < 10, ties as Python rounds them
    assert respaced_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert respaced_timesteps(100, 1) == [0]


# ------------------------------------------------------------------------------------------------
# NFE
# ------------------------------------------------------------------------------------------------
class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c_noise, class_labels=None):
        self.calls.append(x.shape[0])
        return 0.1 * x


@pytest.mark.parametrize("sampler,steps,nfe", [("heun", 18, 35), ("heun", 2, 3), ("ddim", 50, 50),
                                               ("ddpm", 1000, 1000), ("ddpm", 7, 7), ("ddpm_continuous", 5, 5)])
def test_nfe_is_counted_and_reported(sampler, steps, nfe):
    net = CountingNet()
    options = SamplerOptions(sampler=sampler, steps=steps)
    result = run_sampler(Denoiser(net, "eps"), LinearSchedule(), (2, 1, 4, 4), options)
    assert result.nfe == nfe == len(net.calls) == network_evaluations(sampler, steps)
    assert SamplerOptions(sampler=sampler, steps=steps).nfe == nfe


def test_heun_grid_is_edms():
    sigmas = edm_sigma_grid(EDMSchedule(), 18, 0.002, 80.0, 7.0)
    assert len(sigmas) == 19 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    # σ range clipped to the schedule's (EDM: net.sigma_min/max): quad reaches only σ = e^{7.17/2}
    quad = edm_sigma_grid(QuadSchedule(), 18, 0.002, 80.0, 7.0)
    assert quad[0] == pytest.approx(math.exp(-QuadSchedule().logsnr_min / 2)) and quad[0] < 80
    # a discrete schedule: every level is one of the T grid levels (EDM's round_sigma)
    table = torch.exp(-QuadSchedule(timesteps=1000).discrete_logsnr(1000) / 2)
    for s in edm_sigma_grid(QuadSchedule(timesteps=1000), 18, 0.002, 80.0, 7.0)[:-1]:
        assert (table - s).abs().min().item() == 0.0


def test_heun_without_churn_in_range_is_deterministic():
    """S_churn > 0 with [S_min, S_max] away from the grid adds no noise: the deterministic result."""
    den = Denoiser(GaussianPosteriorMean(), "x0")
    run = lambda **kw: run_sampler(den, EDMSchedule(), (8, 1, 2, 2), SamplerOptions(sampler="heun", steps=10, **kw),
                                   generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(run(s_churn=40.0, s_min=100.0, s_max=200.0), run(), rtol=0, atol=0)
    assert not torch.equal(run(s_churn=40.0), run())


# ------------------------------------------------------------------------------------------------
# classifier-free guidance with a stand-in for Denoiser.forward(z, logsnr, class_labels=None, augment_labels=None)
# ------------------------------------------------------------------------------------------------
NUM_CLASSES = 3
OFFSETS = torch.tensor([0.3, -0.2, 0.5, 0.05])  # per label; the last is the null label's


class LabelledDenoiser(Denoiser):
    """out = 0.5 z + b[label]: guided output = 0.5 z + b_null + s·(b_label − b_null). Records each call's labels."""

    num_classes = NUM_CLASSES

    def __init__(self, prediction="eps"):
        super().__init__(nn.Identity(), prediction)
        self.calls = []

    def forward(self, z, logsnr, class_labels=None, augment_labels=None):
        labels = torch.full((z.shape[0],), NUM_CLASSES) if class_labels is None else class_labels
        self.calls.append((labels.clone(), math.exp(-logsnr[0].item() / 2)))
        return 0.5 * z + OFFSETS[labels].view(-1, 1, 1, 1)


class FixedOffsetDenoiser(Denoiser):
    """out = 0.5 z + b per sample, no labels: what guidance should reduce to."""

    def __init__(self, offsets, prediction="eps"):
        super().__init__(nn.Identity(), prediction)
        self.offsets = offsets

    def forward(self, z, logsnr):
        return 0.5 * z + self.offsets.view(-1, 1, 1, 1)


LABELS = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guidance_is_uncond_plus_scale_times_difference(sampler, scale):
    opts = SamplerOptions(sampler=sampler, steps=6, cfg_scale=scale, eta=0.5 if sampler == "ddim" else 0.0)
    guided_den = LabelledDenoiser()
    guided = run_sampler(guided_den, LinearSchedule(), (4, 1, 2, 2), opts, class_labels=LABELS,
                         generator=torch.Generator().manual_seed(0))
    null = OFFSETS[NUM_CLASSES]
    want = FixedOffsetDenoiser(null + scale * (OFFSETS[LABELS] - null))
    plain = run_sampler(want, LinearSchedule(), (4, 1, 2, 2), SamplerOptions(sampler=sampler, steps=6, eta=opts.eta),
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(guided.images, plain.images, rtol=1e-5, atol=1e-5)
    assert guided.nfe == len(guided_den.calls) == opts.nfe  # a doubled batch counts once
    for labels, _ in guided_den.calls:
        if scale == 1.0:
            assert torch.equal(labels, LABELS)                            # conditional only, one batch
        elif scale == 0.0:
            assert torch.equal(labels, torch.full((4,), NUM_CLASSES))     # unconditional only, one batch
        else:
            assert torch.equal(labels, torch.cat([LABELS, torch.full((4,), NUM_CLASSES)]))  # one doubled batch


def test_guidance_interval_guides_only_inside():
    den = LabelledDenoiser()
    opts = SamplerOptions(sampler="heun", steps=8, cfg_scale=3.0, guidance_sigma_min=0.3, guidance_sigma_max=5.0)
    run_sampler(den, EDMSchedule(), (4, 1, 2, 2), opts, class_labels=LABELS)
    inside = [s for labels, s in den.calls if labels.numel() == 8]
    outside = [s for labels, s in den.calls if labels.numel() == 4]
    assert inside and outside and all(0.3 < s <= 5.0 for s in inside)
    assert all(not 0.3 < s <= 5.0 for s in outside)
    assert all(torch.equal(labels, LABELS) for labels, _ in den.calls if labels.numel() == 4)  # conditional outside


def test_guidance_needs_a_null_label():
    with pytest.raises(ConfigError, match=r"sample\.cfg_scale=2.0: .*num_classes"):
        run_sampler(FixedOffsetDenoiser(torch.zeros(4)), LinearSchedule(), (4, 1, 2, 2),
                    SamplerOptions(steps=2, cfg_scale=2.0), class_labels=LABELS)
    # explicit null label for a model without the attribute
    den = LabelledDenoiser()
    run_sampler(den, LinearSchedule(), (4, 1, 2, 2), SamplerOptions(steps=2, cfg_scale=2.0), class_labels=LABELS,
                num_classes=NUM_CLASSES)
    assert torch.equal(den.calls[0][0][4:], torch.full((4,), NUM_CLASSES))


# ------------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------------
class DtypeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.dtypes = []

    def forward(self, x, c_noise):
        h = self.lin(x)
        self.dtypes.append(h.dtype)
        return h


def test_precision_autocasts_the_network_only():
    torch.manual_seed(0)
    net = DtypeNet()
    den = Denoiser(net, "eps")
    fp32 = sample(den, LinearSchedule(), (2, 1, 4, 4), steps=3, generator=torch.Generator().manual_seed(0))
    assert set(net.dtypes) == {torch.float32}
    net.dtypes.clear()
    bf16 = sample(den, LinearSchedule(), (2, 1, 4, 4), steps=3, generator=torch.Generator().manual_seed(0),
                  autocast_dtype=torch.bfloat16)
    assert set(net.dtypes) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().max() < 0.1


def test_precision_names_map_to_autocast_dtypes():
    assert autocast_dtype("fp32", torch.bfloat16) is None
    assert autocast_dtype("bf16", None) is torch.bfloat16 and autocast_dtype("fp16", None) is torch.float16
    assert autocast_dtype("train", torch.bfloat16) is torch.bfloat16 and autocast_dtype("train", None) is None
    with pytest.raises(ConfigError, match=r"eval\.precision='fp8' is not allowed: one of fp32, bf16, fp16, train"):
        autocast_dtype("fp8", None, key="eval")


# ------------------------------------------------------------------------------------------------
# options and their errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), r"sample\.sampler='euler' is not allowed: one of ddim, ddpm, ddpm_continuous, heun"),
    (dict(steps=0), r"sample\.steps=0 is not allowed: an integer >= 1"),
    (dict(sampler="heun", steps=1), r"sample\.steps=1 is not allowed: an integer >= 2 for heun"),
    (dict(steps=2.5), r"sample\.steps=2.5"),
    (dict(eta=1.5), r"sample\.eta=1.5 is not allowed: a number in \[0, 1\]"),
    (dict(eta=float("nan")), r"sample\.eta=nan"),
    (dict(ddpm_variance="small"), r"sample\.ddpm_variance='small' is not allowed: one of fixed_large, fixed_small, learned"),
    (dict(s_churn=-1.0), r"sample\.s_churn=-1.0 is not allowed: a finite number >= 0"),
    (dict(s_min=-0.1), r"sample\.s_min=-0.1"),
    (dict(s_min=2.0, s_max=1.0), r"sample\.s_max=1.0 is not allowed: a number >= s_min = 2.0"),
    (dict(s_noise=0.0), r"sample\.s_noise=0.0 is not allowed: a finite number > 0"),
    (dict(rho=0.0), r"sample\.rho=0.0"),
    (dict(sigma_min=1.0, sigma_max=0.5), r"sample\.sigma_max=0.5 is not allowed: a finite number > sigma_min = 1.0"),
    (dict(cfg_scale=-1.0), r"sample\.cfg_scale=-1.0 is not allowed: a finite number >= 0"),
    (dict(cfg_scale=float("inf")), r"sample\.cfg_scale=inf"),
    (dict(guidance_sigma_min=2.0, guidance_sigma_max=1.0), r"sample\.guidance_sigma_max=1.0"),
    (dict(clip_x0="yes"), r"sample\.clip_x0='yes'"),
    (dict(key="eval", steps=-3), r"eval\.steps=-3"),
])
def test_bad_options_name_key_and_allowed_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplerOptions(**kwargs)


def test_ddpm_steps_cannot_exceed_the_grid():
    with pytest.raises(ConfigError, match=r"sample\.steps=2000 is not allowed: the DDPM grid has T = 1000"):
        sample(Denoiser(CountingNet(), "eps"), LinearSchedule(), (1, 1, 2, 2), steps=2000, sampler="ddpm")
    with pytest.raises(ConfigError, match=r"eval\.steps=60 .* T = 50"):
        run_sampler(Denoiser(CountingNet(), "eps"), LinearSchedule(timesteps=50), (1, 1, 2, 2),
                    SamplerOptions(sampler="ddim", steps=60, key="eval"))


def test_options_from_the_config_nodes():
    for node, key in ((OmegaConf.structured(SampleConfig), "sample"), (OmegaConf.structured(EvalConfig), "eval")):
        node.sampler, node.steps, node.s_churn, node.ddpm_variance = "heun", 18, 40.0, "fixed_small"
        opts = SamplerOptions.from_config(node, key)
        got = (opts.sampler, opts.steps, opts.nfe, opts.s_churn, opts.s_max, opts.key)
        assert got == ("heun", 18, 35, 40.0, math.inf, key)
        assert opts.ddpm_variance == "fixed_small" and opts.clip_x0 is None and not opts.clips
        node.s_noise = -1.0
        with pytest.raises(ConfigError, match=rf"{key}\.s_noise=-1.0"):
            SamplerOptions.from_config(node, key)


def test_clipping_defaults_follow_the_papers():
    assert SamplerOptions(sampler="ddim").clips and SamplerOptions(sampler="ddpm").clips
    assert not SamplerOptions(sampler="heun").clips and SamplerOptions(sampler="heun", clip_x0=True).clips
