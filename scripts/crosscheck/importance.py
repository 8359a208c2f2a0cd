"""diffrun's `weighting=importance` against openai/improved-diffusion `resample.py::LossSecondMomentResampler`.

Both are told the same (timestep, loss) batches — improved-diffusion through `update_with_all_losses`, ours through
`observe` — and after each batch the sampling probabilities p_t (uniform until every timestep has 10 losses, then
∝ √E[L_t²] mixed with 0.1 % uniform) and the importance weights 1/(T p_t) are compared.

    PYTHONPATH=. python scripts/crosscheck/importance.py --reference /path/to/improved-diffusion
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.schedules import LinearSchedule  # noqa: E402
from diffrun.strategies import NoiseDraw  # noqa: E402
from diffrun.strategies.importance import ImportanceSampling  # noqa: E402


class _Diffusion:
    """All the resampler reads of a diffusion: its number of timesteps."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "openai/improved-diffusion")
    p.add_argument("--timesteps", type=int, default=100)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    resample = load_reference(args.reference, "improved_diffusion.resample")
    if not hasattr(np, "int"):  # the reference predates NumPy 1.24, which removed the alias np.int = int
        np.int = int
        print("note: np.int (removed in NumPy 1.24) aliased to int for the reference's resample.py")
    T = args.timesteps
    reference = resample.LossSecondMomentResampler(_Diffusion(T))
    ours = ImportanceSampling().bind(LinearSchedule(timesteps=T), "eps")
    g = torch.Generator().manual_seed(args.seed)
    worst_p = worst_w = None
    warm_at = None
    for step in range(args.batches):
        t = torch.randint(T, (args.batch,), generator=g)
        loss = torch.rand(args.batch, generator=g, dtype=torch.float64) * (1 + t.double() / T)  # loss grows with t
        reference.update_with_all_losses(t.tolist(), loss.tolist())
        ours.observe(NoiseDraw(logsnr=torch.zeros(args.batch), proposal_weight=torch.ones(args.batch), index=t),
                     loss.float(), torch.tensor(True))
        w = torch.from_numpy(reference.weights())
        p_ref, p_ours = w / w.sum(), ours.probabilities()             # ScheduleSampler.sample: p = w / Σw
        row_p = compare("p_t", p_ours, p_ref, 1e-6)
        row_w = compare("1/(T p_t)", 1 / (T * p_ours.double()), 1 / (T * p_ref), 1e-6)
        worst_p = row_p if worst_p is None or row_p.relative > worst_p.relative else worst_p
        worst_w = row_w if worst_w is None or row_w.relative > worst_w.relative else worst_w
        if warm_at is None and reference._warmed_up():
            warm_at = step
    warm = "never warmed up" if warm_at is None else f"warm from batch {warm_at}"
    worst_p.case = f"p_t, worst of {args.batches} batches of {args.batch} (T={T}, {warm})"
    worst_w.case = f"importance weight 1/(T p_t), worst of {args.batches} batches (T={T})"
    return report("importance sampling vs improved-diffusion LossSecondMomentResampler",
                  reference_commit(args.reference), command_line(), [worst_p, worst_w])


if __name__ == "__main__":
    raise SystemExit(main())
