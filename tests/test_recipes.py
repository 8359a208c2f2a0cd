"""The papers' training recipes: EDM's augmentation, EMA half-life and LR ramp in images, budgets in kimg, and the
experiment presets that combine them (every preset composes and validates, and says what its paper's code does)."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffrun.config import kimg_to_steps
from diffrun.validation import validate
from diffrun.data.augment import AugmentDraw, AugmentPipe, translation
from diffrun.errors import ConfigError
from diffrun.training.ema import EMA
from diffrun.training.optim import build_lr_schedule

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
STEPS_FROM_KIMG = "train.steps='${diffrun.kimg_to_steps:${train.kimg},${train.batch_size}}'"
EDM_CIFAR = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)   # NVlabs/edm train.py


# ------------------------------------------------------------------------------------------------
# EDM's augmentation (diffrun/data/augment.py)
# ------------------------------------------------------------------------------------------------
def test_augment_reproduces_edm_on_the_same_draws():
    """tests/data/edm_augment_reference.pt: NVlabs/edm@008a4e5 AugmentPipe with train.py's CIFAR-10 settings, run on
    the CPU after torch.manual_seed(seed) (written by a scratch script, docs/reproduction.md). Ours draws in EDM's
    order, so the same seed gives the same augmentations: images and labels agree to float32 rounding."""
    reference = torch.load(DATA / "edm_augment_reference.pt")
    for case in reference["cases"]:
        torch.manual_seed(case["seed"])
        images, labels = AugmentPipe(p=case["p"], **EDM_CIFAR)(case["input"])
        torch.testing.assert_close(labels, case["labels"], rtol=0, atol=0)
        torch.testing.assert_close(images, case["output"], rtol=0, atol=1e-5)


def test_augment_labels_say_what_was_done():
    pipe = AugmentPipe(p=1.0, **EDM_CIFAR)
    assert pipe.label_dim == 9 and pipe.enabled == ["xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac"]
    assert AugmentPipe(p=1.0, xflip=1, yflip=0, scale=0, rotate_frac=1, aniso=0, translate_frac=0).label_dim == 3
    x = torch.rand(64, 3, 8, 8)
    flips_only = AugmentPipe(p=1.0, xflip=1, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    torch.manual_seed(0)
    y, labels = flips_only(x)
    flipped = labels[:, 0] == 1
    assert 10 < flipped.sum() < 54 and set(labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y[flipped], x[flipped].flip(-1)) and torch.equal(y[~flipped], x[~flipped])
    # nothing applied (p = 0): zero labels, and the anti-aliased warp at the identity gives the image back
    y, labels = AugmentPipe(p=0.0, **EDM_CIFAR)(x)
    assert labels.shape == (64, 9) and not labels.any()
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_augment_warp_shifts_by_whole_pixels_exactly():
    """G⁻¹ maps output pixels to input pixels: a translation by −3 in x moves the image 3 pixels to the right."""
    x = torch.rand(2, 3, 16, 16)
    draw = AugmentDraw(xflip=None, yflip=None, warp=translation(torch.full((2,), -3.0), torch.zeros(2), 2),
                       labels=torch.zeros(2, 0))
    y = AugmentPipe(p=0.0).apply(x, draw)
    torch.testing.assert_close(y[..., 3:], x[..., :-3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (["augment.p=0.12"], r"augment\.p=0\.12 needs a network that takes augmentation labels"),
    (["augment.p=0.12", "model=edm_ddpmpp_cifar10", "model.net.model_channels=16", "model.net.channel_mult=[1]",
      "model.net.attn_resolutions=[]"], r"model\.net\.augment_dim=0 but the enabled augmentations .* give 9 labels"),
    (["augment.p=0.12", "augment.aniso=0", "model=edm_ddpmpp_cifar10", "model.net.augment_dim=9",
      "model.net.model_channels=16", "model.net.channel_mult=[1]", "model.net.attn_resolutions=[]"],
     r"give 7 labels: set model\.net\.augment_dim=7"),
    (["model=edm_ddpmpp_cifar10", "model.net.augment_dim=9", "model.net.model_channels=16", "model.net.channel_mult=[1]",
      "model.net.attn_resolutions=[]"], r"model\.net\.augment_dim=9 but augment\.p=0"),
    (["augment.p=1.5"], r"augment\.p=1\.5 is out of range"),
    (["augment.scale_std=-1"], r"augment\.scale_std=-1"),
])
def test_augment_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides), environment=False)


# ------------------------------------------------------------------------------------------------
# EMA as a half-life in images, LR ramp in images (NVlabs/edm training/training_loop.py)
# ------------------------------------------------------------------------------------------------
def test_ema_halflife_closed_form():
    """β_n = 0.5^(B / max(min(H, r·n·B), 1e-8)): the first update copies the weights, then the half-life grows with
    the images seen until it reaches H."""
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=None, warmup=False, halflife_kimg=500, rampup_ratio=0.05, batch_size=512)
    for n, images in ((0, 0), (1, 512), (1000, 512_000), (19_531, 19_531 * 512), (10**6, 512 * 10**6)):
        ema.num_updates = n
        want = 0.5 ** (512 / max(min(500_000, 0.05 * images), 1e-8))
        assert ema.current_decay() == pytest.approx(want, rel=1e-12), n
    assert EMA(net, None, False, 500, None, 512).current_decay() == pytest.approx(0.5 ** (512 / 500_000))
    # real updates follow ema ← β·ema + (1 − β)·θ, the first one a copy
    ema = EMA(net, decay=None, warmup=False, halflife_kimg=1, rampup_ratio=0.05, batch_size=4)
    ref = [p.detach().double().clone() for p in net.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        beta = ema.current_decay()
        assert (beta == 0.0) == (step == 0)
        ref = [beta * r + (1 - beta) * p.detach().double() for r, p in zip(ref, net.parameters())]
        ema.update(net)
    for r, p in zip(ref, ema.model.parameters()):
        torch.testing.assert_close(p.double(), r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(decay=0.999, halflife_kimg=500, batch_size=8), r"ema\.decay=0\.999 and ema\.halflife_kimg=500"),
    (dict(decay=None), r"give exactly one"),
    (dict(decay=0.999, rampup_ratio=0.05), r"ema\.rampup_ratio=0\.05 ramps a half-life"),
])
def test_ema_refuses_mixed_definitions(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EMA(torch.nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("overrides,match", [
    (["ema.halflife_kimg=500"], r"ema\.decay=0\.999 and ema\.halflife_kimg=500"),
    (["ema.decay=null", "ema.halflife_kimg=500"], r"ema\.warmup=true is the ramp of the per-step decay"),
    (["ema.rampup_ratio=0.05"], r"ema\.rampup_ratio=0\.05 ramps a half-life"),
    (["ema.decay=null", "ema.warmup=false", "ema.halflife_kimg=-1"], r"ema\.halflife_kimg=-1"),
    (["optimizer.warmup_kimg=10", "optimizer.warmup_steps=2"], r"give one warm-up"),
    (["optimizer.warmup_kimg=-1", "optimizer.warmup_steps=0"], r"optimizer\.warmup_kimg=-1"),
])
def test_ema_and_warmup_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides), environment=False)


def test_lr_ramp_in_images():
    """lr_n = lr · min(n·B / (warmup_kimg·1000), 1), the images seen before step n: EDM's first step has lr 0. A ramp
    may outlast the run (EDM's own code allows it); after it a cosine decay to the end when asked."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3)
    cfg = OmegaConf.create({"warmup_steps": 0, "warmup_kimg": 10, "decay": "constant"})
    schedule = build_lr_schedule(cfg, opt, total_steps=100, batch_size=128)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    want = [1e-3 * min(n * 128 / 10_000, 1.0) for n in range(100)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
    # the state is the step: a rebuilt schedule continues where the saved one was
    rebuilt_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    rebuilt = build_lr_schedule(cfg, rebuilt_opt, total_steps=100, batch_size=128)
    rebuilt.load_state_dict(schedule.state_dict())
    rebuilt.step()
    schedule.step()
    assert rebuilt_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1e-3
    cosine = build_lr_schedule(OmegaConf.create({"warmup_kimg": 1.28, "decay": "cosine", "min_lr_ratio": 0.0}),
                               torch.optim.Adam([param], lr=1.0), total_steps=110, batch_size=128)
    factors = [cosine.lr_lambdas[0](n) for n in (0, 5, 10, 60, 110)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)


# ------------------------------------------------------------------------------------------------
# budgets in kimg
# ------------------------------------------------------------------------------------------------
def test_kimg_to_steps_rounds_up():
    assert kimg_to_steps(200_000, 512) == 390_625 and kimg_to_steps(7680, 128) == 60_000
    assert kimg_to_steps(1, 3) == 334 and kimg_to_steps(0.5, 64) == 8


def test_kimg_and_steps_must_agree():
    cfg = compose_config(["train.kimg=0.064", "train.batch_size=8", STEPS_FROM_KIMG])
    assert cfg.train.steps == 8
    validate(cfg, environment=False)
    with pytest.raises(ConfigError, match=r"train\.steps=6 disagrees with train\.kimg=0\.064 .* = 8 steps"):
        validate(compose_config(["train.kimg=0.064"]), environment=False)
    with pytest.raises(ConfigError, match=r"train\.kimg=null, but train\.steps follows it"):
        validate(compose_config(["experiment=edm_cifar10", "train.kimg=null"], fast=False), environment=False)


# ------------------------------------------------------------------------------------------------
# the presets
# ------------------------------------------------------------------------------------------------
def sweep_weightings(preset: str) -> list[str]:
    node = OmegaConf.load(REPO / "conf" / "experiment" / f"{preset}.yaml")
    params = OmegaConf.select(node, "hydra.sweeper.params.weighting")
    return str(params).split(",") if params else []


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_its_sweep_compose_and_validate(preset):
    # datasets read from a folder the user names (ImageNet, CelebA, latents) need it on the command line
    root = ["dataset.root=/data/somewhere"] if preset.startswith("min_snr_") and preset != "min_snr_cifar10" else []
    cfg = compose_config([f"experiment={preset}", *root], fast=False)
    validate(cfg, environment=False)
    assert cfg.experiment == preset
    for weighting in sweep_weightings(preset):
        validate(compose_config([f"experiment={preset}", f"weighting={weighting}", *root], fast=False), environment=False)
    header = (REPO / "conf" / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0]
    rows = ["network", "parameterisation", "schedule, time", "sampling, weighting", "optimizer", "LR schedule", "batch",
            "duration", "EMA", "gradient clipping", "precision", "augmentation", "sampler, NFE", "FID protocol", "seeds"]
    for row in rows:
        assert f"# | {row} " in header, f"{preset}: no '{row}' row in the header table"
    assert "Budget" in header


# The recipe values each preset must carry (the papers' official code, docs/reproduction.md).
RECIPES = {
    "edm_cifar10": {
        "model.name": "edm_ddpmpp_cifar10", "model.net.augment_dim": 9, "augment.p": 0.12, "precision": "fp32",
        "train.batch_size": 512, "train.steps": 390_625, "train.grad_clip": 0.0, "ema.halflife_kimg": 500,
        "ema.rampup_ratio": 0.05, "optimizer.optim.lr": 1e-3, "optimizer.warmup_kimg": 10000, "train.tf32": False,
        "train.label_dropout": 0.0,
        "optimizer.optim.eps": 1e-8 / 3072, "dataset.loader.random_flip": False,
        "eval.sampler": "heun", "eval.steps": 18, "eval.precision": "fp32", "eval.num_samples": 50000},
    "variance_aware_cifar10": {
        "model.name": "edm_ddpmpp_cifar10", "model.prediction": "edm", "precision": "fp32", "train.grad_clip": 0.0,
        "train.steps": 60_000, "train.batch_size": 128, "optimizer.optim.lr": 2e-4, "eval.sampler": "heun",
        "optimizer.warmup_kimg": 0,   # the paper's flat Adam 2e-4, not EDM's 10-Mimg ramp on a 7.68-Mimg run
        "eval.steps": 18, "eval.precision": "fp32", "eval.num_samples": 50000, "augment.p": 0.12},
    "variance_aware_cifar100": {
        "dataset.name": "cifar100", "model.name": "edm_ddpmpp_cifar10", "precision": "fp32", "train.grad_clip": 0.0,
        "train.steps": 60_000, "eval.sampler": "heun", "eval.steps": 18, "eval.precision": "fp32",
        "optimizer.warmup_kimg": 0},
    "adaptive_sampling_cifar10": {
        "schedule.name": "quad", "schedule.timesteps": 1000, "model.name": "ddpm_cifar10", "precision": "fp32",
        "weighting.model_variance": "fixed_large", "train.steps": 795_600, "train.batch_size": 128,
        "train.grad_clip": 1.0, "ema.decay": 0.9999, "optimizer.warmup_steps": 5000, "eval.sampler": "ddpm",
        "eval.steps": 1000, "eval.ddpm_variance": "fixed_large", "eval.num_samples": 50000},
    "min_snr_cifar10": {
        "optimizer.name": "adamw", "optimizer.optim.lr": 1e-4, "optimizer.optim.betas": [0.99, 0.99],
        "optimizer.optim.weight_decay": 0.03, "optimizer.warmup_steps": 0, "train.grad_clip": 0.0,
        "ema.decay": 0.9999, "ema.warmup": False, "schedule.name": "cosine", "schedule.timesteps": 1000,
        "model.prediction": "eps", "weighting.gamma": 5.0, "precision": "fp16"},
}


@pytest.mark.parametrize("preset", list(RECIPES))
def test_presets_carry_their_recipe(preset):
    cfg = compose_config([f"experiment={preset}"], fast=False)
    for key, want in RECIPES[preset].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else getattr(got, "value", got)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{preset}: {key}={got!r}"


def test_variance_aware_sweep_has_the_narrow_lognormal_control():
    assert sweep_weightings("variance_aware_cifar10") == ["edm", "variance_aware", "edm_narrow"]
    assert "lognormal" not in sweep_weightings("adaptive_sampling_cifar10")   # continuous λ: refused on a discrete grid


def test_edm_narrow_is_the_lognormal_the_gaussian_factor_implies():
    """N(λ; 2.4, 2.4²) · exp(−α(λ − 2.4)²), α = 0.05, integrated numerically, is a Gaussian of std 2·P_std(edm_narrow)."""
    lam = torch.linspace(-30, 35, 200_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) * torch.exp(-0.05 * (lam - 2.4) ** 2)
    mass = torch.trapezoid(density, lam)
    mean = torch.trapezoid(density * lam, lam) / mass
    std = torch.sqrt(torch.trapezoid(density * (lam - mean) ** 2, lam) / mass)
    narrow = OmegaConf.load(REPO / "conf" / "weighting" / "edm_narrow.yaml")
    assert mean.item() == pytest.approx(2.4, abs=1e-9)
    assert std.item() == pytest.approx(2 * narrow.p_std, rel=1e-5)
    assert narrow.p_mean == -1.2 and 2 * narrow.p_std == pytest.approx((1 / 2.4**2 + 2 * 0.05) ** -0.5, rel=1e-5)


def test_cli_prints_an_images_budget_preset():
    out = subprocess.run([sys.executable, "-m", "diffrun.cli", "experiment=edm_cifar10", "--cfg", "job", "--resolve"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.train.steps == 390_625 and printed.train.kimg == 200_000 and printed.augment.p == 0.12


# ------------------------------------------------------------------------------------------------
# a short run with all of it: augmentation labels into the net, EMA half-life, LR ramp and budget in images
# ------------------------------------------------------------------------------------------------
def test_short_run_with_edm_recipe_pieces(tmp_path):
    from diffrun.cli import train
    from diffrun.monitoring.metrics import read_jsonl

    cfg = compose_config([
        "model=edm_ddpmpp_cifar10", "model.net.model_channels=16", "model.net.channel_mult=[1,1]",
        "model.net.num_blocks=1", "model.net.attn_resolutions=[]", "model.net.augment_dim=9", "model.net.dropout=0",
        "schedule=edm", "weighting=edm", "augment.p=0.5", "train.kimg=0.048",
        STEPS_FROM_KIMG, "train.grad_clip=0",
        "ema.decay=null", "ema.warmup=false", "ema.halflife_kimg=0.5", "ema.rampup_ratio=0.05",
        "optimizer.warmup_steps=0", "optimizer.warmup_kimg=0.032", "sample.sampler=heun", "sample.steps=3",
    ])
    assert cfg.train.steps == 6
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 6
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["lr"] == pytest.approx(cfg.optimizer.optim.lr * min(6 * 8 / 32, 1.0))
    assert last["ema_decay"] == pytest.approx(0.5 ** (8 / min(500, 0.05 * 6 * 8)))
    assert math.isfinite(last["loss"])


def test_tf32_setting_turns_both_kinds_off_and_null_leaves_them():
    from diffrun.training.environment import apply_tf32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        apply_tf32(None)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
        apply_tf32(False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        apply_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_label_dropout_is_zero_unless_the_recipe_trains_for_guidance():
    """EDM's conditional CIFAR-10 trains with label_dropout 0 (training/networks.py); the Min-SNR presets, which
    sample with guidance, keep their 0.15."""
    assert compose_config([], fast=False).train.label_dropout == 0.0
    for preset in ("min_snr_imagenet256", "min_snr_imagenet64"):
        assert compose_config([f"experiment={preset}", "dataset.root=/x"], fast=False).train.label_dropout == 0.15


# ------------------------------------------------------------------------------------------------
# Preset header tables that cannot go stale: every `key=value` in the diffrun column is the composed value
# ------------------------------------------------------------------------------------------------
SETTING = re.compile(r"(?<![\w.<])((?:[a-z_0-9]+\.)*[a-z_0-9]+)=([^\s|,;()]+)")
# The rows a program can read, and the keys each must state as `key=value` in its diffrun column.
READABLE_ROWS = {
    "optimizer": ("optimizer.optim.lr",),
    "batch": ("train.batch_size",),
    "duration": ("train.steps",),
    "EMA": ("ema.decay",),                    # or ema.halflife_kimg where the preset counts its EMA in images
    "precision": ("precision",),
    "sampler, NFE": ("eval.sampler", "eval.steps"),
    "FID protocol": ("eval.num_samples", "eval.reference_stats", "eval.repeats"),
}


def header_rows(preset: str) -> dict[str, list[str]]:
    """The preset's header table as {item: [paper, official code, diffrun]}, continuation lines joined."""
    rows: dict[str, list[str]] = {}
    last = None
    for line in (REPO / "conf" / "experiment" / f"{preset}.yaml").read_text().split("\ndefaults:")[0].splitlines():
        if not line.startswith("# |") or not line.replace("|", "").replace("#", "").strip("- "):
            continue
        cells = [c.strip() for c in line[2:].strip().strip("|").split("|")]
        if cells[0]:
            last = cells[0]
            rows[last] = cells[1:]
        elif last is not None:
            rows[last] = [f"{a} {b}".strip() for a, b in zip(rows[last], cells[1:])]
    rows.pop("item", None)
    return rows


def composed_value(cfg, key: str):
    """The composed value of `key`; a config group (`model=...`) is its option's name. KeyError if no such key."""
    if key in ("dataset", "schedule", "weighting", "model", "optimizer"):
        return cfg[key].name
    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, node) if node else cfg
    if parent is None or not OmegaConf.is_dict(parent) or leaf not in parent:
        raise KeyError(key)
    value = parent[leaf]
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else getattr(value, "value", value)


def stated_matches(stated: str, value) -> bool:
    stated = stated.rstrip(".:")
    if value is None:
        return stated == "null"
    if isinstance(value, bool):
        return stated == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(stated.replace("_", "")), float(value), rel_tol=1e-9, abs_tol=1e-15)
        except ValueError:
            return False
    return stated == str(value)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_diffrun_column_states_the_composed_values(preset):
    root = ["dataset.root=/data/somewhere"] if preset.startswith("min_snr_") and preset != "min_snr_cifar10" else []
    cfg = compose_config([f"experiment={preset}", *root], fast=False)
    rows = header_rows(preset)
    wrong = []
    for item, (_, _, ours) in rows.items():
        for key, stated in SETTING.findall(ours):
            try:
                value = composed_value(cfg, key)
            except KeyError:
                wrong.append(f"{item}: {key}={stated} names no key of the composed config")
                continue
            if key == "weighting" and stated in sweep_weightings(preset):            # an arm of the preset's sweep
                continue
            if not stated.startswith("<") and not stated_matches(stated, value):  # <...>: a path the user gives
                wrong.append(f"{item}: the header says {key}={stated}, the preset composes {value!r}")
    for item, keys in READABLE_ROWS.items():
        assert item in rows, f"{preset}: no '{item}' row in the header table"
        stated = {key for key, _ in SETTING.findall(rows[item][2])}
        for key in keys:
            if key == "ema.decay" and composed_value(cfg, "ema.decay") is None:
                key = "ema.halflife_kimg"
            if key not in stated:
                wrong.append(f"{item}: the diffrun column does not state {key}=... (composed: "
                             f"{composed_value(cfg, key)!r})")
    assert not wrong, f"{preset}:\n" + "\n".join(wrong)


def test_header_parser_reads_a_wrapped_table():
    """The parser joins continuation lines and finds settings; a stated value that differs is caught."""
    rows = header_rows("edm_cifar10")
    assert "eval.steps=18" in rows["sampler, NFE"][2] and rows["batch"][2].startswith("train.batch_size=512")
    cfg = compose_config(["experiment=edm_cifar10"], fast=False)
    assert stated_matches("1e-3", composed_value(cfg, "optimizer.optim.lr"))
    assert not stated_matches("2e-4", composed_value(cfg, "optimizer.optim.lr"))
    assert composed_value(cfg, "model") == "edm_ddpmpp_cifar10"
    with pytest.raises(KeyError):
        composed_value(cfg, "random_flip")


# Text the audit of issue 24 found wrong; each phrase must not come back.
STALE = {
    "docs/reproduction.md": ["not in this branch", "needs another branch", "latent datasets of another branch",
                             "with a fixed loss scale", "official default class"],
    "conf/model/edm_ncsnpp_cifar10.yaml": ["no AugmentPipe", "once augment labels are fed"],
    "conf/experiment/min_snr_cifar10.yaml": ["(autocast + GradScaler) = code"],
    "docs/samplers.md": ["0 (bit-identical)", "Heun is bit-identical because"],
}


@pytest.mark.parametrize("path", list(STALE))
def test_corrected_claims_stay_corrected(path):
    text = (REPO / path).read_text()
    for phrase in STALE[path]:
        assert phrase not in text, f"{path}: '{phrase}' is back"


def test_all_strategies_ema_row_names_ddpm_torch_not_ddpm():
    """DDPM's EMA is a constant 0.9999; the (1 + n)/(10 + n) ramp the preset uses is ddpm-torch's."""
    ema = header_rows("all_strategies_cifar10")["EMA"][2]
    assert "ddpm-torch" in ema and "constant 0.9999" in ema
    assert compose_config(["experiment=all_strategies_cifar10"], fast=False).ema.warmup is True


def test_speed_k_and_lambda_are_named_as_the_configs_values():
    """SpeeD's k = 5, λ = 0.6 are the MetFaces/ablation configs' values; the constructor defaults are k = 1, lam = 5
    and FFHQ uses k = 2. The docs and the weighting config say so."""
    doc = (REPO / "docs" / "reproduction.md").read_text()
    assert "configs/comparison/metfaces/faster.yaml" in doc and "(k = 1, lam = 5)" in doc and "k = 2" in doc
    conf = (REPO / "conf" / "weighting" / "speed.yaml").read_text()
    assert "constructor default 1" in conf and "constructor default 5" in conf
    speed = compose_config(["weighting=speed"], fast=False).weighting
    assert (speed.k, speed.lam, speed.tau) == (5.0, 0.6, 700)
