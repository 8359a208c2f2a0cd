"""diffrun: train diffusion models under different loss-weighting and timestep-sampling strategies."""
import os
from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config folder: $DIFFRUN_CONF, else the package's `conf` (a link to the repository's conf/
    in a checkout, the packaged copy in an installed wheel)."""
    return Path(os.environ.get("DIFFRUN_CONF") or Path(__file__).resolve().parent / "conf").resolve()
