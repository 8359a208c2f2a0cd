"""EDM's SongUNet (DDPM++ / NCSN++): sizes, conditioning, initialisation, errors, and agreement with
NVlabs/edm's own SongUNet on saved weights.

tests/data/song_unet_edm_reference.pt was generated in a scratch folder, outside the repository, from
NVlabs/edm commit 008a4e5's `training/networks.py::SongUNet` (three tiny configs, 8×8, random O(1) weights):
its state dict converted to our key names, the inputs, and EDM's outputs in float32 and float64
(docs/networks.md has the command and the mapping). It is data, not code.
"""
from pathlib import Path

import pytest
import torch

from diffrun.building import build
from diffrun.errors import ConfigError
from diffrun.models.parameterization import Denoiser
from diffrun.models.song_unet import OUTPUT_INIT_GAIN, SongUNet
from conftest import compose_config

FIXTURE = Path(__file__).parent / "data" / "song_unet_edm_reference.pt"
TINY = dict(in_channels=3, image_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def preset(name: str) -> torch.nn.Module:
    cfg = compose_config([f"model={name}", "dataset=cifar10"])
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        return build(cfg.model.net)


@pytest.mark.parametrize("name,expected", [
    ("edm_ddpmpp_cifar10", 55_732_739),  # = NVlabs/edm SongUNet(--arch=ddpmpp), counted in scratch
    ("edm_ncsnpp_cifar10", 56_395_523),  # = NVlabs/edm SongUNet(--arch=ncsnpp), counted in scratch
])
def test_cifar10_preset_parameter_counts(name, expected):
    n = sum(p.numel() for p in preset(name).parameters())
    assert n == expected
    assert abs(n - 55.7e6) / 55.7e6 < 0.015  # "≈ 55.7M" (DDPM++), NCSN++ 1.2 % larger


def test_presets_are_edm_parameterised():
    for name in ("edm_ddpmpp_cifar10", "edm_ncsnpp_cifar10"):
        cfg = compose_config([f"model={name}", "dataset=cifar10"])
        assert (cfg.model.prediction, cfg.model.sigma_data) == ("edm", 0.5)


@pytest.mark.parametrize("encoder_type,decoder_type,embedding_type,fir", [
    ("standard", "standard", "positional", (1, 1)),
    ("residual", "standard", "fourier", (1, 3, 3, 1)),
    ("skip", "skip", "positional", (1, 3, 3, 1)),
])
def test_forward_backward_shapes(encoder_type, decoder_type, embedding_type, fir):
    net = SongUNet(**TINY, encoder_type=encoder_type, decoder_type=decoder_type, embedding_type=embedding_type,
                   resample_filter=fir, num_classes=3, augment_dim=2)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    out = net(x, torch.randn(4), torch.tensor([0, 1, 2, 3]), torch.randn(4, 2))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_runs_inside_the_edm_denoiser():
    den = Denoiser(SongUNet(**{**TINY, "in_channels": 1}), prediction="edm")
    z = torch.randn(2, 1, 8, 8)
    assert den(z, torch.tensor([-3.0, 4.0])).shape == z.shape


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) weights everywhere (the default init leaves the output at ~1e-5 of the signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel() if p.ndim > 1 else 1) ** 0.5)
    return net.eval()


def test_null_label_is_the_bias_row_and_the_default():
    net = randomised(SongUNet(**TINY, num_classes=5))
    emb = net.class_embedding
    torch.testing.assert_close(emb(torch.tensor([5])), emb.linear.bias[None])  # EDM's zero one-hot
    torch.testing.assert_close(emb(torch.tensor([2]))[0], emb.linear.weight[:, 2] * 5**0.5 + emb.linear.bias)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    torch.testing.assert_close(net(x, c), net(x, c, torch.tensor([5, 5])))
    assert not torch.allclose(net(x, c, torch.tensor([0, 1])), net(x, c, torch.tensor([5, 5])))


def test_augment_labels_enter_without_bias():
    net = randomised(SongUNet(**TINY, augment_dim=9))
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    torch.testing.assert_close(net(x, c), net(x, c, augment_labels=torch.zeros(2, 9)))
    assert not torch.allclose(net(x, c), net(x, c, augment_labels=torch.randn(2, 9)))


