"""diffrun's DiT against facebookresearch/DiT `models.py` (which imports timm) on identical weights and inputs.

The official DiT is built tiny (8×8 inputs, patch 2, width 64, depth 2, 4 heads, 10 classes with the NULL row:
`class_dropout_prob` > 0), every trainable parameter set to N(0, 0.05²) — the zero-initialised adaLN and output
layers too, so every path matters —, renamed into ours (`our_name`), and both run in eval mode on the same x,
labels (including the NULL label 10) and noise level: ours gets c_noise, theirs t = noise_scale · c_noise (1000;
fractional, which `TimestepEmbedder` accepts). learn_sigma on and off. Classifier-free guidance: their
`forward_with_cfg` on the doubled batch against diffrun's `GuidedDenoiser` (the sampler's guidance) around
`Denoiser(ours, "eps", learn_sigma=True)`, with 3 input channels: DiT guides only the first 3 channels "for exact
reproducibility", diffrun every channel, which is the same thing when the prediction has 3 channels.

    git clone https://github.com/facebookresearch/DiT /path/outside/repo     # and: pip install timm
    PYTHONPATH=. python scripts/crosscheck/dit.py --reference /path/outside/repo
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.models.dit import DiT  # noqa: E402
from diffrun.models.parameterization import Denoiser  # noqa: E402
from diffrun.sampling.guidance import GuidedDenoiser  # noqa: E402
from diffrun.sampling.options import SamplerOptions  # noqa: E402

TOLERANCE = 1e-5
NOISE_SCALE = 1000.0
RENAMES = [(r"^x_embedder\.", "patch_embed."), (r"^t_embedder\.mlp\.", "noise_embed."),
           (r"^y_embedder\.embedding_table\.", "label_embed.table."), (r"\.adaLN_modulation\.1\.", ".modulation."),
           (r"^final_layer\.", "final.")]


def our_name(official: str) -> str | None:
    """facebookresearch/DiT parameter name → ours; None for `pos_embed` (a frozen parameter there, a buffer we derive)."""
    if official == "pos_embed":
        return None
    for pattern, replacement in RENAMES:
        official = re.sub(pattern, replacement, official)
    return official


def build_pair(models, in_channels: int, learn_sigma: bool, seed: int, classes: int = 10):
    torch.manual_seed(seed)
    theirs = models.DiT(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=64, depth=2, num_heads=4,
                        class_dropout_prob=0.1, num_classes=classes, learn_sigma=learn_sigma).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ours = DiT(in_channels=in_channels, image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4,
               num_classes=classes, noise_scale=NOISE_SCALE, learn_sigma=learn_sigma).eval()
    state = {our_name(k): v for k, v in theirs.state_dict().items() if our_name(k) is not None}
    ours.load_state_dict(state, strict=True)
    return theirs, ours


def inputs(in_channels: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, in_channels, 8, 8, generator=g)
    c_noise = torch.cat([torch.tensor([0.0, 0.001, 0.5, 0.999]), torch.rand(2, generator=g) * 2 - 1])
    labels = torch.tensor([0, 3, 9, 10, 10, 5])            # 10: the NULL label
    return x, c_noise, labels


def forward_rows(models, seed: int) -> list:
    rows = []
    for learn_sigma in (False, True):
        theirs, ours = build_pair(models, 4, learn_sigma, seed)
        x, c_noise, labels = inputs(4, seed)
        with torch.no_grad():
            ref = theirs(x, NOISE_SCALE * c_noise, labels)
            out = ours(x, c_noise, labels)
            ref_null = theirs(x, NOISE_SCALE * c_noise, torch.full_like(labels, 10))
            out_none = ours(x, c_noise, None)
        name = f"4×8×8, /2, width 64, depth 2, 4 heads, 10 classes, learn_sigma={learn_sigma}"
        rows += [compare(f"forward {name}", out, ref, TOLERANCE),
                 compare(f"forward {name}: our class_labels=None vs their all-NULL labels", out_none, ref_null,
                         TOLERANCE)]
    rows.append(compare("positional table: our buffer vs their frozen pos_embed", ours.pos_embed, theirs.pos_embed,
                        0.0))
    return rows


def cfg_rows(models, seed: int) -> list:
    rows = []
    theirs, ours = build_pair(models, 3, True, seed)
    x, c_noise, labels = inputs(3, seed)
    labels = labels.clamp(max=9)                            # conditional labels; the NULL half is the guidance's
    for scale in (1.5, 4.0):
        with torch.no_grad():
            ref = theirs.forward_with_cfg(torch.cat([x, x]), NOISE_SCALE * torch.cat([c_noise, c_noise]),
                                          torch.cat([labels, torch.full_like(labels, 10)]), scale)[: len(x)]
            guided = GuidedDenoiser(Denoiser(ours, "eps", learn_sigma=True), SamplerOptions(cfg_scale=scale),
                                    labels, None, None, "cpu")
            eps, v = guided.output(x, -8 * c_noise, math.inf)     # λ = −8 c_noise; σ outside no guidance interval
        rows += [compare(f"CFG s={scale}: guided ε (GuidedDenoiser vs forward_with_cfg), 3×8×8, learn_sigma",
                         eps, ref[:, :3], TOLERANCE),
                 compare(f"CFG s={scale}: v of the conditional half", v, ref[:, 3:], TOLERANCE)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "facebookresearch/DiT")
    args = p.parse_args(argv)
    models = load_reference(args.reference, "models")
    rows = forward_rows(models, args.seed) + cfg_rows(models, args.seed)
    return report("DiT vs facebookresearch/DiT", reference_commit(args.reference), command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
