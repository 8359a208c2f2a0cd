"""Which W&B mode a run logs in, and why (docs/wandb.md): `wandb.mode`, else `$WANDB_MODE`, else online when
credentials are found without asking, else disabled. W&B's own environment variables that W&B would refuse
(empty, or an unknown mode) count as unset."""
from __future__ import annotations

import logging
import os

from diffrun.config import option
from diffrun.errors import ConfigError

log = logging.getLogger(__name__)

ENV_MODES = ("online", "offline", "disabled", "dryrun", "run")   # $WANDB_MODE values diffrun reads


def env_mode() -> str | None:
    """$WANDB_MODE when it is one of ENV_MODES; an empty or unknown value counts as unset (`unusable_environment`
    says so)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ENV_MODES else None


def credentials_source() -> str | None:
    """Where W&B will find an API key without asking: `WANDB_API_KEY`, else the netrc entry `wandb login` writes
    for `$WANDB_BASE_URL` (read with W&B's own reader, no network); None when neither has one."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
        from wandb.sdk.lib.wbauth.wbnetrc import _get_netrc_file_path

        host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if read_netrc_auth(host=host):
            return f"{_get_netrc_file_path()} (wandb login)"
    except Exception as exc:  # noqa: BLE001 - no wandb, an unreadable or malformed netrc: no credentials
        log.debug("no W&B credentials from netrc: %s", exc)
    return None


def mode_reason(cfg_mode) -> str:
    """Why `resolve_mode` picks its mode, for the run's log: 'W&B online (credentials from ~/.netrc ...)'."""
    if cfg_mode is not None:
        return f"W&B {resolve_mode(cfg_mode)} (wandb.mode={option(cfg_mode)})"
    if env_mode():
        return f"W&B {resolve_mode(None)} ($WANDB_MODE={os.environ['WANDB_MODE']})"
    source = credentials_source()
    if source:
        return f"W&B online (wandb.mode unset; credentials from {source})"
    return ("W&B off (wandb.mode unset, no $WANDB_MODE, no credentials: set WANDB_API_KEY or run `wandb login` to "
            "log online, or wandb.mode=offline to log for `wandb sync` later)")


def resolve_mode(cfg_mode) -> str:
    """online | offline | disabled: the config, else $WANDB_MODE (`env_mode`), else online iff credentials are
    found."""
    if cfg_mode is None:
        cfg_mode = env_mode() or ("online" if credentials_source() else "disabled")
    mode = option(cfg_mode)
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={mode!r} (or $WANDB_MODE): allowed online, offline, disabled")
    return mode


def unusable_environment() -> dict[str, str]:
    """W&B's environment variables that W&B would refuse, stopping even an offline run: empty ones
    (`export WANDB_MODE=`), and a $WANDB_MODE it does not know. diffrun treats them as unset."""
    bad = {key: value for key, value in os.environ.items() if key.startswith("WANDB_") and not value.strip()}
    mode = os.environ.get("WANDB_MODE", "")
    if mode.strip() and mode.strip().lower() not in ENV_MODES:
        bad["WANDB_MODE"] = mode
    return bad


