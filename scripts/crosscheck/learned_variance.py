"""diffrun's learned variance, hybrid loss and DDPM ancestral sampler against openai/improved-diffusion.

Identical inputs on both sides: the linear schedule's betas on T steps, x_start on the 8-bit grid, t (including
t = 0, where the VB term is the decoder NLL), noise, and a random network output (ε and v). Compared:
`training_losses` (mse, vb, loss of L_hybrid with `rescale_learned_sigmas`, i.e. vb × T/1000), `p_mean_variance`
(mean, log-variance, x̂0; with and without clipping), and `p_sample_loop` on a respaced grid against diffrun's
`ddpm` sampler (learned, fixed_large, fixed_small) with a fixed toy network and the same random stream.

    git clone https://github.com/openai/improved-diffusion /path/outside/repo
    PYTHONPATH=. python scripts/crosscheck/learned_variance.py --reference /path/outside/repo
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.models.learned_variance import DiscretePosterior, hybrid_vb_term  # noqa: E402
from diffrun.models.parameterization import Denoiser  # noqa: E402
from diffrun.sampling.samplers import sample  # noqa: E402
from diffrun.schedules import LinearSchedule, alpha_sigma  # noqa: E402

TOLERANCE = 1e-5
INFO = float("inf")   # a row that informs (how far float32 is from float64) and cannot fail


def inputs(T: int, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x_start = torch.randint(0, 256, (batch, 3, 8, 8), generator=g).float() / 127.5 - 1   # 8-bit images in [−1, 1]
    t = torch.randint(0, T, (batch,), generator=g)
    t[:4] = torch.tensor([0, 1, T // 2, T - 1])
    noise = torch.randn(x_start.shape, generator=g)
    out = torch.cat([torch.randn(x_start.shape, generator=g), 2 * torch.rand(x_start.shape, generator=g) - 1], 1)
    return {"x_start": x_start, "t": t, "noise": noise, "out": out}


def loss_rows(gd, T: int, case: dict) -> list:
    """training_losses (L_hybrid) and p_mean_variance on identical inputs."""
    reference = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", T),
                                     model_mean_type=gd.ModelMeanType.EPSILON,
                                     model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                     loss_type=gd.LossType.RESCALED_MSE, rescale_timesteps=False)
    x0, t, noise, out = case["x_start"], case["t"], case["noise"], case["out"]
    terms = reference.training_losses(lambda x, ts: out, x0, t, noise=noise)

    schedule = LinearSchedule(timesteps=T)
    posterior = DiscretePosterior(schedule.timestep_table())
    denoiser = Denoiser(torch.nn.Identity(), "eps", learn_sigma=True)
    lam = schedule.timestep_table(dtype=torch.float32)[t]                      # as the training step draws it
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in alpha_sigma(lam))
    z = alpha * x0 + sigma * noise
    eps_hat, v = denoiser.split(out)
    mse = (eps_hat - noise).square().mean(dim=(1, 2, 3))
    x0_hat, _ = denoiser.predict_x0_eps(z, lam, eps_hat.detach())
    vb = hybrid_vb_term(posterior, T, t, x0, z, x0_hat, v)
    rows = [compare(f"training_losses mse (T={T})", mse, terms["mse"], TOLERANCE),
            compare(f"training_losses vb (T={T})", vb, terms["vb"], TOLERANCE),
            compare(f"training_losses loss (T={T})", mse + vb, terms["loss"], TOLERANCE)]

    x_t = reference.q_sample(x0, t, noise=noise)                               # the reference's x_t on both sides
    for clip in (False, True):
        ref = reference.p_mean_variance(lambda x, ts: out, x_t, t, clip_denoised=clip)
        x0_hat, _ = denoiser.predict_x0_eps(x_t, lam, eps_hat)
        x0_hat = x0_hat.clamp(-1, 1) if clip else x0_hat
        name = f"p_mean_variance clip={clip} (T={T})"
        # x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ amplifies float32 rounding by up to 1/√ᾱ_T ≈ 158: both sides are measured
        # against the same formula in float64, and ours may differ from the reference by twice its own error
        abar = torch.from_numpy(reference.alphas_cumprod)[t].view(-1, 1, 1, 1)
        exact = (x_t.double() - (1 - abar).sqrt() * eps_hat.double()) / abar.sqrt()
        exact = exact.clamp(-1, 1) if clip else exact
        own = compare(f"{name} pred_xstart: reference vs float64 (information)", ref["pred_xstart"], exact, INFO)
        rows += [own, compare(f"{name} pred_xstart: ours vs float64 (information)", x0_hat, exact, INFO), compare(f"{name} pred_xstart", x0_hat, ref["pred_xstart"], max(TOLERANCE, 2 * own.relative)),
                 compare(f"{name} mean", posterior.mean(t, x0_hat, x_t), ref["mean"], TOLERANCE),
                 compare(f"{name} log_variance", posterior.learned_log_variance(t, v), ref["log_variance"], TOLERANCE)]
    return rows


class ToyNet(torch.nn.Module):
    """A fixed function of (x, c_noise) with 2C outputs (ε̂, v ∈ (−1, 1)), the same on both sides."""

    def __init__(self, channels: int, learn_sigma: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        out = 2 * channels if learn_sigma else channels
        self.mix = torch.randn(out, channels, generator=g) / channels ** 0.5
        self.shift = torch.randn(out, generator=g)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.mix, x) + (self.shift * c_noise[:, None])[..., None, None]
        return torch.tanh(h)


def sampler_rows(gd, respace, T: int, steps: int, seed: int) -> list:
    """improved-diffusion `p_sample_loop` on `space_timesteps(T, [steps])` vs diffrun's `ddpm` sampler."""
    schedule = LinearSchedule(timesteps=T)
    table = schedule.timestep_table(dtype=torch.float32)
    rows = []
    for variance in ("learned", "fixed_large", "fixed_small"):
        learn_sigma = variance == "learned"
        net = ToyNet(3, learn_sigma, seed)
        var_type = {"learned": gd.ModelVarType.LEARNED_RANGE, "fixed_large": gd.ModelVarType.FIXED_LARGE,
                    "fixed_small": gd.ModelVarType.FIXED_SMALL}[variance]
        reference = respace.SpacedDiffusion(
            use_timesteps=respace.space_timesteps(T, [steps]), betas=gd.get_named_beta_schedule("linear", T),
            model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=var_type, loss_type=gd.LossType.MSE,
            rescale_timesteps=False)
        torch.manual_seed(seed)
        ref = reference.p_sample_loop(lambda x, t: net(x, -table[t] / 8), (4, 3, 8, 8), clip_denoised=True,
                                      device=torch.device("cpu"))
        ours = sample(Denoiser(net, "eps", learn_sigma=learn_sigma), schedule, (4, 3, 8, 8), steps=steps,
                      sampler="ddpm", ddpm_variance=variance, generator=torch.Generator().manual_seed(seed))
        rows.append(compare(f"p_sample_loop {variance}, {steps} of T={T} steps", ours, ref, TOLERANCE))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "openai/improved-diffusion")
    p.add_argument("--timesteps", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=50)
    args = p.parse_args(argv)
    gd = load_reference(args.reference, "improved_diffusion.gaussian_diffusion")
    respace = load_reference(args.reference, "improved_diffusion.respace")
    rows = []
    for T in args.timesteps:
        rows += loss_rows(gd, T, inputs(T, args.batch, args.seed))
    rows += sampler_rows(gd, respace, args.timesteps[0], args.sample_steps, args.seed)
    return report("learned variance, hybrid loss, DDPM ancestral vs openai/improved-diffusion",
                  reference_commit(args.reference), command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
