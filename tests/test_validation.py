"""Every bad value is refused before any work: one line naming the key and the value, no traceback, no run
directory, no data read. Most cases run in-process through the Hydra callback that guards `diffrun`
(ValidateBeforeRun.on_run_start, the code path of the CLI); a handful run the real command line."""
import ast
import functools
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from diffrun.cli import CONF_DIR
from diffrun.config import RunConfig
from diffrun.validation import validate
from diffrun.launching.preflight import ValidateBeforeRun, remove_hydra_leftovers
from diffrun.building import target_parameters
from diffrun.config import GROUP_NODES
from diffrun.sampling import SamplerOptions
from diffrun.validation import declared_ranges

from conftest import FAST, write_image_folder

PACKAGE = Path(__file__).resolve().parents[1] / "diffrun"

# (overrides, substrings the message must contain: the key and the offending value). `{tmp}` is a fresh folder.
CASES = [
    # accepted silently before
    (["train.grad_clip=nan"], ["train.grad_clip=nan"]),
    (["train.max_skipped_fraction=1.5"], ["train.max_skipped_fraction=1.5"]),
    (["+train.foo=1"], ["train.foo=1", "unknown key"]),
    (["+foo=1"], ["foo=1", "unknown key"]),
    (["name=''"], ["name=''"]),
    (["name=../../escape"], ["name='../../escape'"]),
    (["sample.eta=nan"], ["sample.eta=nan"]),
    (["stats.logsnr_min=nan"], ["stats.logsnr_min=nan"]),
    (["eval.num_reference=-5"], ["eval.num_reference=-5"]),
    (["optimizer.warmup_steps=-3"], ["optimizer.warmup_steps=-3"]),
    (["wandb.init_timeout=-1"], ["wandb.init_timeout=-1"]),
    (["dist.backend=foo"], ["dist.backend='foo'", "gloo"]),
    # failed only after training
    (["eval.enabled=true", "eval.inception_weights=/nope/i.pth"], ["eval.inception_weights='/nope/i.pth'"]),
    (["model.net.channels=0"], ["model.net.channels=0"]),
    (["optimizer.optim.lr=inf"], ["optimizer.optim.lr=inf"]),
    (["schedule.s=-0.5"], ["schedule.s=-0.5"]),
    # printed a traceback
    (["device=tpu"], ["device='tpu'", "cuda:N"]),
    (["device=''"], ["device=''"]),
    (["optimizer.optim.lr=-1"], ["optimizer.optim.lr=-1"]),
    (["dataset=image_folder"], ["dataset.root=???", "dataset=image_folder"]),
    (["hydra.run.dir={tmp}/a_file/run"], ["hydra.run.dir=", "a_file is a file"]),
    (["dist.backend=foo", "dist.devices=2"], ["dist.backend='foo'"]),
    (["dist.devices=3"], ["train.batch_size=8", "dist.devices=3"]),
    # message without the key or the allowed values
    (["schedule.s=-1"], ["schedule.s=-1"]),
    (["dataset.image_size=0"], ["dataset.image_size=0"]),
    # the same kinds: schema numbers
    (["train.grad_clip=inf"], ["train.grad_clip=inf"]),
    (["train.grad_clip=-1"], ["train.grad_clip=-1"]),
    (["train.max_skipped_fraction=-0.1"], ["train.max_skipped_fraction=-0.1"]),
    (["train.max_skipped_fraction=nan"], ["train.max_skipped_fraction=nan"]),
    (["train.steps=0"], ["train.steps=0"]),
    (["train.steps=-5"], ["train.steps=-5"]),
    (["train.batch_size=0"], ["train.batch_size=0"]),
    (["train.log_every=0"], ["train.log_every=0"]),
    (["ema.decay=1.5"], ["ema.decay=1.5"]),
    (["ema.decay=1.0"], ["ema.decay=1.0"]),
    (["ema.decay=nan"], ["ema.decay=nan"]),
    (["ema.decay=-0.1"], ["ema.decay=-0.1"]),
    (["sample.steps=0"], ["sample.steps=0"]),
    (["sample.eta=-0.5"], ["sample.eta=-0.5"]),
    (["sample.eta=1.5"], ["sample.eta=1.5"]),
    (["sample.eta=inf"], ["sample.eta=inf"]),
    (["sample.num_images=-1"], ["sample.num_images=-1"]),
    (["sample.every_steps=-1"], ["sample.every_steps=-1"]),
    (["sample.seed=-1"], ["sample.seed=-1"]),
    (["seed=-1"], ["seed=-1"]),
    (["checkpoint.keep=0"], ["checkpoint.keep=0"]),
    (["checkpoint.every_steps=-10"], ["checkpoint.every_steps=-10"]),
    (["eval.num_samples=0"], ["eval.num_samples=0"]),
    (["eval.num_reference=0"], ["eval.num_reference=0"]),
    (["eval.steps=0"], ["eval.steps=0"]),
    (["eval.batch_size=0"], ["eval.batch_size=0"]),
    (["eval.kid_subset_size=0"], ["eval.kid_subset_size=0"]),
    (["eval.repeats=0"], ["eval.repeats=0"]),
    (["eval.enabled=true", "eval.reference_stats=/nope/ref.npz", "eval.num_reference=null"], ["eval.reference_stats='/nope/ref.npz'", "no such file"]),
    (["eval.reference_stats=/nope/ref.npz", "eval.num_reference=10"], ["eval.num_reference=10", "set one of them"]),
    (["eval.seed=-3"], ["eval.seed=-3"]),
    (["eval.every_steps=-1"], ["eval.every_steps=-1"]),
    (["stats.bins=0"], ["stats.bins=0"]),
    (["stats.logsnr_max=inf"], ["stats.logsnr_max=inf"]),
    (["stats.logsnr_min=30"], ["stats.logsnr_min=30", "stats.logsnr_max=20"]),
    (["wandb.plots_every=0"], ["wandb.plots_every=0"]),
    (["wandb.init_timeout=nan"], ["wandb.init_timeout=nan"]),
    (["wandb.init_timeout=0"], ["wandb.init_timeout=0"]),
    (["report.target_fid=-1"], ["report.target_fid=-1"]),
    (["report.target_fid=nan"], ["report.target_fid=nan"]),
    (["dist.devices=0"], ["dist.devices=0"]),
    (["dist.timeout_s=0"], ["dist.timeout_s=0"]),
    (["dist.timeout_s=inf"], ["dist.timeout_s=inf"]),
    (["dist.interrupt_check_every=0"], ["dist.interrupt_check_every=0"]),
    # names that become folders
    (["name=."], ["name='.'"]),
    (["name=.."], ["name='..'"]),
    (["name=a/b"], ["name='a/b'"]),
    (["sweep_name=../x"], ["sweep_name='../x'"]),
    (["weighting.name=a/b"], ["weighting.name='a/b'"]),
    (["name=${nope}"], ["name", "nope"]),
    # devices, backends, precision, resume
    (["device=cuda:99"], ["device='cuda:99'"]),
    (["device=CPU"], ["device='CPU'"]),
    (["device=cuda:x"], ["device='cuda:x'"]),
    (["resume=yes"], ["resume='yes'"]),
    (["resume=/nope/ckpt.pt"], ["resume='/nope/ckpt.pt'", "no such checkpoint"]),
    (["dist.backend=nccl", "dist.devices=2"], ["dist.backend='nccl'"]),
    # the optimizer group
    (["optimizer.optim.lr=0"], ["optimizer.optim.lr=0"]),
    (["optimizer.optim.lr=nan"], ["optimizer.optim.lr=nan"]),
    (["optimizer.optim.betas=[0.9,1.5]"], ["optimizer.optim.betas[1]=1.5"]),
    (["optimizer.optim.betas=[0.9]"], ["optimizer.optim.betas=[0.9]"]),
    (["optimizer.optim.eps=-1"], ["optimizer.optim.eps=-1"]),
    (["optimizer.optim.weight_decay=-0.1"], ["optimizer.optim.weight_decay=-0.1"]),
    (["optimizer.optim.weight_decay=abc"], ["optimizer.optim.weight_decay='abc'"]),
    (["optimizer.warmup_steps=1.5"], ["optimizer.warmup_steps=1.5", "integer"]),
    (["optimizer.decay=linear"], ["optimizer.decay='linear'", "cosine"]),
    (["optimizer.min_lr_ratio=2"], ["optimizer.min_lr_ratio=2"]),
    # keys that nothing reads
    (["+optimizer.foo=1"], ["optimizer.foo=1", "unknown key"]),
    (["+optimizer.optim.foo=1"], ["optimizer.optim.foo=1", "unknown key"]),
    (["+model.net.foo=1"], ["model.net.foo=1", "unknown key"]),
    (["+model.foo=1"], ["model.foo=1", "unknown key"]),
    (["weighting=min_snr", "+weighting.gama=2"], ["weighting.gama=2", "gamma"]),
    (["+schedule.foo=1"], ["schedule.foo=1", "unknown key"]),
    (["dataset=cifar10", "+dataset.root=/x"], ["dataset.root='/x'", "unknown key"]),
    (["+dataset.foo=1"], ["dataset.foo=1", "unknown key"]),
    (["+eval.foo=1"], ["eval.foo=1", "unknown key"]),
    (["+wandb.foo=bar"], ["wandb.foo='bar'", "unknown key"]),
    (["++train.foo=1"], ["train.foo=1", "unknown key"]),
    (["~model.net"], ["model.net is required", "model=unet_tiny"]),
    (["~dataset.loader"], ["dataset.loader is required", "dataset=digits"]),
    (["~schedule._target_"], ["schedule._target_ is required", "schedule=cosine"]),
    (["dataset=cifar10", "~dataset.loader.root"], ["dataset.loader.root is required"]),
    # the model and dataset groups
    (["model.prediction=noise"], ["model.prediction='noise'", "eps"]),
    (["model.sigma_data=0"], ["model.sigma_data=0"]),
    (["model.sigma_data=nan"], ["model.sigma_data=nan"]),
    (["model.net.channels=-8"], ["model.net.channels=-8"]),
    (["model.net.dropout=1.5"], ["model.net.dropout=1.5"]),
    (["model.net.channel_mult=[0]"], ["model.net.channel_mult=[0]"]),
    (["dataset.image_size=-16"], ["dataset.image_size=-16"]),
    (["dataset.channels=2"], ["dataset.channels=2"]),
    (["dataset.channels=0"], ["dataset.channels=0"]),
    (["dataset.loader.image_size=8"], ["dataset.loader.image_size=8", "dataset.image_size=16"]),
    (["dataset=cifar10", "dataset.image_size=64"], ["dataset.image_size=64", "32"]),
    (["dataset=cifar10", "dataset.loader.split=val"], ["dataset.loader.split='val'", "test"]),
    (["dataset=cifar10", "dataset.loader.release=cifar5"], ["dataset.loader.release='cifar5'", "cifar100"]),
    (["dataset=cifar10", "dataset.loader.root={tmp}/no_cifar", "dataset.loader.download=false"],
     ["dataset.loader.root=", "no_cifar", "cifar-10-batches-py"]),
    (["dataset=cifar10", "+dataset.loader.limit=-5"], ["dataset.loader.limit=-5"]),
    (["dataset=image_folder", "dataset.root=/nope"], ["dataset.root='/nope'", "not a directory"]),
    (["dataset=image_folder", "dataset.root={tmp}"], ["dataset.root=", "holds no images"]),
    # schedule and weighting constructors, NaN inside the groups
    (["weighting=min_snr", "weighting.gamma=nan"], ["weighting.gamma=nan"]),
    (["weighting=min_snr", "weighting.gamma=-1"], ["weighting.gamma", "-1"]),
    (["weighting=speed", "weighting.dual_sampling=maybe"], ["weighting.dual_sampling='maybe'"]),
    (["schedule=linear", "schedule.beta_start=0.5"], ["schedule.beta_start", "0.5"]),
    (["schedule=edm", "schedule.sigma_min=nan"], ["schedule.sigma_min=nan"]),
    (["schedule.logsnr_min=nan"], ["schedule.logsnr_min=nan"]),
]

