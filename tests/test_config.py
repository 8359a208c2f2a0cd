"""Every config group option composes and instantiates; bad values fail early with the key named."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from diffrun.cli import CONF_DIR
from diffrun.config import build, validate
from diffrun.errors import ConfigError
from diffrun.models.parameterization import Denoiser

from conftest import compose_config

GROUPS = ["dataset", "schedule", "weighting", "model", "optimizer"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if option == "image_folder":
        overrides.append("dataset.root=/nonexistent")
    cfg = compose_config(overrides)
    validate(cfg)
    assert cfg[group].name == option


@pytest.mark.parametrize("option", options("schedule"))
def test_schedules_instantiate(option):
    sched = build(compose_config([f"schedule={option}"]).schedule)
    assert sched.logsnr_max > sched.logsnr_min


@pytest.mark.parametrize("option", options("model"))
def test_models_instantiate(option):
    cfg = compose_config([f"model={option}", "dataset=cifar10"])
    den = Denoiser(build(cfg.model.net), cfg.model.prediction)
    assert sum(p.numel() for p in den.parameters()) > 0


def test_default_is_digits_main_job():
    cfg = compose_config(fast=False)
    assert (cfg.dataset.name, cfg.model.name, cfg.weighting.name) == ("digits", "unet_small", "uniform")
    assert cfg.name == "digits_unet_small_uniform_seed0"


def test_unknown_group_option_lists_available():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["weighting=not_a_method"])
    assert "not_a_method" in str(err.value) and "min_snr" in str(err.value)


@pytest.mark.parametrize("override,match", [
    ("train.steps=abc", "train.steps"),
    ("precision=fp8", "precision"),
    ("sample.sampler=euler", "sample.sampler"),
    ("train.nan_policy=ignore", "nan_policy"),
])
def test_wrong_type_or_enum_names_key(override, match):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config([override])
    text = str(err.value) + str(err.value.__cause__)
    assert match in text


def test_unknown_key_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_config(["train.stepz=5"])
    assert "stepz" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override,match", [
    ("train.steps=0", "train.steps=0 is out of range"),
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("optimizer.warmup_steps=100", "optimizer.warmup_steps=100 is not shorter than train.steps=6"),
    ("device=tpu", "device='tpu'"),
    ("resume=yes", "resume='yes'"),
])
def test_out_of_range_values(override, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        validate(compose_config([override]))


def test_negative_gamma_rejected():
    cfg = compose_config(["weighting=min_snr", "weighting.gamma=-1"])
    with pytest.raises(ConfigError, match="gamma"):
        build(cfg.weighting, _keep_meta=("name", "citation"))


def test_cli_prints_config(tmp_path):
    import subprocess, sys
    out = subprocess.run([sys.executable, "-m", "diffrun.cli", "--cfg", "job", "weighting=min_snr"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gamma: 5.0" in out.stdout and "name: digits" in out.stdout
