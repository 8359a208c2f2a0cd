#!/usr/bin/env bash
# One GPU, a few minutes: the CUDA test tier and the training/FID benchmark, everything written to $OUT.
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
# Expects torch with CUDA installed and the project importable (pip install -e ".[test]", or PYTHONPATH=$PWD with
# the dependencies present). Each part has its own time limit so that one hang cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/diffrun-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1

echo "== CUDA test tier (pytest -m cuda), with train.capture=compile under CUDA graphs"
timeout 300 python -m pytest -q -m cuda tests/test_cuda.py tests/test_capture.py -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
echo "cuda tests exit code $?" | tee -a "$OUT/cuda_tests.txt"

echo "== host overhead per step: eager (every strategy), then the captured step (uniform: compiling takes minutes)"
timeout 240 python scripts/bench_train.py --overhead --model ddpm_cifar10 --batch 128 --precision bf16 \
  --warmup 5 --overhead-steps 30 --json "$OUT/overhead_eager.json" > "$OUT/overhead_eager.txt" 2>&1
echo "overhead eager exit code $?" | tee -a "$OUT/bench_summary.txt"
timeout 300 python scripts/bench_train.py --overhead --capture --model ddpm_cifar10 --batch 128 --precision bf16 \
  --warmup 5 --overhead-steps 30 --strategies uniform --json "$OUT/overhead_capture.json" \
  > "$OUT/overhead_capture.txt" 2>&1
echo "overhead capture exit code $?" | tee -a "$OUT/bench_summary.txt"

echo "== training benchmark: ddpm_cifar10, bf16, batch 128 and 512, compile off and on, then the captured step"
for batch in 128 512; do
  for compile in off on; do
    flag=$([ "$compile" = on ] && echo --compile || echo "")
    timeout 150 python scripts/bench_train.py --model ddpm_cifar10 --batch "$batch" --precision bf16 $flag \
      --strategies all --json "$OUT/bench_b${batch}_compile_${compile}.json" \
      > "$OUT/bench_b${batch}_compile_${compile}.txt" 2>&1
    echo "bench batch $batch compile $compile exit code $?" | tee -a "$OUT/bench_summary.txt"
  done
done
timeout 300 python scripts/bench_train.py --model ddpm_cifar10 --batch 128 --precision bf16 --capture --no-peer \
  --no-fid --strategies uniform --json "$OUT/bench_b128_capture.json" > "$OUT/bench_b128_capture.txt" 2>&1
echo "bench batch 128 capture exit code $?" | tee -a "$OUT/bench_summary.txt"
echo "done: $OUT"