# Refused by Hydra/OmegaConf while composing (before the callback), with the key and the value in the message.
COMPOSE_CASES = [
    (["train.steps=abc"], ["train.steps", "abc"]),
    (["train.steps=1.5"], ["train.steps", "1.5"]),
    (["seed=abc"], ["seed", "abc"]),
    (["dist.devices=two"], ["dist.devices", "two"]),
    (["precision=fp8"], ["precision", "fp8"]),
    (["sample.sampler=euler"], ["sample.sampler", "euler"]),
    (["eval.sampler=euler"], ["eval.sampler", "euler"]),
    (["train.nan_policy=ignore"], ["nan_policy", "ignore"]),
    (["eval.on_unavailable=maybe"], ["eval.on_unavailable", "maybe"]),
    (["eval.enabled=maybe"], ["eval.enabled", "maybe"]),
    (["train.compile=maybe"], ["train.compile", "maybe"]),
    (["deterministic=maybe"], ["deterministic", "maybe"]),
    (["stats.range=auto"], ["stats.range", "auto"]),
    (["wandb.mode=online2"], ["wandb.mode", "online2"]),
    (["wandb.tags=foo"], ["wandb.tags", "foo"]),
    (["weighting=not_a_method"], ["weighting", "not_a_method", "min_snr"]),
    (["dataset=imagenet"], ["dataset", "imagenet", "cifar10"]),
    (["model=huge"], ["model", "huge", "unet_small"]),
    (["schedule=sqrt"], ["schedule", "sqrt", "cosine"]),
    (["optimizer=sgd"], ["optimizer", "sgd", "adamw"]),
    (["train.stepz=5"], ["train.stepz"]),
    (["dataset=cifar10", "dataset.root=/x"], ["dataset.root"]),
]


