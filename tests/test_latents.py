"""Class-conditional, latent-space training end to end on CPU: latent folders written by scripts/encode_latents.py
with a small random AutoencoderKL, label dropout, guided sampling, decoding, FID, and the errors for bad input."""
import json

import numpy as np
import pytest
import torch

from diffrun.cli import train
from diffrun.validation import validate
from diffrun.data import LatentSource, balanced_labels, drop_labels, load_latents
from diffrun.data.latents import read_meta
from diffrun.errors import ConfigError, DataError
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training.trainer import Trainer

from latent_utils import LATENT_SIZE, latent_overrides, tiny_vae, write_class_folders, write_latents, write_vae

TINY_VIT = ["model.net.hidden_size=32", "model.net.depth=1", "model.net.num_heads=2"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_latents(tmp_path_factory.mktemp("latents"))


# --- the latent folder ------------------------------------------------------------------------------
def test_encoder_writes_both_flips_scaled_with_metadata(latents):
    meta = read_meta(latents["latents"])
    assert meta["shape"] == [2, 4, LATENT_SIZE, LATENT_SIZE] and meta["count"] == 18 and meta["num_classes"] == 3
    assert meta["scale_factor"] == 0.18215 and meta["dtype"] == "float32" and meta["vae"] == str(latents["vae"])
    stored = np.load(latents["latents"] / "latents.npy")
    assert list(np.load(latents["latents"] / "labels.npy")) == [c for c in range(3) for _ in range(6)]
    # the stored latents are the VAE posterior's, × 0.18215, of each image ([:, 0]) and of its mirror ([:, 1])
    from diffrun.data.loaders import load_image_folder

    images = load_image_folder(str(latents["images"]), 16, center_crop=True, labels="subfolder").materialize()
    vae = tiny_vae()
    x = images[:2].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean * 0.18215
        std = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.std * 0.18215
    got = torch.from_numpy(stored[:2]).transpose(0, 1).reshape(4, 4, LATENT_SIZE, LATENT_SIZE)
    assert ((got - mean).abs() <= 5 * std).all()   # one posterior draw (DiT's latent_dist.sample())


def test_decode_divides_by_the_scale_and_runs_the_decoder(latents):
    source = load_latents(str(latents["latents"]), reference_root=str(latents["images"]))
    z = torch.from_numpy(np.load(latents["latents"] / "latents.npy")[:3, 0])
    with torch.no_grad():
        expected = tiny_vae().decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(source.decode(z), expected)
    reference = source.reference_images(5, seed=0)
    assert reference.dtype == torch.uint8 and reference.shape == (5, 3, 16, 16)
    assert source.reference_images(100, seed=0).shape[0] == 18


def test_random_flip_picks_the_stored_mirror(latents):
    source = load_latents(str(latents["latents"]), random_flip=True)
    stored = torch.from_numpy(np.load(latents["latents"] / "latents.npy"))
    assert torch.equal(source.item(4, True), stored[4, 1]) and torch.equal(source.item(4, False), stored[4, 0])
    assert torch.equal(load_latents(str(latents["latents"])).item(4, True), stored[4, 0])  # flips off: never mirrored
    assert source.materialize().shape == (18, 2, 4, 8, 8) and load_latents(str(latents["latents"])).materialize().shape[1] == 1


# --- labels -----------------------------------------------------------------------------------------
def test_label_dropout_replaces_with_the_null_label():
    torch.manual_seed(0)
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 0.15, null_label=10)
    kept = dropped == labels
    assert ((dropped == 10) | kept).all()
    assert abs((~kept).float().mean().item() - 0.15) < 0.01
    state = torch.get_rng_state()
    assert drop_labels(labels, 0.0, 10) is labels and torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing


def test_balanced_labels():
    labels = balanced_labels(50_000, 1000, seed=3)
    assert torch.equal(torch.bincount(labels), torch.full((1000,), 50))
    assert torch.equal(labels, balanced_labels(50_000, 1000, seed=3)) and not torch.equal(labels, balanced_labels(50_000, 1000, 4))
    assert sorted(balanced_labels(64, 1000, 0).tolist()) == list(range(64))


