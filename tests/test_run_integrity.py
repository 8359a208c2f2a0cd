"""A run is the run that was started: identity, ownership, poisoned steps, evaluation that changes nothing,
and stops at any moment that leave a resumable run (issue: no silent wrong results, no lost work)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from diffrun.cli import train
from diffrun.errors import CheckpointError, ConfigError
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training import checkpoint as ckpt
from diffrun.training.callbacks import Callback
from diffrun.training.checkpoint import CheckpointManager
from diffrun.fingerprint import fingerprint, fingerprint_of, trained_config
from diffrun.training.identity import RunMismatchError
from diffrun.validation import validate
from diffrun.training.run_directory import RunDirectory, RunLockedError
from diffrun.training.trainer import NonFiniteLossError, Trainer

from conftest import FAST

QUIET = ["sample.num_images=0", "checkpoint.every_steps=0"]


# ---------------------------------------------------------------------------------------------------
# identity: the fingerprint and what it ignores
# ---------------------------------------------------------------------------------------------------
def test_fingerprint_ignores_budget_and_monitoring_but_not_the_recipe(make_cfg):
    base = fingerprint(make_cfg())
    for same in (["train.steps=99"], ["eval.num_samples=7"], ["wandb.mode=offline"], ["device=cpu"],
                 ["train.log_every=1"], ["checkpoint.keep=9"], ["sample.steps=2"], ["name=other"],
                 ["train.progress=true"], ["stats.bins=8"]):
        assert fingerprint(make_cfg(same)) == base, same
    for other in (["optimizer.optim.lr=5e-4"], ["seed=1"], ["weighting=min_snr"], ["schedule=linear"],
                  ["model.prediction=v"], ["train.batch_size=4"], ["precision=bf16"], ["ema.decay=0.99"]):
        assert fingerprint(make_cfg(other)) != base, other
    # a cosine decay runs over train.steps: then the length is part of what is trained
    cosine = make_cfg(["optimizer.decay=cosine"])
    assert fingerprint(cosine) != fingerprint(make_cfg(["optimizer.decay=cosine", "train.steps=99"]))


def test_config_yaml_round_trip_keeps_the_fingerprint(make_cfg, tmp_path):
    cfg = make_cfg(["weighting=speed", "model.prediction=v"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert fingerprint_of(trained_config(OmegaConf.load(tmp_path / "config.yaml"))) == fingerprint(cfg)


def test_another_config_never_resumes_a_run_silently(make_cfg, tmp_path):
    train(make_cfg(["train.steps=3", *QUIET]), tmp_path)
    other = make_cfg(["train.steps=6", "optimizer.optim.lr=5e-4", *QUIET])
    with pytest.raises(RunMismatchError, match=r"(?s)optimizer\.optim\.lr: 0\.001 → 0\.0005.*resume=force"):
        train(other, tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"   # untouched
    # the finished run is not "skipped" for another config either, and its checkpoint is refused directly too
    with pytest.raises(RunMismatchError):
        train(make_cfg(["train.steps=3", "optimizer.optim.lr=5e-4", *QUIET]), tmp_path)
    state = ckpt.load(CheckpointManager(tmp_path / "checkpoints").list()[-1])
    assert state["fingerprint"] == fingerprint(make_cfg())
    summary = train(make_cfg(["train.steps=6", "optimizer.optim.lr=5e-4", "resume=force", *QUIET]), tmp_path)
    assert summary["step"] == 6   # continued the recorded run under the new config, as asked


def test_name_gets_a_suffix_when_the_command_line_changes_the_recipe(tmp_path):
    """The README's own example used to land in the main job's directory."""
    def job_config(*overrides):
        out = subprocess.run([sys.executable, "-m", "diffrun.cli", "--cfg", "job", "--resolve", *overrides],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return OmegaConf.create(out.stdout)

    plain = job_config()
    assert plain.name == "digits_unet_small_uniform_seed0"
    assert job_config("train.steps=10", "eval.num_samples=50", "seed=0").name == plain.name   # not the recipe
    assert job_config("weighting=min_snr").name == "digits_unet_small_min_snr_seed0"          # said by the name
    changed = job_config("model.prediction=v", "schedule=linear", "sample.sampler=ddpm").name
    lr = job_config("optimizer.optim.lr=5e-4").name
    assert changed.startswith(plain.name + "_") and lr.startswith(plain.name + "_") and changed != lr
    assert job_config("optimizer.optim.lr=5e-4").name == lr                                   # reproducible


# ---------------------------------------------------------------------------------------------------
# ownership: one process per run
# ---------------------------------------------------------------------------------------------------
def test_second_process_on_the_same_run_stops_naming_the_holder(make_cfg, tmp_path):
    first = RunDirectory(tmp_path)
    first.lock()
    try:
        with pytest.raises(RunLockedError, match=rf"in use by PID {os.getpid()} on "):
            train(make_cfg(QUIET), tmp_path)
        assert not (tmp_path / "status.json").exists()          # it did not touch the holder's run
    finally:
        first.unlock()
    assert train(make_cfg(QUIET), tmp_path)["step"] == 6


def test_lock_of_a_dead_process_is_taken_over(make_cfg, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from diffrun.training.run_directory import RunDirectory; "
                               f"RunDirectory({str(tmp_path)!r}).lock(); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        RunDirectory(tmp_path).lock()
    holder.kill()
    holder.wait()
    with caplog.at_level("INFO"):
        assert train(make_cfg(QUIET), tmp_path)["step"] == 6
    assert f"from PID {holder.pid}" in caplog.text


def test_temporary_files_of_a_killed_writer_are_removed(make_cfg, tmp_path):
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = [tmp_path / "checkpoints" / ".ckpt_00000003.pt.tmp.99999", tmp_path / ".status.json.tmp.99999"]
    for path in stale:
        path.write_bytes(b"half")
    train(make_cfg(QUIET), tmp_path)
    assert not any(path.exists() for path in stale)


# ---------------------------------------------------------------------------------------------------
# a poisoned step reaches nothing: not the weights, the EMA, the statistics nor a strategy's state
# ---------------------------------------------------------------------------------------------------
class NaNOnce(torch.nn.Module):
    """The network output of one sample is NaN on the armed call (a NaN from the network, not the weights)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.armed = model, False

    def forward(self, z, logsnr, *args, **kwargs):
        out = self.inner(z, logsnr, *args, **kwargs)
        if self.armed:
            self.armed = False
            out = out.clone()
            out[0] = float("nan")
        return out


