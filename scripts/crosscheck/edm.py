"""diffrun against NVlabs/edm on identical inputs: the SongUNet backbones (DDPM++, NCSN++), the Heun sampler
(`generate.py::edm_sampler`) and the non-leaking augmentation (`training/augment.py::AugmentPipe`).

SongUNet: EDM's net built with O(1) random weights (its own init leaves the output near 0, which would hide errors),
converted to our names (docs/networks.md "EDM state dict → ours"), both run in eval mode on the same x, c_noise,
labels. Heun: EDM's `EDMPrecond` around a small EDM SongUNet against our `Denoiser(prediction="edm")` around the
same SongUNet module — each side wraps the network its own way — same latents and churn noise from one generator
seed. Augmentation: both pipelines with EDM's CIFAR-10 multipliers after `torch.manual_seed(seed)`.

    git clone https://github.com/NVlabs/edm /path/outside/repo
    PYTHONPATH=. python scripts/crosscheck/edm.py --reference /path/outside/repo
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.data.augment import AugmentPipe  # noqa: E402
from diffrun.models.parameterization import Denoiser  # noqa: E402
from diffrun.models.song_unet import SongUNet  # noqa: E402
from diffrun.sampling.options import SamplerOptions  # noqa: E402
from diffrun.sampling.samplers import run_sampler  # noqa: E402
from diffrun.schedules import EDMSchedule  # noqa: E402

EDM_CIFAR_AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)   # EDM train.py
BLOCK_RENAMES = {"affine": "emb_proj", "norm2": "attn_norm", "proj": "attn_proj"}


def our_name(edm_name: str, image_size: int, levels: int) -> str | None:
    """EDM's SongUNet parameter name → ours (docs/networks.md); None for the filter buffers ours derive."""
    if edm_name.endswith("resample_filter"):
        return None
    fixed = {"map_noise.freqs": "noise_embedding.freqs", "map_label.weight": "class_embedding.linear.weight",
             "map_label.bias": "class_embedding.linear.bias", "map_augment.weight": "augment_embedding.weight"}
    if edm_name in fixed:
        return fixed[edm_name]
    m = re.fullmatch(r"map_layer([01])\.(weight|bias)", edm_name)
    if m:
        return f"mapping.{2 * int(m[1])}.{m[2]}"
    m = re.fullmatch(r"(enc|dec)\.(\d+)x\d+_([a-z_]+?)(\d*)\.(.+)", edm_name)
    side, res, kind, index, rest = m[1], int(m[2]), m[3], m[4], m[5]
    level = int(math.log2(image_size // res))
    head, _, tail = rest.partition(".")
    rest = ".".join([BLOCK_RENAMES.get(head, head), tail]) if tail else BLOCK_RENAMES.get(rest, rest)
    if side == "enc":
        if kind == "conv":
            return f"stem.{rest}"
        if kind == "down":
            return f"encoder.{level}.down.{rest}"
        if kind == "block":
            return f"encoder.{level}.blocks.{index}.{rest}"
        if kind == "aux_skip":
            return f"encoder.{level}.aux_conv.{rest}"
        if kind == "aux_residual":
            return f"encoder.{level}.aux_conv.conv.{rest}"
    j = levels - 1 - level
    if kind in ("in", "up"):
        return f"decoder.{j}.entry.{index or 0}.{rest}"
    if kind == "block":
        return f"decoder.{j}.blocks.{index}.{rest}"
    if kind == "aux_norm":
        return f"decoder.{j}.head.0.{rest}"
    if kind == "aux_conv":
        return f"decoder.{j}.head.2.{rest}"
    raise ValueError(f"no rule for EDM parameter {edm_name}")


def convert(edm_net, image_size: int, levels: int) -> dict:
    state = {}
    for name, value in edm_net.state_dict().items():
        ours = our_name(name, image_size, levels)
        if ours is not None:
            state[ours] = value
    return state


NETWORKS = {   # (EDM SongUNet kwargs, ours) at 16×16 with 2 levels: every block kind, small enough for the CPU
    "DDPM++ (positional, standard), 10 classes + augment_dim 9": dict(
        edm=dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                 channel_mult_noise=1, resample_filter=[1, 1], label_dim=10, augment_dim=9),
        ours=dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], num_classes=10, augment_dim=9)),
    "NCSN++ (fourier, residual), unconditional": dict(
        edm=dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                 channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
        ours=dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                  channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "skip encoder + skip decoder, 10 classes": dict(
        edm=dict(embedding_type="positional", encoder_type="skip", decoder_type="skip", channel_mult_noise=1,
                 resample_filter=[1, 3, 3, 1], label_dim=10),
        ours=dict(embedding_type="positional", encoder_type="skip", decoder_type="skip", channel_mult_noise=1,
                  resample_filter=[1, 3, 3, 1], num_classes=10)),
}
SHARED = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def network_rows(edm_networks, seed: int) -> list:
    rows = []
    for case, kwargs in NETWORKS.items():
        torch.manual_seed(seed)
        theirs = edm_networks.SongUNet(img_resolution=16, in_channels=3, out_channels=3, **SHARED,
                                       **kwargs["edm"]).eval()
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.2)
        ours = SongUNet(in_channels=3, image_size=16, **SHARED, **kwargs["ours"]).eval()
        ours.load_state_dict(convert(theirs, 16, len(SHARED["channel_mult"])), strict=True)
        g = torch.Generator().manual_seed(seed)
        x, c_noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, generator=g)
        classes = kwargs["ours"].get("num_classes", 0)
        labels = torch.tensor([0, 3, 9, classes]) if classes else None            # the last: the null label
        one_hot = None
        if classes:
            one_hot = torch.zeros(4, classes)
            one_hot[torch.arange(3), labels[:3]] = 1                               # EDM: the null label is all zeros
        augment = torch.randn(4, 9, generator=g) if kwargs["ours"].get("augment_dim") else None
        with torch.no_grad():
            ref = theirs(x, c_noise, one_hot, augment_labels=augment)
            out = ours(x, c_noise, labels, augment)
        rows.append(compare(f"SongUNet {case}, float32", out, ref, 1e-5))
    return rows