# --- training, sampling, FID ------------------------------------------------------------------------
def test_conditional_latent_run_samples_with_guidance_decodes_and_scores(make_cfg, latents, tmp_path, monkeypatch,
                                                                         fid_features):
    import diffrun.training.step as step_module

    seen = []
    original = step_module.drop_labels
    monkeypatch.setattr(step_module, "drop_labels", lambda l, p, n: seen.append((l.clone(), p, n)) or original(l, p, n))
    cfg = make_cfg([*latent_overrides(latents), "model=dit_s_2", "schedule=linear", "schedule.timesteps=1000",
                    "model.net.depth=1",
                    "model.net.hidden_size=32", "model.net.num_heads=2", "train.label_dropout=0.3",
                    "sample.cfg_scale=2.0", "eval.enabled=true", "eval.cfg_scale=1.5", "eval.num_samples=12",
                    "eval.kid_subset_size=6", "eval.steps=3", "eval.batch_size=6", "train.batch_size=6"])
    summary = train(cfg, tmp_path / "run")
    assert all(p == 0.3 and n == 3 and l.max() < 3 for l, p, n in seen) and len(seen) == 6
    record = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "fid" in r][-1]
    assert record["fid_cfg_scale"] == 1.5 and record["fid_num_samples"] == 12 and record["fid"] > 0
    assert summary["fid"] == record["fid"]
    from PIL import Image

    grid = Image.open(sorted((tmp_path / "run" / "samples").glob("*.png"))[-1])
    assert grid.mode == "RGB"        # decoded pixels (3 channels), not 4-channel latents


def test_generate_gives_balanced_labels_and_decoded_pixels(make_cfg, latents, tmp_path, monkeypatch):
    import diffrun.sampling.generate as generate_module

    calls = []
    original = generate_module.run_sampler
    monkeypatch.setattr(generate_module, "run_sampler", lambda *a, **k: calls.append(k) or original(*a, **k))
    cfg = make_cfg([*latent_overrides(latents), "model=minsnr_vit_b_2_latent32", *TINY_VIT, "sample.cfg_scale=1.5",
                    "train.label_dropout=0.1", "sample.steps=2"])
    trainer = Trainer(cfg, tmp_path / "gen")
    try:
        images, nfe = trainer.generate(6, 1, cfg.sample, "sample")
        assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8 and nfe == 2
        assert sorted(calls[-1]["class_labels"].tolist()) == [0, 0, 1, 1, 2, 2] and calls[-1]["num_classes"] == 3
        trainer.generate(2, 1, cfg.sample, "sample", class_labels=torch.tensor([2, 2]))
        assert calls[-1]["class_labels"].tolist() == [2, 2]
    finally:
        trainer.directory.unlock()


def test_min_snr_imagenet256_preset_trains_samples_and_scores(make_cfg, latents, tmp_path, fid_features):
    """`diffrun experiment=min_snr_imagenet256` on a generated latent folder: the official recipe's keys, a tiny ViT."""
    cfg = make_cfg(["experiment=min_snr_imagenet256", "weighting=min_snr", *latent_overrides(latents), *TINY_VIT,
                    f"dataset.loader.vae={latents['vae']}", "device=cpu", "precision=fp32", "train.steps=4",
                    "train.batch_size=6", "train.log_every=2", "train.progress=false", "checkpoint.every_steps=0",
                    "sample.num_images=3", "sample.steps=2", "eval.num_samples=12", "eval.kid_subset_size=6",
                    "eval.steps=2", "eval.batch_size=6", "eval.every_steps=0", "eval.cfg_scale=1.5"], fast=False)
    assert (cfg.train.label_dropout, cfg.optimizer.optim.betas, cfg.schedule.timesteps) == (0.15, [0.99, 0.99], 1000)
    summary = train(cfg, tmp_path / "preset")
    record = [r for r in read_jsonl(tmp_path / "preset" / "metrics.jsonl") if "fid" in r][-1]
    assert record["fid_sampler"] == "heun-2" and record["fid_cfg_scale"] == 1.5 and summary["fid"] > 0


# --- bad input, refused before training ------------------------------------------------------------
def test_latent_folder_that_does_not_match_the_config(make_cfg, latents, tmp_path):
    base = [*latent_overrides(latents), "model=minsnr_vit_b_2_latent32", *TINY_VIT]
    with pytest.raises(DataError, match="dataset.image_size=32, but the latents .* are 8x8"):
        validate(make_cfg([*base, "dataset.image_size=32"]))
    with pytest.raises(DataError, match="dataset.loader.scale_factor=0.13025, but the latents .* scaled by 0.18215"):
        validate(make_cfg([*base, "dataset.loader.scale_factor=0.13025"]))
    with pytest.raises(DataError, match="dataset.num_classes=2, but the latents .* labels of 3 classes"):
        validate(make_cfg([*base, "dataset.num_classes=2"]))
    with pytest.raises(DataError, match="dataset.channels=3, but the latents .* have 4 channels"):
        validate(make_cfg([*base, "dataset.channels=3"]))
    with pytest.raises(DataError, match="no meta.json"):
        validate(make_cfg([*base, f"dataset.root={latents['images']}"]))


