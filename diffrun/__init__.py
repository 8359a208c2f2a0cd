"""diffrun: train diffusion models under different loss-weighting and timestep-sampling strategies."""
import os
from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config folder: $DIFFRUN_CONF, else the package's `conf` (a link to the repository's conf/
    in a checkout, the packaged copy in an installed wheel), else the checkout's conf/ itself (where the
    link did not survive, e.g. a Windows clone without symlink support, which leaves a small text file)."""
    if os.environ.get("DIFFRUN_CONF"):
        return Path(os.environ["DIFFRUN_CONF"]).resolve()
    package = Path(__file__).resolve().parent
    return next((p for p in (package / "conf", package.parent / "conf") if p.is_dir()), package / "conf").resolve()
