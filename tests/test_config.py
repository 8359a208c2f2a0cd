"""Every config group option composes and instantiates; bad values fail early with the key named."""
import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from diffrun.cli import CONF_DIR
from diffrun.building import build
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.models.parameterization import Denoiser

from conftest import compose_config, write_image_folder

GROUPS = ["dataset", "schedule", "weighting", "model", "optimizer"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if option == "image_folder":
        overrides.append(f"dataset.root={write_image_folder(tmp_path, size=32)}")
    if option in ("imagenet64", "celeba64"):
        overrides.append(f"dataset.root={tmp_path}")
    if option.startswith("dit"):   # DiT learns Σ (IDDPM's hybrid loss), which lives on its discrete grid
        overrides += ["schedule=linear", "schedule.timesteps=1000"]
    if option == "imagenet256_latents":
        from latent_utils import latent_overrides, write_latents

        overrides = latent_overrides(write_latents(tmp_path))
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
    with torch.device("meta"):  # DiT-XL/2 has 675M parameters: build the shapes, allocate nothing
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


@pytest.mark.slow   # builds and installs a wheel: the full tier
def test_installed_wheel_carries_the_configs(tmp_path):
    """`pip install .` (not editable) must work too: the wheel ships conf/ as diffrun/conf, and the CLI
    composes from it with no checkout in sight."""
    import subprocess, sys
    repo = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", str(repo), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("diffrun-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    shipped = sorted(p.relative_to(tmp_path / "site" / "diffrun" / "conf") for p in (tmp_path / "site" / "diffrun" / "conf").rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(CONF_DIR) for p in Path(CONF_DIR).rglob("*.yaml"))
    env = {k: v for k, v in os.environ.items() if k != "DIFFRUN_CONF"} | {"PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", "import diffrun, sys; sys.argv = ['diffrun', '--cfg', 'job', 'weighting=speed']; "
                          "print(diffrun.__file__); import diffrun.cli; diffrun.cli.main()"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path / "site")) and "tau: 700" in out.stdout


def test_conf_dir_falls_back_to_the_checkout(tmp_path, monkeypatch):
    import diffrun

    (tmp_path / "diffrun").mkdir()
    (tmp_path / "diffrun" / "conf").write_text("../conf")          # a symlink checked out as a plain file
    (tmp_path / "conf").mkdir()
    monkeypatch.delenv("DIFFRUN_CONF", raising=False)
    monkeypatch.setattr(diffrun, "__file__", str(tmp_path / "diffrun" / "__init__.py"))
    assert diffrun.conf_dir() == (tmp_path / "conf").resolve()
    monkeypatch.setenv("DIFFRUN_CONF", str(tmp_path / "mine"))
    assert diffrun.conf_dir() == (tmp_path / "mine").resolve()


def test_hydra_writes_its_folder_from_rank_zero_only(monkeypatch):
    """torchrun/srun start N copies of the CLI on one run directory: only rank 0 writes `.hydra/`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    def output_subdir():
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
        GlobalHydra.instance().clear()
        return OmegaConf.select(cfg, "hydra.output_subdir")

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert output_subdir() == ".hydra"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert output_subdir() is None
    monkeypatch.setenv("RANK", "0")
    assert output_subdir() == ".hydra"


@pytest.mark.parametrize("override, match", [
    ("weighting.dual_sampling=maybe", r"weighting\.dual_sampling='maybe': expected bool \(true or false\)"),
    ("weighting.num_timesteps=10.5", r"weighting\.num_timesteps=10\.5: expected int"),
    ("weighting.lam=abc", r"weighting\.lam='abc': expected float"),
])
def test_strategy_arguments_are_type_checked(override, match):
    """Group configs are free-form for the schema: the constructor's own annotations are checked before
    it runs (otherwise bool('maybe') would silently train with True)."""
    cfg = compose_config(["weighting=speed", override])
    with pytest.raises(ConfigError, match=match):
        build(cfg.weighting, _keep_meta=("name", "citation"))


def test_argument_types_of_library_targets_and_nested_specs():
    cfg = compose_config(["optimizer.optim.weight_decay=abc"])
    with pytest.raises(ConfigError, match=r"optimizer\.optim\.weight_decay='abc': expected float"):
        build(cfg.optimizer.optim)
    nested = compose_config(["weighting=adaptive_histogram"]).weighting
    nested.base = {"_target_": "diffrun.strategies.P2", "gamma": "one"}
    with pytest.raises(ConfigError, match=r"weighting\.base\.gamma='one': expected float"):
        build(nested, _keep_meta=("name", "citation"))
    build(compose_config(["weighting=adaptive_histogram"]).weighting, _keep_meta=("name", "citation"))  # valid: builds
