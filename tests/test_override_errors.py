"""Hydra's override failures in diffrun's one line: did-you-mean from the schema and the group options, never
`+` for a typo, a plugin's keys for an unknown key under it, and the module named when a plugin does not import."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from diffrun.cli import CONF_DIR
from diffrun.validation import validate
from diffrun.errors import ConfigError
from diffrun.launching.overrides import override_error

from conftest import compose_config

TYPOS = [   # override, the one line's start, the key or option it suggests
    ("train.step=10", "train.step=10: no such key; did you mean train.steps? train takes ", "train.steps"),
    ("weighting=minsnr", "weighting=minsnr: no such option of weighting; did you mean weighting=min_snr?",
     "weighting=min_snr"),
    ("optimizer.lr=1e-4", "optimizer.lr=1e-4: no such key; did you mean optimizer.optim.lr?", "optimizer.optim.lr"),
]


def hydra_failure(overrides: list[str]) -> BaseException:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides)
    except Exception as exc:  # noqa: BLE001
        return exc
    finally:
        GlobalHydra.instance().clear()
    raise AssertionError(f"{overrides} composed")


@pytest.mark.parametrize("override, expected, suggested", TYPOS, ids=[t[0] for t in TYPOS])
def test_typo_gets_a_did_you_mean(override, expected, suggested):
    message = override_error(hydra_failure(["debug=fast", override]), ["debug=fast", override])
    assert message.startswith(expected) and "\n" not in message and "+" not in message, message
    if "=" in suggested:   # the option it suggests composes
        compose_config([suggested])
    else:                  # the key it suggests exists, and takes the value
        cfg = compose_config([f"{suggested}={override.split('=')[1]}"])
        assert OmegaConf.select(cfg, suggested) is not None


def test_unknown_plugin_key_lists_the_plugins_keys():
    cfg = compose_config(["weighting=min_snr", "+weighting.gama=3"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, environment=False)
    message = str(err.value)
    assert message.startswith("weighting.gama=3: unknown key; did you mean weighting.gamma? "), message
    assert "diffrun.strategies.MinSNR takes citation, gamma, name" in message
    assert compose_config(["weighting=min_snr", "weighting.gamma=3"]).weighting.gamma == 3   # the suggestion exists


@pytest.mark.slow
def test_a_plugin_that_does_not_import_names_the_module(tmp_path):
    (tmp_path / "weighting").mkdir()
    (tmp_path / "weighting" / "mine.yaml").write_text("_target_: my_weightings.Mine\nname: mine\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["debug=fast", f"hydra.searchpath=[file://{tmp_path}]", "weighting=mine"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError) as err:
        validate(cfg, environment=False)
    message = str(err.value)
    assert "module my_weightings cannot be imported" in message and "PYTHONPATH" in message, message


@pytest.mark.slow
def test_cli_says_the_typos_in_one_line(tmp_path):
    for override, expected, _ in TYPOS:
        proc = subprocess.run([sys.executable, "-m", "diffrun.cli", "debug=fast", override], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and expected in lines[0], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, allowed", [
    ("eval.sampler=dim", "expected one of [ddim, ddpm, ddpm_continuous, heun]"),
    ("eval.ddpm_variance=learnt", "expected one of [fixed_large, fixed_small, learned]"),
    ("train.tf32=maybe", "Value 'maybe' is not a valid bool"),
    ("checkpoint.allow_pickle=maybe", "Value 'maybe' is not a valid bool"),
])
def test_a_wrong_value_names_what_is_allowed_in_one_line(override, allowed):
    """Hydra's "Error merging override K=V" keeps OmegaConf's reason: the key, the value and what is allowed."""
    message = override_error(hydra_failure([override]), [override])
    assert message == f"Error merging override {override}: {message.split(': ', 1)[1]}" and "\n" not in message
    assert allowed in message