def test_missing_vae_says_what_to_provide(make_cfg, latents, tmp_path):
    base = [*latent_overrides(latents), "model=minsnr_vit_b_2_latent32", *TINY_VIT]
    with pytest.raises(DataError, match=r"dataset.loader.vae='org/no-such-vae': the VAE is not on this machine.*"
                                        r"from_pretrained\('org/no-such-vae'\)"):
        validate(make_cfg([*base, "dataset.loader.vae=org/no-such-vae"]))
    with pytest.raises(DataError, match="dataset.loader.vae='/nowhere/vae'"):
        validate(make_cfg([*base, "dataset.loader.vae=/nowhere/vae"]))
    validate(make_cfg([*base, "dataset.loader.vae=org/no-such-vae", "sample.num_images=0"]))  # nothing to decode
    source = load_latents(str(latents["latents"]), vae="org/no-such-vae")
    with pytest.raises(DataError, match="not on this machine"):
        source.decode(torch.zeros(1, 4, 8, 8))


def test_latent_fid_needs_a_pixel_reference(make_cfg, latents):
    overrides = [o for o in latent_overrides(latents) if "reference_root" not in o]
    base = [*overrides, "model=minsnr_vit_b_2_latent32", *TINY_VIT]
    with pytest.raises(ConfigError, match="dataset.loader.reference_root=.*eval.reference_stats"):
        validate(make_cfg([*base, "eval.enabled=true"]))
    validate(make_cfg([*base, "eval.enabled=false"]))
    with pytest.raises(DataError, match="reference_root=<folder of the original images>"):
        LatentSource(latents["latents"]).reference_images(4, 0)


def test_damaged_latent_folder(latents, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(latents["latents"], broken)
    meta = json.loads((broken / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "count": 20}))
    with pytest.raises(DataError, match="meta.json says float32 \\(20, 2, 4, 8, 8\\).*damaged"):
        load_latents(str(broken))
    (broken / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        load_latents(str(broken))


def test_encoder_refuses_what_it_cannot_encode(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import encode_latents

    images = write_class_folders(tmp_path / "img", classes=2, per_class=2, size=16)
    assert encode_latents.main(["--images", str(images), "--vae", "org/absent-vae", "--out", str(tmp_path / "o"),
                                "--resolution", "16", "--device", "cpu", "--workers", "0"]) == 1
    assert "--vae='org/absent-vae': the VAE is not on this machine" in capsys.readouterr().err
    vae = write_vae(tmp_path / "vae")
    assert encode_latents.main(["--images", str(images), "--vae", str(vae), "--out", str(tmp_path / "o"),
                                "--resolution", "15", "--device", "cpu", "--workers", "0"]) == 1
    assert "do not divide by the VAE's downsampling factor 2" in capsys.readouterr().err


@pytest.mark.parametrize("preset, dataset, prediction, dropout, steps", [
    ("min_snr_imagenet256", "imagenet256_latents", "x0", 0.15, 50),
    ("min_snr_imagenet64", "imagenet64", "eps", 0.15, 20),
    ("min_snr_celeba64", "celeba64", "eps", 0.0, 50),   # unconditional: no label dropout
])
def test_min_snr_presets_compose_with_the_official_values(make_cfg, tmp_path, preset, dataset, prediction, dropout, steps):
    """configs/in256/vit-b_..._bs8x32.sh @ 5189997: AdamW 1e-4, betas (0.99, 0.99), wd 0.03 on every parameter, no
    warm-up or anneal, no clipping, batch 8 × 32, EMA 0.9999, cosine 1000 steps, fp16; EDM Heun for FID."""
    cfg = make_cfg([f"experiment={preset}", f"dataset.root={tmp_path}"], fast=False)
    validate(cfg, environment=False)
    assert (cfg.dataset.name, cfg.model.prediction, cfg.train.label_dropout) == (dataset, prediction, dropout)
    assert (cfg.optimizer.optim._target_, cfg.optimizer.optim.lr, list(cfg.optimizer.optim.betas),
            cfg.optimizer.optim.weight_decay) == ("torch.optim.AdamW", 1e-4, [0.99, 0.99], 0.03)
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.decay, cfg.optimizer.no_decay_norms_biases_embeddings) == (0, "constant", False)
    assert (cfg.train.grad_clip, cfg.ema.decay, cfg.ema.warmup, cfg.schedule.timesteps) == (0.0, 0.9999, False, 1000)
    assert (cfg.schedule.name, str(cfg.precision.value), cfg.eval.sampler.value, cfg.eval.steps) == ("cosine", "fp16", "heun", steps)
    from pathlib import Path

    from omegaconf import OmegaConf

    preset_file = OmegaConf.load(Path(__file__).parents[1] / "conf" / "experiment" / f"{preset}.yaml")
    assert preset_file.hydra.sweeper.params.weighting == "uniform,min_snr"   # the paper's comparison
    if preset == "min_snr_imagenet256":
        assert cfg.train.batch_size == 256 and cfg.dataset.loader.random_flip is False and cfg.model.net.depth == 12
