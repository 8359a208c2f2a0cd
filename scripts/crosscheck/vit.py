"""diffrun's Min-SNR ViT against TiankaiHang/Min-SNR-Diffusion-Training `guided_diffusion/vision_transformer.py`
(which imports timm) on identical weights and inputs.

The official `VisionTransformer` is built tiny as its factories build the real ones (`qkv_bias=True`, LayerNorm
eps 1e-6, `drop_label_prob=0.15` so the class table has the NULL row, `use_fp16=False`; unconditional: their
`num_classes=-1`), every parameter set to N(0, 0.1²) (LayerNorm gains 1 + N(0, 0.1²)), renamed into ours
(`our_name`), and both run in eval mode. Theirs gets integer DDPM steps t of the cosine schedule (0, 1, 250, 499,
500, 750, 998, 999), ours c_noise = −λ_t/8 with λ_t = `CosineSchedule().discrete_logsnr(1000)[t]`; the first rows
check that our table lookup `ours.timestep(c_noise)` gives back t exactly. Classifier-free guidance: their
`forward_with_cfg` against diffrun's `GuidedDenoiser` (the sampler's guidance) around `Denoiser(ours, "eps")`.

    git clone https://github.com/TiankaiHang/Min-SNR-Diffusion-Training /path/outside/repo   # and: pip install timm
    PYTHONPATH=. python scripts/crosscheck/vit.py --reference /path/outside/repo
"""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.models.parameterization import Denoiser  # noqa: E402
from diffrun.models.vit import ViT  # noqa: E402
from diffrun.sampling.guidance import GuidedDenoiser  # noqa: E402
from diffrun.sampling.options import SamplerOptions  # noqa: E402
from diffrun.schedules import CosineSchedule  # noqa: E402

TOLERANCE = 1e-5
STEPS = torch.tensor([0, 1, 250, 499, 500, 750, 998, 999])
RENAMES = {"linear_projection.": "out.", "class_embedding.": "label_embed.table.", "time_embedding.": "noise_embed."}

CONFIGS = {   # name: (in_channels, patch, width, depth, heads, classes, table rows)
    "4×8×8, /2, width 32, depth 2, 2 heads, 10 classes, 1000 rows": (4, 2, 32, 2, 2, 10, 1000),
    "4×8×8, /2, width 32, depth 2, 2 heads, 10 classes, 4000 rows (official num_steps)": (4, 2, 32, 2, 2, 10, 4000),
    "4×8×8, /2, width 32, depth 2, 2 heads, unconditional, 4000 rows": (4, 2, 32, 2, 2, 0, 4000),
    "3×8×8, /4, width 32, depth 3, 4 heads, 7 classes, 1000 rows": (3, 4, 32, 3, 4, 7, 1000),
}


def our_name(official: str) -> str:
    for prefix, ours in RENAMES.items():
        if official.startswith(prefix):
            return ours + official[len(prefix):]
    return official


def build_pair(vt, config: tuple, seed: int):
    channels, patch, width, depth, heads, classes, rows = config
    torch.manual_seed(seed)
    theirs = vt.VisionTransformer(img_size=8, patch_size=patch, in_chans=channels, num_classes=classes or -1,
                                  embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_steps=rows,
                                  drop_label_prob=0.15, use_fp16=False).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.normal_(0, 0.1)
            if ".norm" in name and name.endswith("weight"):
                p.add_(1.0)
    ours = ViT(in_channels=channels, image_size=8, patch_size=patch, hidden_size=width, depth=depth, num_heads=heads,
               num_classes=classes, noise_embedding="table", table_rows=rows, num_timesteps=1000).eval()
    ours.load_state_dict({our_name(k): v for k, v in theirs.state_dict().items()}, strict=True)
    return theirs, ours


def inputs(channels: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(STEPS), channels, 8, 8, generator=g)
    c_noise = (-CosineSchedule().discrete_logsnr(1000)[STEPS] / 8).float()
    labels = torch.randint(0, classes, (len(STEPS),), generator=g) if classes else None
    if classes:
        labels[-2:] = classes                                          # the NULL label
    return x, c_noise, labels


def forward_rows(vt, seed: int) -> list:
    rows = []
    for name, config in CONFIGS.items():
        theirs, ours = build_pair(vt, config, seed)
        classes = config[5]
        x, c_noise, labels = inputs(config[0], classes, seed)
        rows.append(compare(f"{name}: our step lookup vs t", ours.timestep(c_noise), STEPS, 0.0))
        with torch.no_grad():
            ref, out = theirs(x, STEPS, labels), ours(x, c_noise, labels)
        rows.append(compare(f"forward {name}", out, ref, TOLERANCE))
        if classes:
            with torch.no_grad():
                ref_null = theirs(x, STEPS, torch.full_like(labels, classes))
                out_none = ours(x, c_noise, None)
            rows.append(compare(f"forward {name}: our class_labels=None vs their all-NULL labels", out_none,
                                ref_null, TOLERANCE))
    return rows


def cfg_rows(vt, seed: int) -> list:
    name, config = next(iter(CONFIGS.items()))
    theirs, ours = build_pair(vt, config, seed)
    x, c_noise, labels = inputs(config[0], config[5], seed)
    labels = labels.clamp(max=config[5] - 1)
    rows = []
    for scale in (1.5, 4.0):
        with torch.no_grad():
            ref = theirs.forward_with_cfg(torch.cat([x, x]), torch.cat([STEPS, STEPS]),
                                          torch.cat([labels, torch.full_like(labels, config[5])]), scale)[: len(x)]
            guided = GuidedDenoiser(Denoiser(ours, "eps"), SamplerOptions(cfg_scale=scale), labels, None, None, "cpu")
            eps, _ = guided.output(x, -8 * c_noise, math.inf)
        rows.append(compare(f"CFG s={scale}: guided ε (GuidedDenoiser vs forward_with_cfg), {name}", eps, ref,
                            TOLERANCE))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "TiankaiHang/Min-SNR-Diffusion-Training")
    args = p.parse_args(argv)
    vt = load_reference(args.reference, "guided_diffusion.vision_transformer")
    rows = forward_rows(vt, args.seed) + cfg_rows(vt, args.seed)
    return report("Min-SNR ViT vs TiankaiHang/Min-SNR-Diffusion-Training", reference_commit(args.reference),
                  command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
