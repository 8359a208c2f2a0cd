#!/usr/bin/env bash
# The first GPU run, sized for one lent H100 (15 minutes of device time in all, 10 per call): about 7 minutes, never
# more than BUDGET_S (510 s) of stages, so that a call with timeout_s=560 ends on its own. Issue 27's targets and
# what each stage measures: docs/performance.md, "first GPU run".
#
#   bash scripts/gpu_wheels.sh                       # here, once: the wheels and Inception weights, into .whl/
#   OUT=/tmp/gc bash scripts/gpu_check.sh            # on the GPU machine (the device tool: carry .whl)
#   OUT=/tmp/gc bash scripts/gpu_check.sh --cpu      # dry run of the same stages on this CPU, tiny sizes
#   ONLY="main resume" bash scripts/gpu_check.sh     # a rerun of some stages (names as in summary.txt)
#
# Everything lands in $OUT as two files, rewritten after each stage: summary.txt (one line per stage, then the
# numbers against the targets) and gpu_check.tar.gz (every stage's log, JSON and metrics). A stage that does not fit
# in what is left of the budget is skipped and says so; a stage that fails does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/diffrun-gpu-check}
ONLY=${ONLY:-}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
RES=$WORK/results
SITE=$WORK/site
mkdir -p "$RES" "$WORK/runs" "$WORK/cache"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT    # KEEP=1: leave the runs and checkpoints in $WORK
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONPATH="$REPO:$SITE" WANDB_MODE=disabled PYTHONUNBUFFERED=1 DIFFRUN_CACHE=$WORK/cache
export MODE REPO WORK RES SITE
if [ "$MODE" = gpu ]; then
  BUDGET_S=${BUDGET_S:-510}
  SCALE=1
  XDIST=(-n 4)                       # 16 cores, one GPU: compiling tests overlap with the short ones
  DEVICE=cuda
else
  BUDGET_S=${BUDGET_S:-3000}         # a shared 2-core CPU; the sizes below are what makes it short
  SCALE=20                           # each stage's limit: twenty times the GPU's (a busy shared CPU)
  XDIST=(-n 0)                       # one process here (pyproject sets -n 2 for the fast tier)
  DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export DEVICE
START=$SECONDS

archive() {
  tar -czf "$OUT/gpu_check.tar.gz.part" -C "$WORK" results && mv "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
}

# stage NAME LIMIT_S COMMAND...: runs COMMAND (output to results/NAME.log) within LIMIT_S and what is left of
# the budget, records the exit status and the seconds, and rewrites the archive.
stage() {
  local name=$1 limit=$2 left rc t0
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  left=$((BUDGET_S - (SECONDS - START)))
  if [ -n "${WHOLE:-}" ] && [ "$left" -lt $((limit * SCALE)) ]; then   # a stage that is only worth its full limit
    echo "$name: skipped (needs $((limit * SCALE)) s, ${left} s of the ${BUDGET_S} s budget left)" | tee -a "$SUMMARY"
    return 0
  fi
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (${left} s of the ${BUDGET_S} s budget left)" | tee -a "$SUMMARY"
    return 0
  fi
  limit=$((limit * SCALE))
  [ "$left" -lt "$limit" ] && limit=$left
  t0=$SECONDS
  declare -F "$1" > /dev/null && set -- bash -c '"$@"' _ "$@"   # a function of this script (exported below)
  timeout --kill-after=5 "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)$([ $rc -eq 124 ] && echo ', TIMED OUT')" \
    | tee -a "$SUMMARY"
  archive
  return 0
}

