"""DiT, Min-SNR's ViT and the class-conditional U-Net: sizes against the official code, outputs against
saved official outputs, the call contract (null label, augment labels), adaLN-Zero init, bad values.

tests/data/*_official_reference.pt were written by a scratch script that runs the official code
(facebookresearch/DiT @ ed81ce2, TiankaiHang/Min-SNR-Diffusion-Training @ 5189997) beside ours; see
docs/networks.md. tests/data/unet_unconditional_reference.pt holds the U-Net of commit 4b610a6, before
class conditioning was added."""
from pathlib import Path

import pytest
import torch

from diffrun.building import build
from diffrun.errors import ConfigError
from diffrun.models.dit import DiT, dit_variant
from diffrun.models.parameterization import Denoiser
from diffrun.models.unet import UNet
from diffrun.models.vit import ViT
from diffrun.schedules import CosineSchedule

from conftest import compose_config

DATA = Path(__file__).parent / "data"


def count(model):
    return sum(p.numel() for p in model.parameters())


def tiny_dit(**kw):
    return DiT(**{"in_channels": 4, "image_size": 8, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2, **kw})


def tiny_vit(**kw):
    return ViT(**{"in_channels": 4, "image_size": 8, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2, **kw})


def tiny_unet(**kw):
    return UNet(**{"in_channels": 4, "image_size": 8, "channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                   "attention_resolutions": (4,), "dropout": 0.0, **kw})


def perturb_(model, seed=0, std=0.05):
    """Random weights everywhere (the zero-initialised layers too), so every input matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


# --- parameter counts (official numbers counted from the official code on the meta device) -------------------

# facebookresearch/DiT `DiT_models[name](input_size=32, num_classes=1000, learn_sigma=False)`: trainable parameters
# (its frozen pos_embed Parameter left out; we keep that table as a buffer).
OFFICIAL_DIT_TRAINABLE = {"DiT-XL/2": 674_816_272, "DiT-L/4": 457_922_624, "DiT-B/2": 130_303_504,
                          "DiT-S/2": 32_858_896, "DiT-S/8": 33_043_456}


@pytest.mark.parametrize("variant", OFFICIAL_DIT_TRAINABLE)
def test_dit_parameter_count_equals_official_without_learn_sigma(variant):
    with torch.device("meta"):
        net = dit_variant(variant, in_channels=4, image_size=32, num_classes=1000)
    assert count(net) == OFFICIAL_DIT_TRAINABLE[variant]


# Min-SNR `vit_*(class_cond=..., depth=..., in_chans=..., drop_label_prob=0.15)` as its scripts build them.
VIT_B_2_32 = dict(hidden_size=768, depth=12, num_heads=12, patch_size=2, image_size=32, in_channels=4)
VIT_XL_2_32 = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, image_size=32, in_channels=4)
VIT_L_4_64 = dict(hidden_size=1024, depth=21, num_heads=16, patch_size=4, image_size=64, in_channels=3)
OFFICIAL_MINSNR_VIT = [(VIT_B_2_32, 1000, 89_109_520), (VIT_B_2_32, 0, 88_339_984),
                       (VIT_XL_2_32, 1000, 452_390_416), (VIT_L_4_64, 1000, 269_983_792)]


@pytest.mark.parametrize("size,num_classes,official", OFFICIAL_MINSNR_VIT)
def test_minsnr_vit_parameter_count_equals_official(size, num_classes, official):
    with torch.device("meta"):
        net = ViT(**size, num_classes=num_classes)
    assert count(net) == official


@pytest.mark.parametrize("option,channels,image_size,expected", [
    # DiT with learn_sigma, as DiT trains: the official learn_sigma=True count less its frozen positional table
    ("dit_xl_2", 4, 32, 674_834_720), ("dit_b_2", 4, 32, 130_315_808), ("dit_s_2", 4, 32, 32_865_056),
    ("dit", 4, 32, 32_865_056),  # the generic config's default variant is DiT-S/2
    ("minsnr_vit_b_2_latent32", 4, 32, 89_109_520), ("minsnr_vit_xl_2_latent32", 4, 32, 452_390_416),
    ("minsnr_vit_l_4_64", 3, 64, 269_983_792),
])
def test_model_configs_build_the_counted_nets(option, channels, image_size, expected):
    """The Hydra configs, with an ImageNet-like dataset node (1000 classes), give exactly the counted nets."""
    cfg = compose_config([f"model={option}", "dataset=cifar10", f"dataset.channels={channels}",
                          f"dataset.image_size={image_size}", "dataset.num_classes=1000"])
    with torch.device("meta"):
        net = build(cfg.model.net)
    assert count(net) == expected


def test_model_configs_are_unconditional_without_dataset_classes():
    cfg = compose_config(["model=dit_s_2", "dataset=digits"])
    assert cfg.model.net.num_classes == 0
    with torch.device("meta"):
        assert build(cfg.model.net).label_embed is None


# --- outputs against the official code --------------------------------------------------------------------


def test_dit_reproduces_official_outputs():
    ref = torch.load(DATA / "dit_official_reference.pt")
    net = DiT(**ref["config"]).eval()
    net.load_state_dict(ref["state_dict"])
    assert torch.equal(net.noise_scale * ref["c_noise"], ref["their_t"])  # their t-embedder got t' = 1000·c_noise
    with torch.no_grad():
        out = net(ref["x"], ref["c_noise"], ref["class_labels"])
    torch.testing.assert_close(out, ref["their_out"], atol=1e-5, rtol=0)


def test_minsnr_vit_reproduces_official_outputs():
    ref = torch.load(DATA / "minsnr_vit_official_reference.pt")
    net = ViT(**ref["config"]).eval()
    net.load_state_dict(ref["state_dict"])
    assert torch.equal(net.timestep(ref["c_noise"]), ref["their_t"])  # c_noise → the integer step they were given
    with torch.no_grad():
        out = net(ref["x"], ref["c_noise"], ref["class_labels"])
    torch.testing.assert_close(out, ref["their_out"], atol=1e-5, rtol=0)


def test_minsnr_vit_timestep_lookup_inverts_the_cosine_grid():
    net = tiny_vit()
    t = torch.arange(1000)
    c_noise = -CosineSchedule().discrete_logsnr(1000).float() / 8
    assert torch.equal(net.timestep(c_noise), t)
    # off-grid noise levels go to the nearest step; beyond the ends to the first and last
    assert net.timestep(torch.tensor([-10.0, 10.0])).tolist() == [0, 999]


def test_unet_without_classes_is_unchanged():
    """Same state-dict keys, same initial weights for a seed, same outputs as the U-Net before conditioning."""
    ref = torch.load(DATA / "unet_unconditional_reference.pt")
    torch.manual_seed(0)
    net = UNet(**ref["config"]).eval()      # the default padding (symmetric) is the one the fixture was written with
    sd = net.state_dict()
    assert list(sd) == ref["keys"]
    for key, moments in ref["seed0_init_moments"].items():
        value = sd[key].double()
        assert torch.equal(torch.stack([value.sum(), value.square().sum()]), moments), key
    g = torch.Generator().manual_seed(1)
    x, c_noise = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, generator=g)
    assert torch.equal(x, ref["x"]) and torch.equal(c_noise, ref["c_noise"])
    with torch.no_grad():
        for p in net.parameters():  # the perturbation the fixture script applied
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        out = net(x, c_noise)
    # bit-identical with one thread (as written); other thread counts round the old code alike by ~2e-6
    torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=0)


def test_class_conditional_unet_adds_only_the_label_table():
    torch.manual_seed(0)
    plain = tiny_unet()
    torch.manual_seed(0)
    conditional = tiny_unet(num_classes=10)
    sd_plain, sd_cond = plain.state_dict(), conditional.state_dict()
    assert set(sd_cond) - set(sd_plain) == {"label_embed.table.weight"}
    assert sd_cond["label_embed.table.weight"].shape == (11, 32)  # 10 classes + NULL, width 4·channels
    assert all(torch.equal(sd_plain[k], sd_cond[k]) for k in sd_plain)  # same init for everything else


# --- the call contract --------------------------------------------------------------------------------------

NETS = {"dit": tiny_dit, "vit_table": tiny_vit, "vit_sinusoidal": lambda **kw: tiny_vit(noise_embedding="sinusoidal", **kw),
        "unet": tiny_unet}


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("channels,size", [(3, 16), (4, 8)])  # pixels, latents
def test_forward_backward_shapes(name, channels, size):
    net = NETS[name](in_channels=channels, image_size=size, num_classes=5)
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.randn(3), torch.tensor([0, 4, 5]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", NETS)
def test_none_labels_mean_the_null_label(name):
    net = perturb_(NETS[name](num_classes=5)).eval()
    x, c_noise = torch.randn(3, 4, 8, 8), torch.randn(3)
    with torch.no_grad():
        none = net(x, c_noise)
        null = net(x, c_noise, torch.full((3,), 5))
        classes = net(x, c_noise, torch.tensor([0, 1, 2]))
    assert torch.equal(none, null)
    assert (classes - null).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # a label changes every sample's output


@pytest.mark.parametrize("name", NETS)
def test_label_misuse_is_rejected(name):
    x, c_noise = torch.randn(2, 4, 8, 8), torch.randn(2)
    with pytest.raises(ValueError, match="unconditional"):
        NETS[name]()(x, c_noise, torch.tensor([0, 1]))
    net = NETS[name](num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        net(x, c_noise, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="augment"):
        net(x, c_noise, augment_labels=torch.zeros(2, 9))


def test_dit_adaln_zero_init():
    """Every block starts as the identity and the final layer outputs 0 (Peebles & Xie 2023, §3.2)."""
    net = tiny_dit(num_classes=5)
    x, c_noise = torch.randn(2, 4, 8, 8), torch.randn(2)
    assert torch.equal(net(x, c_noise, torch.tensor([1, 5])), torch.zeros_like(x))
    tokens, cond = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(net.blocks[0](tokens, cond), tokens)


def test_minsnr_vit_init_matches_official_recipe():
    net = ViT(in_channels=4, image_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=2, num_classes=10)
    assert net.out.weight.std() < 0.02 * 0.001 * 1.5  # trunc-normal 0.02, then × init_scale
    assert torch.all(net.out.bias == 0) and torch.all(net.blocks[0].attn.q_bias == 0)
    # residual outputs rescaled by 1/√(2·layer): the third block's are √3 smaller than the first block's
    ratio = net.blocks[0].mlp.fc2.weight.std() / net.blocks[2].mlp.fc2.weight.std()
    assert abs(ratio - 3 ** 0.5) < 0.15
    assert abs(net.noise_embed.weight.std() - 1) < 0.05 and abs(net.label_embed.table.weight.std() - 1) < 0.1


def test_denoiser_passes_labels_only_when_given():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, c_noise, **labels):
            seen.append(labels)
            return x

    den = Denoiser(Recorder(), "eps")
    z, lam = torch.randn(2, 3, 4, 4), torch.tensor([0.0, 1.0])
    den(z, lam)
    den(z, lam, class_labels=torch.tensor([1, 2]))
    den(z, lam, augment_labels=torch.zeros(2, 9))
    assert [sorted(k) for k in seen] == [[], ["class_labels"], ["augment_labels"]]
    torch.testing.assert_close(seen[1]["class_labels"], torch.tensor([1, 2]))


def test_denoiser_with_a_conditional_dit():
    den = Denoiser(perturb_(tiny_dit(num_classes=3)), "v")
    z, lam = torch.randn(2, 4, 8, 8), torch.tensor([-2.0, 3.0])
    assert not torch.equal(den(z, lam, torch.tensor([0, 1])), den(z, lam))


# --- bad values fail at construction, naming the key -----------------------------------------------------

@pytest.mark.parametrize("build_net,kwargs,match", [
    (tiny_dit, dict(patch_size=3), r"model.net.patch_size=3 does not divide model.net.image_size=8"),
    (tiny_dit, dict(hidden_size=30), r"model.net.hidden_size=30"),
    (tiny_dit, dict(depth=0), r"model.net.depth=0: must be an integer >= 1"),
    (tiny_dit, dict(num_classes=-1), r"model.net.num_classes=-1"),
    (tiny_dit, dict(noise_scale=0.0), r"model.net.noise_scale=0.0"),
    (tiny_dit, dict(mlp_ratio=float("nan")), r"model.net.mlp_ratio=nan"),
    (tiny_vit, dict(noise_embedding="fourier"), r"model.net.noise_embedding='fourier': allowed table, sinusoidal"),
    (tiny_vit, dict(table_rows=999), r"model.net.table_rows=999 must be >= model.net.num_timesteps=1000"),
    (tiny_vit, dict(num_heads=3), r"model.net.hidden_size=32 is not divisible by model.net.num_heads=3"),
    (tiny_unet, dict(channels=0), r"model.net.channels=0: must be an integer >= 1"),
    (tiny_unet, dict(channels=12), r"model.net.channels=12: must be a multiple of 8"),
    (tiny_unet, dict(channel_mult=()), r"model.net.channel_mult=\(\): must be a non-empty list"),
    (tiny_unet, dict(channel_mult=(1, 0)), r"model.net.channel_mult=\[1, 0\]: every entry"),
    (tiny_unet, dict(num_res_blocks=0), r"model.net.num_res_blocks=0: must be an integer >= 1"),
    (tiny_unet, dict(dropout=1.0), r"model.net.dropout=1.0: must be a finite number in \[0.0, 1.0\)"),
    (tiny_unet, dict(dropout=-0.1), r"model.net.dropout=-0.1"),
    (tiny_unet, dict(num_classes=2.5), r"model.net.num_classes=2.5"),
])
def test_bad_values_raise_config_error(build_net, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_net(**kwargs)


def test_dit_variant_names():
    with torch.device("meta"):
        assert count(dit_variant("DiT-B/4", num_classes=1000)) == count(DiT(patch_size=4, hidden_size=768, depth=12,
                                                                           num_heads=12, num_classes=1000))
    with pytest.raises(ConfigError, match=r"model.net.variant='DiT-M/2': allowed DiT-S/2, DiT-S/4"):
        dit_variant("DiT-M/2")


def test_bad_model_value_from_the_command_line():
    cfg = compose_config(["model=dit_s_2", "dataset=digits", "model.net.patch_size=3"])
    with pytest.raises(ConfigError, match="model.net.patch_size=3 does not divide model.net.image_size=16"):
        build(cfg.model.net)


def test_minsnr_vit_step_lookup_picks_the_nearest_sigma_as_the_official_round_sigma():
    """Between two levels, just on the noisy side of their λ midpoint, the nearest λ is the noisier step but the
    nearest σ (the official `round_sigma`, scripts_vit/sampler_edm.py) is the less noisy one: σ of the λ midpoint
    is the geometric mean of the two σ, below their arithmetic mean."""
    net = ViT(depth=1, hidden_size=32, num_heads=2, noise_embedding="table", in_channels=1, image_size=8,
              patch_size=2)
    table = CosineSchedule().discrete_logsnr(1000)
    k = torch.tensor([10, 200, 500, 800])
    lam = (table[k] + table[k + 1]) / 2 - 1e-4 * (table[k] - table[k + 1])
    by_sigma = (torch.exp(-table / 2)[None] - torch.exp(-lam / 2)[:, None]).abs().argmin(1)
    by_logsnr = (table[None] - lam[:, None]).abs().argmin(1)
    assert torch.equal(by_sigma, k) and torch.equal(by_logsnr, k + 1)       # the two rules disagree here
    assert torch.equal(net.timestep((-lam / 8).float()), k)


def test_unet_downsampling_pads_as_ddpm_in_every_preset():
    """DDPM's TF 'SAME' stride-2 convs pad bottom/right only (scripts/crosscheck/ddpm_unet.py); the presets say so,
    and the constructor's default stays the earlier symmetric padding for configs written before the key."""
    from diffrun.errors import ConfigError
    from diffrun.models.unet import StridedConv

    from conftest import compose_config

    for model in ("unet_tiny", "unet_small", "ddpm_cifar10"):
        assert compose_config([f"model={model}"], fast=False).model.net.downsample_padding == "same"
    same, symmetric = StridedConv(1, "same"), StridedConv(1, "symmetric")
    with torch.no_grad():
        for conv in (same, symmetric):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0                    # the centre tap copies the pixel under it
            conv.bias.zero_()
        for row in (0, 1):
            x = torch.zeros(1, 1, 4, 4)
            x[0, 0, row, row] = 1.0
            # the first window is centred on pixel (1, 1) with DDPM's padding, on (0, 0) with one pixel all round
            assert same(x)[0, 0, 0, 0] == float(row == 1) and symmetric(x)[0, 0, 0, 0] == float(row == 0)
            assert same(x).shape == symmetric(x).shape == (1, 1, 2, 2)
    with pytest.raises(ConfigError, match=r"model.net.downsample_padding='valid': allowed same, symmetric"):
        UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), downsample_padding="valid")