class Backbone(torch.nn.Module):
    """EDM's SongUNet with our backbone signature net(x, c_noise)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, c_noise):
        return self.net(x, c_noise, None)


def heun_rows(edm_networks, generate, seed: int) -> list:
    torch.manual_seed(seed)
    precond = edm_networks.EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16,
                                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0).eval()
    with torch.no_grad():
        for p in precond.parameters():
            p.normal_(0, 0.2)
    ours = Denoiser(Backbone(precond.model), "edm", 0.5).eval()
    rows = []
    for name, churn in (("deterministic, 18 steps", {}),
                        ("S_churn 40, S_min 0.05, S_max 50, S_noise 1.003, 18 steps",
                         dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003))):
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(4, 3, 8, 8, generator=g)
        with torch.no_grad():
            ref = generate.edm_sampler(precond, latents, randn_like=lambda x: torch.randn(
                x.shape, dtype=x.dtype, generator=g), num_steps=18, **churn)
        options = SamplerOptions(sampler="heun", steps=18, s_churn=churn.get("S_churn", 0.0),
                                 s_min=churn.get("S_min", 0.0), s_max=churn.get("S_max", math.inf),
                                 s_noise=churn.get("S_noise", 1.0))
        out = run_sampler(ours, EDMSchedule(), (4, 3, 8, 8), options, generator=torch.Generator().manual_seed(seed))
        rows.append(compare(f"heun vs edm_sampler, {name} (each side its own wrapper)", out.images, ref, 1e-4))
    return rows


def augment_rows(edm_augment, seed: int) -> list:
    rows = []
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    for p in (0.0, 0.12, 0.5, 1.0):
        torch.manual_seed(seed)
        ref_images, ref_labels = edm_augment.AugmentPipe(p=p, **EDM_CIFAR_AUGMENT)(images)
        torch.manual_seed(seed)
        out_images, out_labels = AugmentPipe(p=p, **EDM_CIFAR_AUGMENT)(images)
        rows += [compare(f"AugmentPipe p={p} images", out_images, ref_images, 1e-5),
                 compare(f"AugmentPipe p={p} labels", out_labels, ref_labels, 0.0)]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "NVlabs/edm")
    p.add_argument("--only", nargs="+", choices=("networks", "heun", "augment"),
                   default=["networks", "heun", "augment"])
    args = p.parse_args(argv)
    edm_networks = load_reference(args.reference, "training.networks")
    rows = []
    if "networks" in args.only:
        rows += network_rows(edm_networks, args.seed)
    if "heun" in args.only:
        rows += heun_rows(edm_networks, load_reference(args.reference, "generate"), args.seed)
    if "augment" in args.only:
        rows += augment_rows(load_reference(args.reference, "training.augment"), args.seed)
    return report("SongUNet, Heun and AugmentPipe vs NVlabs/edm", reference_commit(args.reference), command_line(),
                  rows)


if __name__ == "__main__":
    raise SystemExit(main())
