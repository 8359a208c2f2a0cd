"""diffrun's strategies against the official code that defines them, per timestep of the DDPM grid.

* Min-SNR-γ (TiankaiHang/Min-SNR-Diffusion-Training, `guided_diffusion/gaussian_diffusion.py::training_losses`):
  `terms["mse"] / terms["mse_raw"]` for ε (`min_snr_5`), x0 (`min_snr_5`, START_X) and v (`vmin_snr_5`, VELOCITY)
  against `weighting=min_snr` on `model.prediction` eps, x0, v.
* P2 (jychoi118/P2-weighting, same function): `terms["mse"]` of a unit residual, γ = 1 and 0.5, k = 1, against
  `weighting=p2` / `p2_gamma05`.
* SpeeD (NUS-HPC-AI-Lab/SpeeD, `speed/diffusion/speed/__init__.py`): `Speed_IDDPM`'s P(t) (`self.p`), change-aware
  weights and pivot M against `weighting=speed`; `Speed_Mask_IDDPM`'s tanh levels and P2 weights against
  `weighting=speed_p2` (its levels are compared after normalising: ours are 1 + (k − 1)·step, theirs tanh + 1.5).
All on the linear schedule with T = 1000 (the tables agree to 1.8·10⁻¹⁵ in λ, docs/samplers.md).

    PYTHONPATH=. python scripts/crosscheck/strategies.py --min-snr <checkout> --p2 <checkout> --speed <checkout>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, reference_commit, report  # noqa: E402

from diffrun.schedules import LinearSchedule  # noqa: E402
from diffrun.strategies import MinSNR, P2, SpeeD, SpeeDP2  # noqa: E402

T = 1000


def per_timestep_weight(gd, diffusion) -> torch.Tensor:
    """The weight the reference's `training_losses` puts on each t: a unit residual (model output = target + 1)."""
    t = torch.arange(T)
    x_start = torch.zeros(T, 1, 1, 1)
    noise = torch.zeros(T, 1, 1, 1)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    target = {gd.ModelMeanType.EPSILON: noise, gd.ModelMeanType.START_X: x_start}.get(diffusion.model_mean_type)
    if target is None:   # VELOCITY, as the Min-SNR code defines it: (α x_t − x0)/σ
        alpha = torch.from_numpy(diffusion.sqrt_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
        sigma = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
        target = (alpha * x_t - x_start) / sigma
    terms = diffusion.training_losses(lambda x, ts, **kw: target + 1, x_start, t, noise=noise)
    return terms["mse"]


def min_snr_rows(checkout: Path) -> list:
    gd = load_reference(checkout, "guided_diffusion.gaussian_diffusion")
    schedule = LinearSchedule(timesteps=T)
    lam = schedule.timestep_table(dtype=torch.float32)
    rows = []
    for prediction, mean_type, name in (("eps", gd.ModelMeanType.EPSILON, "min_snr_5"),
                                        ("x0", gd.ModelMeanType.START_X, "min_snr_5"),
                                        ("v", gd.ModelMeanType.VELOCITY, "vmin_snr_5")):
        diffusion = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", T), model_mean_type=mean_type,
                                         model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE,
                                         mse_loss_weight_type=name)
        ours = MinSNR(gamma=5.0).bind(schedule, prediction).weight_in(prediction, lam)
        rows.append(compare(f"Min-SNR-5 on {prediction} ({name}), every t of T={T}", ours,
                            per_timestep_weight(gd, diffusion), 1e-5))
    return rows


def p2_rows(checkout: Path) -> list:
    gd = load_reference(checkout, "guided_diffusion.gaussian_diffusion")
    schedule = LinearSchedule(timesteps=T)
    lam = schedule.timestep_table(dtype=torch.float32)
    rows = []
    for gamma in (1.0, 0.5):
        diffusion = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", T),
                                         model_mean_type=gd.ModelMeanType.EPSILON,
                                         model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE,
                                         p2_gamma=gamma, p2_k=1)
        ours = P2(gamma=gamma, k=1.0).bind(schedule, "eps").weight_in("eps", lam)
        rows.append(compare(f"P2 γ={gamma:g}, k=1 on eps, every t of T={T}", ours,
                            per_timestep_weight(gd, diffusion), 1e-5))
    return rows


def speed_rows(checkout: Path) -> list:
    official = load_reference(checkout, "speed.diffusion.speed", bare_packages=("speed", "speed.diffusion"))
    schedule = LinearSchedule(timesteps=T)
    lam = schedule.timestep_table(dtype=torch.float32)
    rows = []
    for k, lam_weight in ((5, 0.6), (2, 0.6), (1, 0.6)):
        theirs = official.Speed_IDDPM(timestep_respacing="", k=k, lam=lam_weight, tau=700)
        ours = SpeeD(k=float(k), tau=700, lam=lam_weight).bind(schedule, "eps")
        rows += [compare(f"SpeeD (Speed_IDDPM) k={k}, λ={lam_weight}: P(t)", ours.probs, theirs.p, 1e-6),
                 compare(f"SpeeD (Speed_IDDPM) k={k}, λ={lam_weight}: change-aware weight", ours.weight_in("eps", lam),
                         torch.from_numpy(np.asarray(theirs.weights)), 1e-6),
                 compare(f"SpeeD (Speed_IDDPM) k={k}: pivot M", torch.tensor(float(ours.pivot)),
                         torch.tensor(float(theirs.meaningful_steps)), 0.0)]
    theirs = official.Speed_Mask_IDDPM(timestep_respacing="")
    ours = SpeeDP2().bind(schedule, "eps")
    rows += [compare("SpeeD P2 variant (Speed_Mask_IDDPM): P2 weight", ours.weight_in("eps", lam),
                     torch.from_numpy(np.asarray(theirs.weights)), 1e-6),
             compare("SpeeD P2 variant (Speed_Mask_IDDPM): P(t), normalised", ours.probs, theirs.p, 1e-6)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-snr", type=Path, help="a checkout of TiankaiHang/Min-SNR-Diffusion-Training")
    p.add_argument("--p2", type=Path, help="a checkout of jychoi118/P2-weighting")
    p.add_argument("--speed", type=Path, help="a checkout of NUS-HPC-AI-Lab/SpeeD")
    args = p.parse_args(argv)
    if not (args.min_snr or args.p2 or args.speed):
        p.error("give at least one of --min-snr, --p2, --speed")
    status = 0
    # Min-SNR and P2 both ship a package named guided_diffusion: each runs with only its own on the path
    for checkout, rows_of, title in ((args.min_snr, min_snr_rows, "Min-SNR-γ vs TiankaiHang/Min-SNR-Diffusion-Training"),
                                     (args.p2, p2_rows, "P2 vs jychoi118/P2-weighting"),
                                     (args.speed, speed_rows, "SpeeD vs NUS-HPC-AI-Lab/SpeeD")):
        if checkout is None:
            continue
        for name in [m for m in sys.modules if m == "guided_diffusion" or m.startswith("guided_diffusion.")]:
            del sys.modules[name]
        status |= report(title, reference_commit(checkout), command_line(), rows_of(checkout))
        print()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