def _snapshot(trainer):
    tensors = lambda sd: {k: v.detach().clone() for k, v in sd.items() if torch.is_tensor(v)}  # noqa: E731
    return {"model": tensors(trainer.denoiser.state_dict()), "ema": tensors(trainer.ema.model.state_dict()),
            "strategy": tensors(trainer.strategy.state_dict()), "stats": trainer.stats.sums.clone(),
            "sums": trainer.counters.sums.clone()}


@pytest.mark.parametrize("weighting,extra", [
    ("importance", ["weighting.num_timesteps=20", "weighting.history=2"]),
    ("adaptive_histogram", []),
    ("variance_aware_binned", ["weighting.warmup=0", "weighting.min_count=2"]),
    ("adaptive_timestep", ["weighting.update_every=1", "weighting.num_timesteps=20", "weighting.in_channels=1"]),
    ("speed", []),
])
def test_nan_from_the_network_changes_no_state(make_cfg, tmp_path, weighting, extra):
    from diffrun.training.step import train_step

    trainer = Trainer(make_cfg([f"weighting={weighting}", *extra]), tmp_path, callbacks=[])
    poisoned = NaNOnce(trainer.parts.model)
    trainer.parts.model = poisoned

    def step():
        train_step(trainer.parts, trainer.data.batch(trainer.parts.local_batch_size)[0], trainer.step,
                   trainer.counters, trainer.stats)
        trainer.step += 1

    for _ in range(3):
        step()
    before = _snapshot(trainer)
    poisoned.armed = True
    step()
    after = _snapshot(trainer)
    assert int(trainer.counters.nonfinite) == 1 and int(trainer.counters.first_bad) == 4
    for part in before:
        a, b = before[part], after[part]
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{part}.{key} changed by a skipped step"
        else:
            assert torch.equal(a, b), f"{part} changed by a skipped step"
    step()                                                                   # and the next step trains normally
    assert all(torch.isfinite(v).all() for v in trainer.strategy.state_dict().values() if torch.is_tensor(v))
    assert any(not torch.equal(before["model"][k], v) for k, v in trainer.denoiser.state_dict().items())
    assert int(trainer.counters.good) == 4
    trainer.directory.unlock()


