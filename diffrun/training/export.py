"""Shareable weights: a checkpoint's EMA network as `.safetensors`, the format model hubs expect.

    diffrun-export RUN/checkpoints/ckpt_00200000.pt [-o model.safetensors]

The file holds the EMA denoiser's tensors (the keys of its `state_dict`) and, as safetensors metadata (strings):

    format          "diffrun-ema-1"
    config          the run's resolved config, YAML (what `diffrun-eval` composes from; its `_target_`s are
                    limited to diffrun's as for any config read from a file, diffrun/targets.py)
    model           the `model` node of it, YAML
    step, images_seen, fingerprint      the checkpoint's
    git_commit, git_dirty               from the run's provenance.json, when it is there
    fid, fid_protocol                   the run's FID at that step (metrics.jsonl), when it was measured
    checkpoint_sha256                   of the checkpoint file it came from

Reading it (`read`) builds no object and runs no code. `diffrun-eval ckpt=model.safetensors` evaluates it, and
`+model.init_from=model.safetensors` starts a training run from its weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

from diffrun.errors import CheckpointError, ConfigError
from diffrun.files import atomic_write
from diffrun.run_folder.metrics import read_metrics
from diffrun.training import checkpoint as ckpt

FORMAT = "diffrun-ema-1"
SUFFIX = ".safetensors"


def metadata_of(state: dict, source: Path) -> dict[str, str]:
    """The metadata (module docstring) of the checkpoint `state` read from `source`."""
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    meta = {
        "format": FORMAT,
        "config": yaml.safe_dump(state["config"], sort_keys=False),
        "model": yaml.safe_dump(state["config"].get("model"), sort_keys=False),
        "step": str(state["step"]),
        "images_seen": str(state.get("images_seen", "")),
        "fingerprint": str(state.get("fingerprint", "")),
        "checkpoint_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    try:
        provenance = json.loads((run_dir / "provenance.json").read_text())
        meta.update(git_commit=str(provenance.get("git_commit")), git_dirty=str(provenance.get("git_dirty")))
    except (OSError, ValueError, AttributeError):
        pass

    measured = [r for r in read_metrics(run_dir)
                if r.get("step") == state["step"] and isinstance(r.get("fid"), (int, float))]
    if measured:
        meta.update(fid=repr(float(measured[-1]["fid"])), fid_protocol=str(measured[-1].get("fid_protocol", "")))
    return meta


def export(source: Path, out: Path | None = None, allow_unverified: bool = False) -> Path:
    """Write the EMA network of checkpoint `source` as safetensors (default: beside it, `<name>.safetensors`)."""
    from safetensors.torch import save

    source = Path(source)
    state = ckpt.load(source, allow_unverified)
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("ema"), dict):
        raise CheckpointError(f"{source} is not a diffrun training checkpoint (no config or EMA weights)")
    tensors = {key: value.contiguous() for key, value in state["ema"]["model"].items()}
    out = Path(out) if out is not None else source.with_suffix(SUFFIX)
    atomic_write(out, save(tensors, metadata=metadata_of(state, source)))
    return out


def read(path: str | Path, key: str = "ckpt") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(EMA weights, metadata) of an export. Raises ConfigError naming `key` for a file that is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot be read ({exc.strerror or exc})") from None
    except SafetensorError as exc:
        raise ConfigError(f"{key}={path}: not a safetensors file ({exc}); allowed a file written by diffrun-export") from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"{key}={path}: a safetensors file without diffrun's metadata (format={metadata.get('format')!r}); "
                          f"allowed a file written by diffrun-export")
    return tensors, metadata


def as_state(path: str | Path, key: str = "ckpt") -> dict:
    """An export as the parts of a checkpoint state diffrun-eval reads: config, step, images_seen, EMA weights."""
    tensors, metadata = read(path, key)
    config = yaml.safe_load(metadata["config"])
    return {"config": config, "step": int(metadata["step"]), "images_seen": int(metadata.get("images_seen") or 0),
            "ema": {"model": tensors}, "export": metadata}


def load_into(module: torch.nn.Module, path: str | Path, key: str = "model.init_from") -> None:
    """Copy an export's weights into `module` (the denoiser); ConfigError naming `key` when they do not fit."""
    tensors, _ = read(path, key)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}")
        raise ConfigError(f"{key}={path}: its weights do not fit this model ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, {len(wrong)} of another shape; {first}); allowed an export of the same model")
    module.load_state_dict(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffrun-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a diffrun checkpoint, e.g. RUN/checkpoints/ckpt_00200000.pt")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: beside it, <name>.safetensors)")
    parser.add_argument("--allow-unverified", action="store_true", help="a checkpoint without diffrun's SHA-256")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.output, args.allow_unverified))
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"diffrun-export: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