def compose_run(overrides, tmp):
    """The config `diffrun` composes, with Hydra's own node (what the callback sees)."""
    overrides = [o.replace("{tmp}", str(tmp)) for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", return_hydra_config=True,
                           overrides=[*FAST, f"hydra.run.dir={tmp}/run", *overrides])
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def no_data_reads(monkeypatch):
    """Any loader call fails the test: the checks must not read the dataset."""
    import diffrun.data
    import diffrun.data.cifar as cifar
    import diffrun.data.loaders as loaders

    def forbidden(original):
        @functools.wraps(original)  # the same signature and checks, which validation reads
        def loader(*args, **kwargs):
            raise AssertionError(f"validation called {original.__name__}")
        return loader

    for module, name in ((loaders, "load_digits"), (cifar, "load_cifar"), (loaders, "load_image_folder")):
        monkeypatch.setattr(module, name, forbidden(getattr(module, name)))
        monkeypatch.setattr(diffrun.data, name, getattr(module, name))


def test_the_table_is_large():
    assert len(CASES) + len(COMPOSE_CASES) >= 90


@pytest.mark.parametrize("overrides, expected", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_refused_before_the_run_directory(overrides, expected, tmp_path, capsys, no_data_reads):
    (tmp_path / "a_file").write_text("x")
    if "device=cuda:99" in overrides and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 GPUs")
    cfg = compose_run(overrides, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        ValidateBeforeRun().on_run_start(config=cfg)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err           # one line
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file"], [])  # nothing made, not even a probe


@pytest.mark.parametrize("overrides, expected", COMPOSE_CASES, ids=[" ".join(o) for o, _ in COMPOSE_CASES])
def test_refused_while_composing(overrides, expected, tmp_path):
    with pytest.raises(Exception) as err:
        compose_run(overrides, tmp_path)
    text = f"{err.value} {err.value.__cause__}"
    for part in expected:
        assert part in text, text


@pytest.mark.parametrize("overrides, available", [
    (["device=cuda"], torch.cuda.is_available()),
    (["device=mps"], torch.backends.mps.is_available()),
    (["precision=fp16", "device=cpu"], False),
])
def test_devices_this_machine_lacks(overrides, available, tmp_path, capsys):
    if available:
        pytest.skip(f"{overrides[0]} is available here")
    with pytest.raises(SystemExit):
        ValidateBeforeRun().on_run_start(config=compose_run(overrides, tmp_path))
    err = capsys.readouterr().err
    assert overrides[0].replace("=", "='", 1) in err or overrides[0] in err, err
    assert "available here" in err or "needs CUDA" in err, err


def test_valid_configs_pass_and_cifar_may_be_downloaded_later(tmp_path):
    """A missing CIFAR root with download=true passes: the loader fetches it, or stops naming the archive."""
    validate(compose_run(["dataset=cifar10", f"dataset.loader.root={tmp_path}/nothing_yet"], tmp_path))
    ValidateBeforeRun().on_run_start(config=compose_run(["weighting=min_snr", "schedule=edm"], tmp_path))
    root = write_image_folder(tmp_path / "images", size=32)
    validate(compose_run(["dataset=image_folder", f"dataset.root={root}"], tmp_path))
    assert not (tmp_path / "nothing_yet").exists() and not (tmp_path / "run").exists()


def test_every_number_of_the_schema_has_a_range():
    def numbers(kind, prefix=""):
        for f in fields(kind):
            factory = getattr(f, "default_factory", None)
            if is_dataclass(factory):
                yield from numbers(factory, f"{prefix}{f.name}.")
            elif any(t in str(f.type) for t in ("int", "float")):
                yield f"{prefix}{f.name}"

    # the sampler's numbers are checked by their owner, SamplerOptions (one statement of their ranges)
    sampler_keys = {f"{section}.{f.name}" for section in ("sample", "eval") for f in fields(SamplerOptions)
                    if f.name != "steps"}
    ranged = {key for key, _, _ in declared_ranges() if key.split(".")[0] not in GROUP_NODES}
    by_callbacks = {"wandb.plots_every", "wandb.init_timeout"}   # WandbLogger's constructor checks its own node
    assert sorted(numbers(RunConfig)) == sorted(ranged | by_callbacks | (sampler_keys & set(numbers(RunConfig))))
    assert not ranged & sampler_keys                       # each range stated once


def test_leftovers_of_a_refused_job_go_and_an_earlier_run_stays(tmp_path):
    job = tmp_path / "0_uniform_seed0"
    (job / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (job / ".hydra" / name).write_text("x")
    (job / "cli.log").write_text("error")
    assert remove_hydra_leftovers(job, "cli") and not job.exists() and tmp_path.exists()
    earlier = tmp_path / "earlier"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "config.yaml").write_text("x")
    (earlier / "status.json").write_text('{"state": "finished"}')
    assert not remove_hydra_leftovers(earlier, "cli")
    assert (earlier / "status.json").exists() and (earlier / ".hydra" / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------
# hints: every key an error or log message names exists
# ------------------------------------------------------------------------------------------------
TOP_LEVEL = [f.name for f in fields(RunConfig)] + ["hydra"]
KEY = re.compile(r"(?<![\w./\-{$])((?:%s)(?:\.[A-Za-z_]\w*)+)(?![\w(])" % "|".join(TOP_LEVEL))
NOT_KEYS = ("yaml", "md", "json", "jsonl", "log", "pt", "npz", "png")  # file names such as report.md


def message_keys() -> dict[str, str]:
    """{dotted config key: where} for every key-like text in the package's string literals (docstrings aside)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                for key in KEY.findall(node.value):
                    parts = key.split(".")
                    if parts[-1] in NOT_KEYS or any(p.startswith("_") and not p.endswith("_") for p in parts):
                        continue  # a file name, or a Python path such as hydra._internal...
                    found.setdefault(key, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


@functools.lru_cache(maxsize=1)
def existing_keys() -> frozenset[str]:
    """Every dotted key of every group option (and of Hydra's own config and launchers), and every argument
    of a `_target_` node's target (a key one may add with +, e.g. +dataset.loader.limit=1000)."""
    def walk(node, prefix):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) and not node._is_none() else []
        for key, value in items:
            yield f"{prefix}{key}"
            if isinstance(value, DictConfig):
                yield from walk(value, f"{prefix}{key}.")
        if isinstance(node, DictConfig) and not node._is_none() and "_target_" in node:
            yield from (f"{prefix}{name}" for name in target_parameters(str(node._target_))[0] or ())

    keys = set()
    choices = [[f"{g}={p.stem}"] for g in ("dataset", "schedule", "weighting", "model", "optimizer")
               for p in (Path(CONF_DIR) / g).glob("*.yaml")]
    choices += [[f"hydra/launcher={p.stem}"] for p in (Path(CONF_DIR) / "hydra" / "launcher").glob("*.yaml")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for overrides in [[], *choices]:
            keys |= set(walk(compose(config_name="config", overrides=overrides, return_hydra_config=True), ""))
    GlobalHydra.instance().clear()
    # a group's optional keys, which no shipped option may set (+model.init_from=...)
    keys |= {f"{group}.{f.name}" for group, node in GROUP_NODES.items() for f in fields(node)}
    return frozenset(keys)


# Wrong hints in files other helpers own; remove an entry once the message names a real key.
PENDING = {"model.channels": "diffrun/models/unet.py names model.channels; the key is model.net.channels",
           "eval.reference_stats": "the evaluation helper's key (precomputed FID statistics), merged separately"}


def test_every_hint_names_a_key_that_exists():
    keys = existing_keys()
    wrong = {key: where for key, where in message_keys().items() if key not in keys and key not in PENDING}
    assert not wrong, f"messages name keys that no config has: {wrong}"
    assert {"dataset.loader.root", "dataset.loader.download", "dataset.loader.split", "dataset.loader.resize",
            "optimizer.optim.lr", "hydra.run.dir", "train.grad_clip"} <= set(message_keys())  # the search finds them


def test_nonfinite_hint_names_the_candidates():
    from diffrun.training.nonfinite import nonfinite_hint

    cfg = compose_run(["weighting=snr", "schedule=edm", "train.grad_clip=0"], Path("/unused"))
    hint = nonfinite_hint(cfg, reduced_precision=True)
    for part in ("optimizer.optim.lr=0.001", "train.grad_clip=0", "precision=auto", "weighting=snr",
                 "schedule.sigma_min=0.002", "schedule.sigma_max=80.0", "model.prediction=eps"):
        assert part in hint, hint
    keys = existing_keys()
    assert all(k in keys for k in KEY.findall(hint)), hint
    assert "precision" not in nonfinite_hint(compose_run([], Path("/unused")), reduced_precision=False)


# ------------------------------------------------------------------------------------------------
# the real command lines (a few: each starts Python)
# ------------------------------------------------------------------------------------------------
def diffrun(cwd, *args, module="diffrun.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def one_error_line(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) >= 1, out
    return "\n".join(errors)


@pytest.mark.parametrize("overrides, expected", [
    (["train.grad_clip=nan"], "train.grad_clip=nan"),
    (["dataset=image_folder"], "dataset.root=???"),
    (["device=tpu"], "device='tpu'"),
    (["optimizer.optim.lr=-1"], "optimizer.optim.lr=-1"),
    (["+train.foo=1"], "train.foo=1"),
    (["name=''"], "name=''"),
])
def test_cli_refuses_in_one_line_and_makes_nothing(overrides, expected, tmp_path):
    proc = diffrun(tmp_path, *FAST, f"hydra.run.dir={tmp_path}/run", *overrides)
    line = one_error_line(proc)
    assert line.count("\n") == 0 and expected in line, line
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_unwritable_run_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    line = one_error_line(diffrun(tmp_path, *FAST, f"hydra.run.dir={tmp_path}/a_file/run"))
    assert "hydra.run.dir=" in line and "a_file is a file" in line
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_cli_refuses_a_sweep_with_one_bad_job_before_any_job(tmp_path):
    proc = diffrun(tmp_path, "-m", *FAST, f"hydra.sweep.dir={tmp_path}/sweep", "optimizer.optim.lr=1e-4,-1")
    line = one_error_line(proc)
    assert line.count("\n") == 0 and "job 1 (optimizer.optim.lr=-1): optimizer.optim.lr=-1" in line, line
    assert list(tmp_path.iterdir()) == []  # not even the sweep folder


def test_eval_command_refuses_a_wrong_type_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from diffrun.training.checkpoint import CheckpointManager

    from conftest import compose_config

    config = OmegaConf.to_container(compose_config(), resolve=True, enum_to_str=True)   # data, as a run saves it
    path = CheckpointManager(tmp_path / "checkpoints").save({"config": config}, 1)
    line = one_error_line(diffrun(tmp_path, f"ckpt={path}", "eval.num_samples=abc", module="diffrun.launching.eval_cli"))
    assert line.count("\n") == 0 and "eval.num_samples" in line and "'abc'" in line, line


@pytest.mark.slow
def test_a_job_refused_where_it_runs_leaves_nothing(tmp_path):
    """With a launcher that runs jobs elsewhere, this machine's devices are not checked before launch: the job
    checks its own, fails in one line, and removes the folder Hydra made for it."""
    sweep = tmp_path / "sweep"
    proc = diffrun(tmp_path, "-m", *FAST, f"hydra.sweep.dir={sweep}", "hydra/launcher=local", "device=cuda:99")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out and "device='cuda:99'" in out, out
    assert sorted(p.name for p in sweep.iterdir()) == [".submitit", "multirun.yaml"]
