"""diffrun's DDIM sampler against the official DDIM code, ermongroup/ddim `functions/denoising.py::generalized_steps`.

Identical inputs: a fixed toy ε-network (`ToyNet`) that both sides call at the same
float32 λ — theirs as `model(x, t)` with λ = our discrete table at their integer step t, ours through
`Denoiser(net, "eps")` —; their betas derived from our discrete table (β_k = 1 − ᾱ_k/ᾱ_{k−1}), in float64 (an information row per case
also gives float32 betas, as their runner passes them: `torch.from_numpy(betas).float()`, whose float32 cumprod of
ᾱ is the larger part of the difference), so the schedule is not what is compared; the same latents and
step noise: both draw from the global generator after `torch.manual_seed(seed)` (theirs `randn_like` at every step,
ours only where c > 0, which is every step but the last, so our draws are a prefix of theirs). x̂0 is not clipped:
`generalized_steps` does not clip, so ours runs with `clip_x0=False`.

Grids: all T = 1000 steps through diffrun's `run_sampler` (the end-to-end path; theirs `skip_type="uniform"` with
1000 steps); and their respaced grids — `uniform` (range(0, T, T // n)) and `quad` (their runner's formula, written
here) — through our `ddim` step on the λ of the same steps (diffrun's own respacing is improved-diffusion's, which
picks other steps). Their loop moves x to 'cuda' every step; `cuda_to_cpu` keeps it on the CPU.

    git clone https://github.com/ermongroup/ddim /path/outside/repo
    PYTHONPATH=. python scripts/crosscheck/ddim.py --reference /path/outside/repo
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.models.parameterization import Denoiser  # noqa: E402
from diffrun.sampling.guidance import GuidedDenoiser  # noqa: E402
from diffrun.sampling.options import SamplerOptions  # noqa: E402
from diffrun.sampling.samplers import ddim, run_sampler  # noqa: E402
from diffrun.schedules import CosineSchedule, LinearSchedule  # noqa: E402

T = 1000
SHAPE = (4, 3, 8, 8)
TOLERANCE = 1e-5
INFO = float("inf")   # informs (the reference's own float32 ᾱ table) and cannot fail


class ToyNet(torch.nn.Module):
    """A fixed ε̂(x, c_noise): the exact ε-prediction for data N(0, 0.5²) plus 0.1·tanh(mix·x + shift·c_noise), so
    the unclipped trajectories stay near the data range and the network still matters; float32 on both sides."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(3, 3, generator=g) / 3 ** 0.5
        self.shift = torch.randn(3, generator=g)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        logsnr = (-8 * c_noise)[:, None, None, None]
        alpha2, sigma2 = torch.sigmoid(logsnr), torch.sigmoid(-logsnr)
        exact = sigma2.sqrt() * x / (0.25 * alpha2 + sigma2)
        h = torch.einsum("oc,bchw->bohw", self.mix, x) + (self.shift * c_noise[:, None])[..., None, None]
        return exact + 0.1 * torch.tanh(h)


class cuda_to_cpu(TorchFunctionMode):
    """`tensor.to('cuda')` → `tensor.to('cpu')` (generalized_steps hard-codes 'cuda')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        return func(*args, **(kwargs or {}))


def their_seq(kind: str, steps: int) -> list[int]:
    if kind == "uniform":
        return list(range(0, T, T // steps))
    return [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]   # their runner's skip_type="quad"


def theirs(denoising, net, table32: torch.Tensor, betas: torch.Tensor, seq: list[int], eta: float, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(SHAPE)
    with cuda_to_cpu():
        xs, _ = denoising.generalized_steps(x, seq, lambda x, t: net(x.float(), -table32[t.long()] / 8), betas, eta=eta)
    return xs[-1]


def rows_for(denoising, schedule, name: str, seed: int, end_to_end: bool) -> list:
    net = ToyNet(seed)
    table = schedule.discrete_logsnr(T).double()                        # λ_k, k = 0..T−1, noisiest last
    table32 = table.float()
    abar = torch.sigmoid(table)
    betas64 = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    rows = []
    cases = []
    if end_to_end:
        cases += [("all 1000 steps, run_sampler", None, 0.0), ("all 1000 steps, run_sampler", None, 1.0)]
    cases += [(f"{kind} 50 of 1000 steps, our ddim step", kind, eta) for kind in ("uniform", "quad")
              for eta in (0.0, 0.5, 1.0)]
    for case, kind, eta in cases:
        seq = their_seq(kind or "uniform", 50 if kind else T)
        torch.manual_seed(seed)
        if kind is None:
            options = SamplerOptions(sampler="ddim", steps=T, eta=eta, clip_x0=False)
            ours = run_sampler(Denoiser(net, "eps"), schedule, SHAPE, options, generator=None).images
        else:
            predict = GuidedDenoiser(Denoiser(net, "eps"), SamplerOptions(clip_x0=False), None, None, None, "cpu")
            ours = ddim(predict, [float(table32[k]) for k in reversed(seq)], eta, torch.randn(SHAPE), None)
        ref = theirs(denoising, net, table32, betas64.float(), seq, eta, seed)
        ref64 = theirs(denoising, net, table32, betas64, seq, eta, seed)
        label = f"{name}, {case}, η={eta:g}"
        rows += [compare(f"{label}", ours, ref64, TOLERANCE),
                 compare(f"{label}: ours vs the reference with float32 betas, as its runner (information)", ours,
                         ref, INFO)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "ermongroup/ddim")
    args = p.parse_args(argv)
    denoising = load_reference(args.reference, "functions.denoising")
    rows = rows_for(denoising, LinearSchedule(timesteps=T), "linear", args.seed, end_to_end=True)
    rows += rows_for(denoising, CosineSchedule(timesteps=T), "cosine (our table)", args.seed, end_to_end=False)
    return report("DDIM vs ermongroup/ddim generalized_steps", reference_commit(args.reference), command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
