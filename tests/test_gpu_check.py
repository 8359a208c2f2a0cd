"""scripts/gpu_check.sh --cpu: the GPU run's script end to end on this CPU with tiny sizes, the install from the carried
wheels (prepared by scripts/gpu_wheels.sh when .whl/ has none) included, so that a lent GPU's minutes are not spent
on an ImportError or a typo. Every stage must exit 0 and leave its files in the one archive."""
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["install", "cuda_tier", "main", "resume", "bench_ddpm_b128", "bench_ddpm_b512", "bench_edm_b128",
          "bench_edm_b512", "bench_ddpm_b128_capture"]
OPTIONAL = ["bench_edm_b128_capture", "bench_ddpm_b512_capture"]   # only when the budget still holds their limit


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BUDGET_S": "3000"}   # stages are cut to end within the test's timeout
    env.pop("PYTHONPATH", None)                        # the script sets its own: the checkout and the wheels
    subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=REPO, env=env, check=True, timeout=3500,
                   capture_output=True, text=True)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]   # ≤ 8 files come back
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert f"\n{stage}: exit 0 in " in f"\n{summary}", summary
    for stage in OPTIONAL:
        assert f"\n{stage}: exit 0 in " in f"\n{summary}" or f"\n{stage}: skipped (needs " in f"\n{summary}", summary
    assert "resume: stopped at" in summary and "weights identical True: MET" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = set(archive.getnames())
    assert {f"results/{stage}.log" for stage in STAGES} <= names
    assert {"results/resume.json", "results/status.json", "results/bench_edm_b128.json", "results/cuda_tier.xml"} <= names
