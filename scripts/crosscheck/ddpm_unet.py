"""diffrun's DDPM U-Net against tqch/ddpm-torch `ddpm_torch/models/unet.py` on identical weights and inputs.

ddpm-torch is the PyTorch port of Ho et al.'s U-Net that the DDPM configs cite (conf/experiment/
all_strategies_cifar10.yaml). Both are built small with the CIFAR-10 width (128 channels, so that both take 32
GroupNorm groups everywhere: ours min(32, C/4), theirs always 32), channel_mult (1, 2) at 8×8, attention at the 4×4
level, dropout 0; every parameter is set to N(0, 0.05²) (GroupNorm gains 1 + N(0, 0.05²)), renamed into ours
(`convert`), and both run in eval mode on the same x.

The noise-level input differs by design (diffrun/models/unet.py): ddpm-torch embeds the integer step t with DDPM's
sinusoid, ours c_noise with fixed Fourier features so that any schedule can drive it. Both then run the same
Linear–SiLU–Linear. To compare everything after the features, the script hands theirs our features: their module's
`get_timestep_embedding` is replaced, at run time, by one that returns what our MLP received for the same inputs.

    git clone https://github.com/tqch/ddpm-torch /path/outside/repo
    PYTHONPATH=. python scripts/crosscheck/ddpm_unet.py --reference /path/outside/repo
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, compare, load_reference, parser, reference_commit, report  # noqa: E402

from diffrun.models.unet import UNet  # noqa: E402

TOLERANCE = 1e-5
RES_BLOCK = {"norm1": "norm1", "conv1": "conv1", "fc": "emb_proj", "norm2": "norm2", "conv2": "conv2", "skip": "skip"}
ATTENTION = {"norm": "norm", "project_in": "qkv", "project_out": "proj"}


def block_pairs(theirs_prefix: str, ours_prefix: str, attention: bool) -> list[tuple[str, str, dict]]:
    """A ddpm-torch block (a ResidualBlock, or Sequential(ResidualBlock, AttentionBlock)) → our ModuleList."""
    if not attention:
        return [(theirs_prefix, f"{ours_prefix}.0", RES_BLOCK)]
    return [(f"{theirs_prefix}.0", f"{ours_prefix}.0", RES_BLOCK), (f"{theirs_prefix}.1", f"{ours_prefix}.1", ATTENTION)]


def module_pairs(levels: int, num_res_blocks: int, attention_levels: set[int]) -> list[tuple[str, str, dict | None]]:
    """(their module prefix, our module prefix, renames of the parameter's module) in network order."""
    pairs: list = [("embed.0", "embed.mlp.0", None), ("embed.2", "embed.mlp.2", None), ("in_conv", "stem", None)]
    k = 0
    for level in range(levels):
        for j in range(num_res_blocks):
            pairs += block_pairs(f"downsamples.level_{level}.{j}", f"down.{k}", level in attention_levels)
            k += 1
        if level != levels - 1:   # Sequential(SamePad2d, Conv2d) → ModuleList([Conv2d])
            pairs.append((f"downsamples.level_{level}.{num_res_blocks}.1", f"down.{k}.0", None))
            k += 1
    pairs += [("middle.0", "mid.0", RES_BLOCK), ("middle.1", "mid.1", ATTENTION), ("middle.2", "mid.2", RES_BLOCK)]
    k = 0
    for level in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            pairs += block_pairs(f"upsamples.level_{level}.{j}", f"up.{k}", level in attention_levels)
            k += 1
        if level != 0:            # Sequential(Upsample, Conv2d) → ModuleList([Upsample, Conv2d])
            pairs.append((f"upsamples.level_{level}.{num_res_blocks + 1}.1", f"up.{k}.1", None))
            k += 1
    return pairs + [("out_conv.0", "out.0", None), ("out_conv.2", "out.2", None)]


def convert(state: dict, levels: int, num_res_blocks: int, attention_levels: set[int]) -> dict:
    """ddpm-torch UNet state dict → ours; every parameter of theirs must be used once."""
    ours, left = {}, dict(state)
    for theirs_prefix, ours_prefix, renames in module_pairs(levels, num_res_blocks, attention_levels):
        for name in [n for n in left if n.startswith(theirs_prefix + ".")]:
            rest = name[len(theirs_prefix) + 1:]
            if renames is not None:
                head, _, tail = rest.partition(".")
                if head not in renames:
                    continue
                rest = f"{renames[head]}.{tail}"
            ours[f"{ours_prefix}.{rest}"] = left.pop(name)
    if left:
        raise ValueError(f"ddpm-torch parameters not mapped: {sorted(left)}")
    return ours


CONFIGS = {   # name: (channel_mult, num_res_blocks, attention levels)
    "128 ch, mult (1, 2), 2 res-blocks, attention at 4×4": ((1, 2), 2, {1}),
    "128 ch, mult (1, 2, 2), 1 res-block, attention at 4×4 (attention and skips at two levels)": ((1, 2, 2), 1, {1}),
}


def rows_for(unet_module, name: str, config: tuple, seed: int) -> list:
    mult, blocks, attention_levels = config
    torch.manual_seed(seed)
    theirs = unet_module.UNet(in_channels=3, hid_channels=128, out_channels=3, ch_multipliers=mult,
                              num_res_blocks=blocks, apply_attn=[i in attention_levels for i in range(len(mult))],
                              drop_rate=0.0).eval()
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            p.normal_(0, 0.05)
            if p.ndim == 1 and "norm" in pname and pname.endswith("weight"):
                p.add_(1.0)
    shape = dict(in_channels=3, image_size=8, channels=128, channel_mult=mult, num_res_blocks=blocks,
                 attention_resolutions=[8 // 2 ** level for level in attention_levels], dropout=0.0)
    ours = UNet(**shape, downsample_padding="same").eval()             # DDPM's down-sampling padding (the presets')
    symmetric = UNet(**shape, downsample_padding="symmetric").eval()   # ADM's, for the information row
    weights = convert(theirs.state_dict(), len(mult), blocks, attention_levels)
    ours.load_state_dict(weights, strict=True)
    symmetric.load_state_dict(weights, strict=True)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    c_noise = torch.tensor([-1.2, -0.3, 0.4, 1.5])
    features = []
    hook = ours.embed.mlp.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    original = unet_module.get_timestep_embedding
    unet_module.get_timestep_embedding = lambda t, dim: features[-1]   # our Fourier features of c_noise
    try:
        with torch.no_grad():
            out = ours(x, c_noise)
            ref = theirs(x, c_noise)
            out_symmetric = symmetric(x, c_noise)
    finally:
        hook.remove()
        unet_module.get_timestep_embedding = original
    return [compare(f"{name}: outputs (their sinusoid replaced by our features)", out, ref, TOLERANCE),
            compare(f"{name}: information: model.net.downsample_padding=symmetric (ADM's)", out_symmetric, ref,
                    math.inf)]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "tqch/ddpm-torch")
    args = p.parse_args(argv)
    unet_module = load_reference(args.reference, "ddpm_torch.models.unet", bare_packages=("ddpm_torch",
                                                                                          "ddpm_torch.models"))
    rows = []
    for name, config in CONFIGS.items():
        rows += rows_for(unet_module, name, config, args.seed)
    return report("DDPM U-Net vs tqch/ddpm-torch", reference_commit(args.reference), command_line(), rows)


if __name__ == "__main__":
    raise SystemExit(main())