# --- 0. dependencies from the carried wheels, the Inception weights, the environment ---------------------------
if [ "$MODE" = cpu ] && ! ls .whl/*.whl > /dev/null 2>&1; then
  stage wheels 300 bash scripts/gpu_wheels.sh .whl
fi
install_deps() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || return 1
  if [ -f .whl/inception-headless-fp16.pt ]; then   # back to float32, where resolve_inception_weights looks
    python3 -c "import sys, torch; s = torch.load(sys.argv[1], weights_only=True); \
torch.save({k: v.float() if v.is_floating_point() else v for k, v in s.items()}, sys.argv[2])" \
      .whl/inception-headless-fp16.pt "$DIFFRUN_CACHE/inception-2015-12-05-fid-helper-headless.pth" || return 1
  fi
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  python3 -c "import diffrun.cli, diffrun.evaluation.fid, diffrun.sampling, hydra, omegaconf, torch_fidelity, \
diffusers, submitit, hydra_plugins.hydra_submitit_launcher; print('imports ok')"
  git -C "$REPO" rev-parse HEAD 2>/dev/null || true
}
export -f install_deps
stage install 45 install_deps

# --- 1. the CUDA tier (on the CPU: collected and skipped) -----------------------------------------------------
stage cuda_tier 125 python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_capture.py -p no:cacheprovider \
  --timeout=90 "${XDIST[@]}" -rs --junitxml="$RES/cuda_tier.xml"

# --- 2. the main job -------------------------------------------------------------------------------------------
main_job() {
  local sizes=()
  [ "$MODE" = cpu ] && sizes=(model=unet_tiny train.steps=20 train.batch_size=8 eval.num_samples=20
                              eval.num_reference=40 eval.kid_subset_size=20 eval.steps=4 sample.num_images=4)
  (cd "$WORK/runs" && python3 -m diffrun.cli device=$DEVICE name=main train.progress=false "${sizes[@]}") || return 1
  cp "$WORK/runs/outputs/runs/main/"{metrics.jsonl,status.json,config.yaml} "$RES/" 2>/dev/null
  python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print({k: s.get(k) for k in \
('state', 'step', 'fid', 'kid_mean', 'fid_protocol', 'fid_skipped')})" "$RES/status.json"
}
export -f main_job
stage main 55 main_job

# --- 3. bf16, SIGTERM half-way, resume: compared step by step with the uninterrupted run -------------------------
if [ "$MODE" = gpu ]; then RESUME=(train.steps=300); else RESUME=(model=unet_tiny train.steps=16 train.batch_size=8); fi
stage resume 50 python3 scripts/resume_check.py --workdir "$WORK/resume" --json "$RES/resume.json" -- \
  device=$DEVICE precision=bf16 eval.enabled=false sample.num_images=0 checkpoint.every_steps=0 train.progress=false \
  "${RESUME[@]}"

# --- 4. training throughput (bf16): images/s, MFU, peak memory, peer ratio, strategies vs uniform; FID speed -------
STRATEGIES_DDPM=uniform,min_snr,p2,importance,adaptive_timestep
STRATEGIES_EDM=uniform,min_snr,edm,lognormal,adaptive_timestep
if [ "$MODE" = gpu ]; then
  DDPM=(--model ddpm_cifar10); EDM=(--model edm_ddpmpp_cifar10); B128=128; B512=512
  TIMING=(--warmup 10 --windows 4 --steps-per-window 10)   # 40 timed steps: one adaptive_timestep update (every 40)
  FIDSIZES=()
else   # stand-ins: the tiny U-Net for both models, tiny batches
  DDPM=(--model unet_tiny); EDM=(--model unet_tiny); B128=8; B512=16
  TIMING=(--warmup 1 --windows 2 --steps-per-window 2 --num-images 64)
  FIDSIZES=(--sample-batch 4 --sample-steps 3 --inception-batch 2)   # after --sample-steps: overrides it
fi
bench() { python3 scripts/bench_train.py --precision bf16 --device "$DEVICE" "$@"; }
export -f bench
stage bench_ddpm_b128 50 bench "${DDPM[@]}" --batch $B128 "${TIMING[@]}" --strategies $STRATEGIES_DDPM \
  --sampler ddim --sample-steps 50 "${FIDSIZES[@]}" --json "$RES/bench_ddpm_b128.json"
stage bench_ddpm_b512 30 bench "${DDPM[@]}" --batch $B512 "${TIMING[@]}" --strategies uniform --no-fid \
  --json "$RES/bench_ddpm_b512.json"
stage bench_edm_b128 45 bench "${EDM[@]}" --batch $B128 "${TIMING[@]}" --strategies $STRATEGIES_EDM --no-peer \
  --sampler heun --sample-steps 18 "${FIDSIZES[@]}" --json "$RES/bench_edm_b128.json"
stage bench_edm_b512 30 bench "${EDM[@]}" --batch $B512 "${TIMING[@]}" --strategies uniform --no-peer --no-fid \
  --json "$RES/bench_edm_b512.json"
stage bench_ddpm_b128_capture 70 bench "${DDPM[@]}" --batch $B128 "${TIMING[@]}" --capture --strategies uniform \
  --no-fid --json "$RES/bench_ddpm_b128_capture.json"
# only when the budget still has their whole limit (each compiles for about a minute on a GPU)
WHOLE=1 stage bench_edm_b128_capture 70 bench "${EDM[@]}" --batch $B128 "${TIMING[@]}" --capture --strategies uniform \
  --no-peer --no-fid --json "$RES/bench_edm_b128_capture.json"
WHOLE=1 stage bench_ddpm_b512_capture 70 bench "${DDPM[@]}" --batch $B512 "${TIMING[@]}" --capture --strategies uniform \
  --no-fid --json "$RES/bench_ddpm_b512_capture.json"

# --- 5. the numbers against issue 27's targets ---------------------------------------------------------------
python3 - "$RES" "$MODE" >> "$SUMMARY" 2>&1 <<'EOF'
import json
import sys
from pathlib import Path

res = Path(sys.argv[1])


def load(name):
    path = res / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value, digits=1, unit=""):
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


print(f"--- numbers ({res}/*.json in gpu_check.tar.gz)")
if sys.argv[2] == "cpu":
    print("(a dry run on a CPU: stand-in models and sizes; the verdicts below say nothing about a GPU)")
resume = load("resume")
if resume:
    same = resume["weights_identical"] and resume["max_loss_diff"] == 0
    print(f"resume: stopped at {resume['stopped_at']} of {resume['steps']}, {resume['steps_compared']} steps compared, "
          f"max |Δloss| {resume['max_loss_diff']}, weights identical {resume['weights_identical']}: "
          f"{'MET' if same and resume['stopped_at'] else 'NOT MET'}")
for name in ("bench_ddpm_b128", "bench_ddpm_b512", "bench_edm_b128", "bench_edm_b512", "bench_ddpm_b128_capture",
             "bench_edm_b128_capture", "bench_ddpm_b512_capture"):
    result = load(name)
    if result is None:
        print(f"{name}: no result")
        continue
    meta, train = result["meta"], result["train"]
    ours, peer = train["diffrun"], train["peer"]
    line = (f"{name}: {meta['model']} b{meta['batch']} {meta['autocast_dtype']} on {meta['device_name']}, torch "
            f"{meta['torch']}: {fmt(ours['images_per_s'])} img/s, MFU {fmt(ours['mfu'] and 100 * ours['mfu'], 1, '%')}, "
            f"peak {fmt(ours['peak_mem_bytes'] and ours['peak_mem_bytes'] / 2**30, 2, ' GiB')}")
    if peer:
        speedup = ours.get("speedup_vs_peer")
        line += f", {fmt(speedup, 2, 'x')} the peer loop ({fmt(peer['images_per_s'])} img/s)"
        if meta["batch"] == 128:
            line += f" [target >= 1.5x: {'MET' if speedup and speedup >= 1.5 else 'NOT MET'}]"
    if meta["batch"] == 512 and ours["mfu"] is not None:
        line += f" [target MFU >= 40%: {'MET' if ours['mfu'] >= 0.40 else 'NOT MET'}]"
    print(line)
    for row in result["strategies"]:
        if row["name"] == "uniform":
            continue
        limit = 1.20 if row["name"] == "adaptive_timestep" else 1.02
        ratio = row["ratio_to_uniform"]
        verdict = "error: " + str(row.get("error"))[:80] if ratio is None else ("MET" if ratio <= limit else "NOT MET")
        print(f"    {row['name']}: {fmt(ratio, 3, 'x')} uniform's step [target <= {limit}x: {verdict}]")
    fid = result.get("fid")
    if fid:
        sampler, inception = fid["sampler"], fid["inception"]
        s, i = sampler["images_per_s"], inception["images_per_s"]
        print(f"    FID speed: {sampler['stage']} {fmt(s)} img/s; Inception {fmt(i)} img/s ({inception['notes'][:60]})")
        if s and i:
            for n in (10_000, 50_000):
                total = n / s + n / i
                target = " [target 50k + FID <= 180 s: " + ("MET" if total <= 180 else "NOT MET") + "]" if n == 50_000 else ""
                print(f"    FID-{n // 1000}k estimate from these rates: {n / s:.0f} s sampling + {n / i:.0f} s Inception "
                      f"= {total:.0f} s{target}")
EOF
echo "total: $((SECONDS - START)) s of the ${BUDGET_S} s budget ($MODE)" | tee -a "$SUMMARY"
archive
cat "$SUMMARY"
