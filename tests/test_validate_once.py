"""A config is validated once per process entry (docs/architecture.md): a single run before Hydra makes its
folder, each job of a local multirun before the first starts, and never again inside the run."""
import subprocess
import sys

import pytest

from conftest import FAST

# Counts diffrun.validation.validate in the diffrun process: patched before any module binds it by name.
COUNTED = """
import atexit, sys
import diffrun.validation as validation
calls = []
original = validation.validate
def counted(cfg, environment=True):
    calls.append(environment)
    return original(cfg, environment)
validation.validate = counted
atexit.register(lambda: print(f"VALIDATIONS {calls}"))
from diffrun.cli import main
sys.argv = ["diffrun", *sys.argv[1:]]
main()
"""


def run_counted(tmp_path, *args: str) -> list[bool]:
    proc = subprocess.run([sys.executable, "-c", COUNTED, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("VALIDATIONS ")]
    return eval(line.removeprefix("VALIDATIONS "))      # noqa: S307 - a list of bools printed by COUNTED


def test_a_single_run_is_validated_once(tmp_path):
    calls = run_counted(tmp_path, *FAST, "sample.num_images=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert calls == [True]                    # with this machine's environment, before the folder existed
    assert (tmp_path / "run" / "status.json").exists()


@pytest.mark.parametrize("seeds", ["0,1"])
def test_each_job_of_a_multirun_is_validated_once(tmp_path, seeds):
    calls = run_counted(tmp_path, "-m", *FAST, "sample.num_images=0", f"seed={seeds}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert calls == [True, True]              # by the preflight, for both jobs; the jobs do not check again
    assert len(list((tmp_path / "sweep").glob("*/status.json"))) == 2
