"""`diffrun-eval ckpt=PATH [key=value ...]`: FID/KID of an existing checkpoint's EMA model.

The run's own config travels inside the checkpoint; `key=value` overrides change it (typically
`eval.num_samples=50000 eval.steps=100`, or `dataset.loader.root=...` on another machine).
Results go to `<run>/eval/fid_step<step>_<samples>.json` and are printed as JSON.

    diffrun-eval ckpt=outputs/runs/cifar10_ddpm_cifar10_min_snr_seed0/checkpoints/ckpt_00200000.pt \
                 eval.num_samples=50000
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffrun.errors import ConfigError, DiffrunError

log = logging.getLogger("diffrun.eval")


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    ckpt, overrides = None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if arg.startswith("ckpt="):
            ckpt = Path(arg.split("=", 1)[1]).expanduser()
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise DiffrunError(f"unexpected argument {arg!r}: use ckpt=PATH and key=value overrides")
    if ckpt is None:
        raise DiffrunError("missing ckpt=PATH (a checkpoint written by diffrun, e.g. <run>/checkpoints/ckpt_*.pt)")
    return ckpt, overrides


def evaluate_checkpoint(ckpt: Path, overrides: list[str] = ()) -> dict:
    from diffrun.config import RunConfig
    from diffrun.evaluation.callback import evaluate
    from diffrun.training import checkpoint
    from diffrun.training.trainer import Trainer

    if not ckpt.is_file():
        raise DiffrunError(f"ckpt={ckpt}: no such file")
    state = checkpoint.load(ckpt)
    if "config" not in state:
        raise DiffrunError(f"{ckpt} has no embedded config: was it written by diffrun?")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), state["config"], OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:  # a wrong type or an unknown key: one line naming it, no traceback
        key = getattr(exc, "full_key", None) or "override"
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    trainer = Trainer(cfg, run_dir, callbacks=[], lock=False)
    trainer.state.load_state_dict(state)
    record = evaluate(trainer, cfg.eval)
    out = run_dir / "eval" / f"fid_step{record['step']}_{record['fid_num_samples']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "checkpoint": str(ckpt)}, indent=2))
    return {**record, "written": str(out)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        ckpt, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate_checkpoint(ckpt, overrides)
    except DiffrunError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