def test_overflowing_update_is_not_saved_as_last_good_state(make_cfg, tmp_path, monkeypatch):
    """An applied update that made the weights non-finite (finite loss and gradient): the run halts at the next
    flush and the checkpoint on disk stays the last finite one."""
    from diffrun.training import step as step_module

    cfg = make_cfg(["train.steps=9", "checkpoint.every_steps=3", "train.log_every=2", "sample.num_images=0"])
    trainer = Trainer(cfg, tmp_path)
    real = step_module._optimizer_step_if

    def overflow_on_step_5(optimizer, good):
        real(optimizer, good)
        if trainer.step + 1 == 5:
            with torch.no_grad():
                next(iter(trainer.denoiser.parameters())).fill_(float("inf"))

    monkeypatch.setattr(step_module, "_optimizer_step_if", overflow_on_step_5)
    with pytest.raises(NonFiniteLossError, match="weights became non-finite before step 6.*ckpt_00000003.pt"):
        trainer.fit()
    steps = [ckpt.step_of(p) for p in CheckpointManager(tmp_path / "checkpoints").list()]
    assert steps == [3]
    state = ckpt.load(tmp_path / "checkpoints" / "ckpt_00000003.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "halted"


# ---------------------------------------------------------------------------------------------------
# evaluation changes nothing that is trained
# ---------------------------------------------------------------------------------------------------
def test_evaluation_and_its_cache_never_change_training(make_cfg, tmp_path, fid_features):
    """Same losses and weights with and without evaluation; same FID with an empty and a filled reference cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(fid_features.path, cache / fid_features.path.name)          # weights present, reference stats not
    common = ["deterministic=true", "train.steps=8", "train.log_every=2", "checkpoint.every_steps=0"]
    evaluating = [*common, "eval.enabled=true", "eval.every_steps=4", "eval.num_samples=20", "eval.kid_subset_size=10",
                  "eval.num_reference=40",
                  "eval.steps=3", "eval.batch_size=20", f"eval.cache_dir={cache}", "sample.every_steps=3"]
    train(make_cfg([*common, "sample.num_images=0"]), tmp_path / "plain")
    train(make_cfg(evaluating), tmp_path / "empty_cache")
    assert list((cache / "fidelity").iterdir())                                # the first run filled it
    train(make_cfg(evaluating), tmp_path / "filled_cache")

    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]

    def fids(run):
        return [(r["step"], r["fid"], r["kid_mean"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "fid" in r]

    assert losses("plain") == losses("empty_cache") == losses("filled_cache")
    assert len(fids("empty_cache")) == 2 and fids("empty_cache") == fids("filled_cache")
    final = [ckpt.load(tmp_path / run / "checkpoints" / "ckpt_00000008.pt") for run in ("plain", "empty_cache", "filled_cache")]
    for key in final[0]["model"]:
        assert torch.equal(final[0]["model"][key], final[1]["model"][key]) and torch.equal(final[1]["model"][key], final[2]["model"][key])


# ---------------------------------------------------------------------------------------------------
# stops at any moment leave a resumable run
# ---------------------------------------------------------------------------------------------------
class SignalAtEnd(Callback):
    """Sends SIGINT to this process during the end-of-run work, then keeps working (as a long FID would)."""

    def __init__(self, sample):
        self.sample = sample

    def on_end(self, run):
        os.kill(os.getpid(), signal.SIGINT)
        run.generate(2, 0, self.sample, "sample")   # checks for the stop between batches, as FID sampling does
        raise AssertionError("generate should have stopped")


def test_stop_during_final_evaluation_resumes_only_the_end(make_cfg, tmp_path, caplog):
    cfg = make_cfg(["train.steps=4", *QUIET])
    trainer = Trainer(cfg, tmp_path, callbacks=[SignalAtEnd(cfg.sample)])
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit()
    assert exit_info.value.code == 128 + signal.SIGINT
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] == 4 and status["checkpoint_step"] == 4
    with caplog.at_level("INFO"):
        summary = train(make_cfg(["train.steps=4", "checkpoint.every_steps=0"]), tmp_path)
    assert "at step 4" in caplog.text and summary["step"] == 4 and summary["samples"]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    assert [ckpt.step_of(p) for p in CheckpointManager(tmp_path / "checkpoints").list()] == [4]  # no step retrained


def test_second_interrupt_while_checkpointing_finishes_the_write(make_cfg, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(["train.steps=6", "checkpoint.every_steps=3", "sample.num_images=0"]), tmp_path)
    real_save = CheckpointManager.save

    def save_with_two_interrupts(self, state, step):
        os.kill(os.getpid(), signal.SIGINT)      # first: stop at the next safe point
        os.kill(os.getpid(), signal.SIGINT)      # second: would stop at once, but a checkpoint is being written
        return real_save(self, state, step)

    monkeypatch.setattr(CheckpointManager, "save", save_with_two_interrupts)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "interrupted" and status["checkpoint_step"] == 3
    assert ckpt.load(tmp_path / "checkpoints" / "ckpt_00000003.pt")["step"] == 3      # complete and verified
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp." in p.name]


def test_status_is_rewritten_in_place_when_the_disk_is_full(tmp_path, monkeypatch):
    from diffrun.run_folder import status as run_status

    run_status.write_status(tmp_path, "running", 3, 10)

    def no_space(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_status, "atomic_write", no_space)
    run_status.write_status(tmp_path, "failed", 5, 10, error="CheckpointError: the disk is full")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"state": "failed", "step": 5, "total_steps": 10, "error": "CheckpointError: the disk is full"}


def test_cli_lock_conflict_is_one_line(tmp_path):
    holder = RunDirectory(tmp_path / "run")
    holder.lock()
    try:
        out = subprocess.run([sys.executable, "-m", "diffrun.cli", *FAST, f"hydra.run.dir={tmp_path / 'run'}"],
                             capture_output=True, text=True, timeout=180)
    finally:
        holder.unlock()
    assert out.returncode == 1 and "is in use by PID" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_checkpoint_of_another_program_is_refused_without_allow_unverified(make_cfg, tmp_path):
    train(make_cfg(["train.steps=3", *QUIET]), tmp_path / "a")
    path = CheckpointManager(tmp_path / "a" / "checkpoints").list()[-1]
    bare = tmp_path / "bare.pt"
    bare.write_bytes(path.read_bytes()[:-ckpt.TRAILER])                        # a plain torch.save file
    with pytest.raises(ConfigError, match="resume=.*checkpoint.allow_unverified=true"):   # at the door: no folder
        validate(make_cfg(["train.steps=6", f"resume={bare}", *QUIET]))
    assert not (tmp_path / "b").exists()
    summary = train(make_cfg(["train.steps=6", f"resume={bare}", "checkpoint.allow_unverified=true", *QUIET]),
                    tmp_path / "c")
    assert summary["step"] == 6
