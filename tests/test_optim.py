"""Weight-decay parameter groups: which parameters of a DiT, Min-SNR's ViT and the U-Net decay, and the
optimizer built from the config (one group unless the switch is on and weight decay > 0)."""
import pytest
import torch

from diffrun.errors import ConfigError
from diffrun.models.dit import DiT
from diffrun.models.unet import UNet
from diffrun.models.vit import ViT
from diffrun.training.optim import build_optimizer, parameter_groups

from conftest import compose_config

CPU = torch.device("cpu")


def names(model, weight_decay=0.03):
    groups = parameter_groups(model, weight_decay)
    assert [g["weight_decay"] for g in groups] == [weight_decay, 0.0]
    return set(groups[0]["names"]), set(groups[1]["names"])


def test_dit_groups():
    net = DiT(in_channels=4, image_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    decayed, exempt = names(net)
    assert decayed == {
        "patch_embed.proj.weight", "noise_embed.0.weight", "noise_embed.2.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
        "blocks.0.modulation.weight", "final.modulation.weight", "final.linear.weight",
    }
    assert exempt == {
        "label_embed.table.weight",
        "patch_embed.proj.bias", "noise_embed.0.bias", "noise_embed.2.bias",
        "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias",
        "blocks.0.modulation.bias", "final.modulation.bias", "final.linear.bias",
    }  # the fixed sin-cos positions are a buffer, in no group


def test_minsnr_vit_groups():
    net = ViT(in_channels=4, image_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10,
              table_rows=1000)
    decayed, exempt = names(net)
    assert decayed == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "out.weight"}
    assert exempt == {
        "pos_embed", "noise_embed.weight", "label_embed.table.weight",
        "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.norm2.weight",
        "blocks.0.norm2.bias", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias", "out.bias",
    }


def test_unet_groups():
    net = UNet(in_channels=1, image_size=8, channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
               dropout=0.0, num_classes=3)
    decayed, exempt = names(net)
    assert all(n.endswith(".weight") for n in decayed)
    assert {"stem.weight", "embed.mlp.0.weight", "down.0.0.conv1.weight", "down.0.0.emb_proj.weight",
            "down.0.1.qkv.weight", "out.2.weight"} <= decayed
    assert {"label_embed.table.weight", "stem.bias", "down.0.0.norm1.weight", "down.0.0.norm1.bias",
            "out.0.weight", "mid.1.norm.weight"} <= exempt
    assert all(n.endswith(".bias") or "norm" in n or n in ("label_embed.table.weight", "out.0.weight") for n in exempt)
    assert len(decayed) + len(exempt) == len(list(net.parameters()))


def test_tied_parameters_land_in_one_group():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].weight = net[0].weight
    groups = parameter_groups(net, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters())) == 3


def tiny_dit():
    return DiT(in_channels=1, image_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=2)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_shipped_configs_keep_one_group(optimizer):
    cfg = compose_config([f"optimizer={optimizer}"]).optimizer
    net = tiny_dit()
    for params in (net, net.parameters()):
        opt = build_optimizer(cfg, params, CPU)
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


def test_switch_needs_weight_decay_to_split():
    cfg = compose_config(["optimizer=adamw", "optimizer.no_decay_norms_biases_embeddings=true"]).optimizer
    assert len(build_optimizer(cfg, tiny_dit(), CPU).param_groups) == 1  # weight_decay 0: nothing to exempt


def test_adamw_decays_only_the_decay_group():
    """With zero gradients AdamW's step is pure decay: p ← p·(1 − lr·wd) for the decay group, p for the rest."""
    cfg = compose_config(["optimizer=adamw", "optimizer.optim.weight_decay=0.03", "optimizer.optim.lr=0.5",
                          "optimizer.no_decay_norms_biases_embeddings=true"]).optimizer
    net = tiny_dit()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    opt = build_optimizer(cfg, net, CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.03, 0.0]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed, exempt = names(net)
    for name, p in net.named_parameters():
        expected = 1 - 0.5 * 0.03 if name in decayed else 1.0
        torch.testing.assert_close(p, torch.full_like(p, expected), msg=name)


def test_switch_without_the_model_is_an_error():
    cfg = compose_config(["optimizer=adamw", "optimizer.optim.weight_decay=0.03",
                          "optimizer.no_decay_norms_biases_embeddings=true"]).optimizer
    with pytest.raises(ConfigError, match="needs parameter names"):
        build_optimizer(cfg, tiny_dit().parameters(), CPU)


@pytest.mark.parametrize("override,match", [
    ("optimizer.no_decay_norms_biases_embeddings=maybe", "optimizer.no_decay_norms_biases_embeddings='maybe'"),
    ("optimizer.optim.weight_decay=-0.1", r"optimizer.optim.weight_decay=-0.1: must be >= 0"),
])
def test_bad_optimizer_values(override, match):
    cfg = compose_config(["optimizer=adamw", override]).optimizer
    with pytest.raises(ConfigError, match=match):
        build_optimizer(cfg, tiny_dit(), CPU)


def test_unset_weight_decay_means_the_optimizers_default():
    """AdamW decays by 0.01 when the config does not say: the switch must see that, not 0."""
    cfg = compose_config(["optimizer=adamw", "~optimizer.optim.weight_decay",
                          "optimizer.no_decay_norms_biases_embeddings=true"]).optimizer
    opt = build_optimizer(cfg, tiny_dit(), CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
