"""Fault injection: NaN losses, corrupt checkpoints, full disks, signals and SIGKILL lose no finished work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffrun.cli import train
from diffrun.errors import CheckpointError, DiffrunError
from diffrun.monitoring.metrics import read_jsonl
from diffrun.training import checkpoint as ckpt_module
from diffrun.training.checkpoint import CheckpointManager
from diffrun.training.trainer import NonFiniteLossError, Trainer

from conftest import FAST


def nan_at(trainer, bad_steps):
    """Make the loss weights NaN on the given (1-based) steps."""
    original = trainer.strategy.loss_weights

    def patched(draw, loss):
        w = original(draw, loss)
        return w * float("nan") if trainer.step + 1 in bad_steps else w

    trainer.strategy.loss_weights = patched


def test_nan_skip_counts_and_continues(make_cfg, tmp_path):
    cfg = make_cfg(["train.steps=9", "train.max_skipped_fraction=0.5", "sample.num_images=0"])
    trainer = Trainer(cfg, tmp_path)
    nan_at(trainer, {4})
    trainer.fit()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.denoiser.parameters())
    assert float(trainer.optimizer.state_dict()["state"][0]["step"]) == 8  # the NaN step was not applied
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"


def test_nan_halt_saves_last_good_state(make_cfg, tmp_path):
    cfg = make_cfg(["train.steps=9", "train.nan_policy=halt", "checkpoint.every_steps=0"])
    trainer = Trainer(cfg, tmp_path)
    nan_at(trainer, {5})
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "halted" and "step 5" in status["error"]
    state, _ = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert state["step"] == 6  # detected at the flush after the bad step
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_too_many_skips_halt_even_with_skip_policy(make_cfg, tmp_path):
    trainer = Trainer(make_cfg(["train.steps=9"]), tmp_path)
    nan_at(trainer, {1, 2, 3})
    with pytest.raises(NonFiniteLossError):
        trainer.fit()


def test_corrupt_latest_checkpoint_falls_back(make_cfg, tmp_path, caplog):
    train(make_cfg(["train.steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5"]), tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints")
    latest = manager.list()[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="carries no SHA-256"):
        ckpt_module.load(latest)
    state, path = manager.load_latest()
    assert state["step"] == 3 and path.name == "ckpt_00000003.pt"
    assert "trying the previous checkpoint" in caplog.text


def test_flipped_bytes_inside_tensor_data_are_detected(make_cfg, tmp_path):
    """The SHA-256 travels inside the file: a flipped byte in the middle (tensor data) is caught without any side file."""
    train(make_cfg(["train.steps=3", "checkpoint.every_steps=0"]), tmp_path)
    path = CheckpointManager(tmp_path / "checkpoints").list()[-1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not list(path.parent.glob("*.sha256"))
    with pytest.raises(CheckpointError, match="is corrupt: SHA-256"):
        ckpt_module.load(path)


def test_all_checkpoints_corrupt_stops_instead_of_restarting(make_cfg, tmp_path):
    cfg = make_cfg(["train.steps=6", "checkpoint.every_steps=3", "sample.num_images=0"])
    train(make_cfg(["train.steps=3", "checkpoint.every_steps=0", "sample.num_images=0"]), tmp_path)
    for path in CheckpointManager(tmp_path / "checkpoints").list():
        path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="(?s)none of the 1 checkpoint.*resume=never"):
        train(cfg, tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"
    assert train(make_cfg(["train.steps=6", "resume=never", "sample.num_images=0"]), tmp_path)["step"] == 6


def test_checkpoint_without_hash_needs_allow_unverified(make_cfg, tmp_path):
    (tmp_path / "ckpt_00000001.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="checkpoint.allow_unverified=true"):
        ckpt_module.load(tmp_path / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        ckpt_module.load(tmp_path / "ckpt_00000001.pt", allow_unverified=True)
    assert make_cfg(["checkpoint.allow_unverified=true"]).checkpoint.allow_unverified is True


def test_resume_reads_the_latest_pointer(make_cfg, tmp_path):
    train(make_cfg(["train.steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5", "sample.num_images=0"]), tmp_path)
    directory = tmp_path / "checkpoints"
    assert json.loads((directory / "latest.json").read_text()) == {"path": "ckpt_00000006.pt", "step": 6}
    (directory / "latest.json").write_text(json.dumps({"path": "ckpt_00000003.pt", "step": 3}))
    state, path = CheckpointManager(directory).load_latest()
    assert path.name == "ckpt_00000003.pt" and state["step"] == 3


def test_disk_full_keeps_previous_checkpoint(make_cfg, tmp_path, monkeypatch):
    train(make_cfg(["train.steps=3", "checkpoint.every_steps=0"]), tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints")
    good = manager.list()[-1].read_bytes()
    real_write = ckpt_module.atomic_write

    def full_disk(path, data):
        if path.suffix == ".pt":
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "atomic_write", full_disk)
    with pytest.raises(CheckpointError, match="the disk is full.*untouched"):
        manager.save({"step": 99}, 99)
    monkeypatch.setattr(ckpt_module, "atomic_write", real_write)
    assert manager.list()[-1].read_bytes() == good
    assert manager.load_latest()[0]["step"] == 3


def test_a_kill_between_pointer_and_file_resumes_from_the_newest_complete_file(make_cfg, tmp_path, monkeypatch):
    """save() writes latest.json first: a process killed before the new file lands leaves the pointer naming
    a file that is not there, and resume takes the newest complete file (no finished step is lost)."""
    train(make_cfg(["train.steps=3", "checkpoint.every_steps=0"]), tmp_path)
    manager = CheckpointManager(tmp_path / "checkpoints")
    real_write = ckpt_module.atomic_write

    def killed(path, data):
        if path.suffix == ".pt":
            raise KeyboardInterrupt  # stands in for SIGKILL between the two writes
        return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"step": 99}, 99)
    monkeypatch.setattr(ckpt_module, "atomic_write", real_write)
    assert json.loads((manager.directory / "latest.json").read_text())["step"] == 99
    state, path = manager.load_latest()
    assert state["step"] == 3 and path == manager.list()[-1]


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (root only): room for one unet_tiny checkpoint (2.8 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected-ENOSPC test above covers the logic)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_disk_full_fails_clearly_keeps_the_checkpoint_and_resumes(make_cfg, small_disk, caplog):
    """ENOSPC from a real filesystem, not an injected one: the second checkpoint does not fit, the run stops
    with an error that says so, the first checkpoint stays valid, and once there is room the same run resumes."""
    run = small_disk / "run"
    cfg = make_cfg(["train.steps=6", "checkpoint.every_steps=2", "sample.num_images=0"])
    with pytest.raises(CheckpointError, match="the disk is full"):
        train(cfg, run)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "the disk is full" in status["error"]
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]   # no partial file left behind
    state, path = CheckpointManager(run / "checkpoints").load_latest()
    assert state["step"] == 2 and path.name == "ckpt_00000002.pt"                 # SHA-256 verified on load

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    with caplog.at_level("INFO"):
        summary = train(cfg, run)
    assert "ckpt_00000002.pt at step 2" in caplog.text and summary["step"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][-1] == 6


def test_unwritable_run_dir(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiffrunError, match="not writable"):
        Trainer(make_cfg(), blocker / "run")


def cli(tmp_path, *overrides):
    args = [sys.executable, "-m", "diffrun.cli", *FAST, f"hydra.run.dir={tmp_path}", *overrides]
    return subprocess.Popen(args, cwd=tmp_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_finishes(tmp_path, sig):
    run = tmp_path / "run"
    proc = cli(run, "train.steps=100000", "checkpoint.every_steps=0", "train.log_every=5")
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted"
    state, _ = CheckpointManager(run / "checkpoints").load_latest()
    assert state["step"] == status["step"] > 0
    stopped = status["step"]
    proc = cli(run, f"train.steps={stopped + 4}")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "resumed from" in out and f"at step {stopped}" in out
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_sigkill_resumes_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = cli(run, "train.steps=100000", "checkpoint.every_steps=10", "checkpoint.keep=2")
    wait_for(lambda: len(CheckpointManager(run / "checkpoints").list()) >= 2)
    proc.kill()
    proc.communicate(timeout=60)
    state, path = CheckpointManager(run / "checkpoints").load_latest()
    saved = state["step"]
    assert saved >= 20
    proc = cli(run, f"train.steps={saved + 3}")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert f"at step {saved}" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert records[-1]["step"] == saved + 3


def test_bad_config_exits_nonzero_with_message(tmp_path):
    proc = cli(tmp_path / "r", "train.batch_size=5000")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "train.batch_size=5000 is larger than dataset digits (1797 images)" in out
    assert "Traceback" not in out