def test_labels_the_net_was_not_built_for_are_errors():
    net = SongUNet(**TINY)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    with pytest.raises(ConfigError, match="model.net.num_classes"):
        net(x, c, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="model.net.augment_dim=0"):
        net(x, c, augment_labels=torch.zeros(2, 9))


def test_initialisation_follows_edm():
    torch.manual_seed(0)
    net = SongUNet(**TINY)
    head = net.decoder[-1].head[-1]
    bound = (6 / (head.in_channels * 9 + head.out_channels * 9)) ** 0.5  # Xavier-uniform bound
    for conv in [head, *(m.conv1 for m in net.modules() if hasattr(m, "conv1"))]:
        fan = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5
        assert 0 < conv.weight.abs().max() <= OUTPUT_INIT_GAIN * fan  # near-zero, not zero (EDM init_zero)
        assert conv.bias.abs().max() == 0
    assert 0.5 * OUTPUT_INIT_GAIN * bound < head.weight.abs().max()
    stem_bound = (6 / (3 * 9 + 8 * 9)) ** 0.5
    assert 0.9 * stem_bound < net.stem.weight.abs().max() <= stem_bound and net.stem.bias.abs().max() == 0
    out = net.eval()(torch.randn(2, 3, 8, 8), torch.randn(2))
    assert 0 < out.abs().max() < 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(model_channels=0), r"model\.net\.model_channels=0"),
    (dict(in_channels=-1), r"model\.net\.in_channels=-1"),
    (dict(image_size=12, channel_mult=(1, 2, 2, 2)), r"model\.net\.image_size=12: cannot be halved 3 times"),
    (dict(channel_mult=()), r"model\.net\.channel_mult=\[\]"),
    (dict(channel_mult=(1, 0)), r"model\.net\.channel_mult=\[1, 0\]"),
    (dict(num_classes=-1), r"model\.net\.num_classes=-1"),
    (dict(augment_dim=-9), r"model\.net\.augment_dim=-9"),
    (dict(embedding_type="sinusoidal"), r"model\.net\.embedding_type='sinusoidal': allowed: positional, fourier"),
    (dict(encoder_type="unet"), r"model\.net\.encoder_type='unet': allowed: standard, skip, residual"),
    (dict(decoder_type="residual"), r"model\.net\.decoder_type='residual': allowed: standard, skip"),
    (dict(dropout=1.0), r"model\.net\.dropout=1\.0"),
    (dict(resample_filter=(1, 2, 1)), r"model\.net\.resample_filter=\[1, 2, 1\]: an even-length"),
    (dict(attn_resolutions=(16,)), r"model\.net\.attn_resolutions=\[16\]: \[16\] not among .* \[8, 4\]"),
    (dict(model_channels=6), r"model\.net\.model_channels / channel_mult give a layer of 18 channels"),
    (dict(model_channels=1, embedding_type="positional", channel_mult_noise=1), r"model\.net\.model_channels=1"),
])
def test_bad_values_name_their_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SongUNet(**{**TINY, **kwargs})


def test_bad_value_through_hydra_names_the_key():
    cfg = compose_config(["model=edm_ncsnpp_cifar10", "dataset=cifar10", "model.net.encoder_type=resnet"])
    with pytest.raises(ConfigError, match="model.net.encoder_type='resnet'"):
        build(cfg.model.net)


@pytest.fixture(scope="module")
def edm_reference():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("case", ["ddpmpp_cond_augment", "ncsnpp", "skip_skip"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_matches_nvlabs_edm_outputs(edm_reference, case, dtype, tol):
    ref = edm_reference["cases"][case]
    net = SongUNet(**ref["kwargs"])
    net.load_state_dict(ref["state_dict"], strict=True)
    net.to(dtype).eval()
    aug = ref["augment_labels"].to(dtype) if ref["augment_labels"] is not None else None
    with torch.no_grad():
        out = net(ref["x"].to(dtype), ref["c_noise"].to(dtype), ref["class_labels"], aug)
    expected = ref[f"edm_out_{str(dtype).split('.')[1]}"]
    assert expected.abs().max() > 1  # a real signal, not the near-zero output of a fresh init
    torch.testing.assert_close(out, expected, atol=tol, rtol=0)
