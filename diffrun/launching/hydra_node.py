"""What a diffrun Hydra app registers (`register_app`): the schema (diffrun/config.py) and the resolvers
conf/ uses: `${diffrun.kimg_to_steps:...}`, `${diffrun.seed_parity:...}` and `${diffrun.run_name:...}` in
the run's keys, and these in the `hydra:` node:

`${diffrun.hydra_output_subdir:}`: `.hydra` on rank 0, None (Hydra writes nothing) on the other torchrun/srun
ranks, which would otherwise all write the same files into the same run directory at once.

`${diffrun.app:KEY}`: an app key (`name`, `sweep_name`, `seed`, ...) inside a Hydra setting, such as the run
directory. A plain `${name}` works while running, but `diffrun --cfg hydra --resolve` prints the hydra node
alone, without the app's keys, and fails on it; this one then reads the key through `HydraConfig`, whose
hydra node keeps the whole composed config as its parent.

`${diffrun.help_options:GROUP}`: `diffrun --help` lists every option of a config group on one line, from
the header comment of its yaml file (a new preset shows up without editing the help), and marks the one
this composition chose with `*`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from diffrun import conf_dir
from diffrun.config import RunConfig, kimg_to_steps, seed_parity
from diffrun.distributed import env_info
from diffrun.fingerprint import name_suffix

# Launchers that come with Hydra and its submitit plugin rather than with conf/hydra/launcher/.
BUILT_IN = {"hydra/launcher": {"basic": "Hydra's default: the jobs of a sweep one after another, in this process"}}


_ABSENT = object()


def app_value(key: str, *, _root_: DictConfig):
    """`${diffrun.app:KEY}`: KEY of the composed config, also when the hydra node is printed alone."""
    value = OmegaConf.select(_root_, key, default=_ABSENT)
    if value is not _ABSENT:
        return value
    from hydra.core.hydra_config import HydraConfig

    return OmegaConf.select(HydraConfig.get(), f"..{key}")


def hydra_output_subdir() -> str | None:
    return ".hydra" if env_info().rank == 0 else None


def run_name(base: str, *, _root_: DictConfig) -> str:
    """`name`'s default: `base`, plus `_<6 hex>` of the run fingerprint when the command line changed something
    `base` does not say (diffrun.fingerprint.name_suffix), so that different runs get different directories."""
    return base + name_suffix(_root_)


def register_app() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    for name, resolver in (("kimg_to_steps", kimg_to_steps), ("seed_parity", seed_parity), ("run_name", run_name),
                           ("hydra_output_subdir", hydra_output_subdir), ("app", app_value),
                           ("help_options", help_options)):
        OmegaConf.register_new_resolver(f"diffrun.{name}", resolver, replace=True)


def header_line(path: Path) -> str:
    """The first line of the file's leading comment block (after `# @package ...`), without the `#`."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text.rstrip(":,")
    return ""


def short(text: str) -> str:
    """`Method — Authors, "Title ...", venue` → `Method — Authors`: the paper's title rarely fits on the line."""
    method, dash, rest = text.partition(" — ")
    if dash and '"' in rest:
        return f"{method} — {rest.split(chr(34))[0].rstrip(', ')}"
    return text


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)].rstrip() + "…"


def option_lines(group: str, chosen: str | None = None, root: Path | None = None, width: int | None = None) -> str:
    """One line per option of `group`: name (`*` when chosen), then its header line, cut to the terminal width."""
    folder = (root or conf_dir()) / group
    options = {**BUILT_IN.get(group, {}), **{path.stem: header_line(path) for path in sorted(folder.glob("*.yaml"))}}
    width = width or max(80, shutil.get_terminal_size((120, 24)).columns)
    name_width = max((len(name) for name in options), default=0) + 2
    lines = []
    for name, text in options.items():
        mark = "*" if name == chosen else " "
        lines.append(fit(f"    {mark} {name:<{name_width}}{short(text)}".rstrip(), width))
    return "\n".join(lines).replace("$", "$$")   # the help template is a string.Template


def help_options(group: str, *, _root_: DictConfig) -> str:
    """`${diffrun.help_options:<group>}` in the help template."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) or {}
    chosen = choices.get(group)
    return option_lines(group, None if chosen is None else str(chosen))
