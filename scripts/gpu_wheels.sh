#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a lent GPU machine, prepared here (that machine reaches no package
# registry). It has Python 3.12 with torch 2.11, numpy, scipy, scikit-learn, matplotlib, pillow, tqdm, pyyaml,
# huggingface-hub, safetensors, pytest, pytest-timeout and pytest-xdist (docs/performance.md, "first GPU run");
# these are the rest of what `import diffrun` and the CUDA tier need, pinned to the versions tested here.
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored, under 20 MB), then carry .whl to the machine
#   bash scripts/gpu_wheels.sh DIR        # elsewhere
# Not carried: torch (preinstalled; never replace it), wandb (imported only when wandb.mode is not disabled).
# Also written: inception-headless-fp16.pt, the TF-Inception weights of this machine's cache rounded to fp16 (43 MB
# instead of 87: the whole carried tree must stay under 64 MiB). gpu_check.sh restores float32 from it, so FID runs
# on the GPU; its FIDs differ from full-precision ones in the last digits (a transport, not a protocol).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PACKAGES=(hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4 torch-fidelity==0.4.0
          diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
# omegaconf and hydra pin antlr4-python3-runtime 4.9.*, published as a source archive only: built into a
# pure-Python wheel here (py3-none-any, so it installs on 3.12 too)
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3

"$PYTHON" - "$DEST" <<'EOF'
import sys
from pathlib import Path

import torch

from diffrun.evaluation.inception import InceptionWeightsUnavailable, resolve_inception_weights

dest = Path(sys.argv[1]) / "inception-headless-fp16.pt"
try:
    weights = resolve_inception_weights(download=False)
except InceptionWeightsUnavailable as exc:
    print(f"no Inception weights here, none carried (FID will be skipped on the GPU): {str(exc).splitlines()[0]}")
    sys.exit(0)
state = torch.load(weights.path, map_location="cpu", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dest)
print(f"{dest}: {weights.path.name} ({weights.source}) in fp16")
EOF
ls -la "$DEST"
du -sh "$DEST"
