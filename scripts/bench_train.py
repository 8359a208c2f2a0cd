#!/usr/bin/env python
"""Training and FID-evaluation throughput of diffrun, measured against a peer loop in the same run.

    python scripts/bench_train.py                               # whatever device is here; CPU: < 60 s
    python scripts/bench_train.py --model ddpm_cifar10 --batch 128 --precision bf16 \
        --compile --channels-last --json docs/bench_h100.json   # the GPU measurement (docs/performance.md)
    python scripts/bench_train.py --overhead                    # host work per step outside the network, every
                                                                # strategy against a bare loop (CPU: 3-6 min)
    python scripts/bench_train.py --capture ...                 # the same with train.capture=compile

What is measured, all in one process on one device (docs/performance.md says why each choice):
  * diffrun: `diffrun.training.step.train_step` of a Trainer composed from the real Hydra config (dataset=cifar10 with
    its loader replaced by synthetic CIFAR-shaped uint8 images held in memory), images/s = batch / median
    window step time after warm-up. Windows are bracketed by CUDA events on GPU, perf_counter on CPU.
  * FLOPs: one forward+backward of the eager denoiser under `FlopCounterMode` (SDPA forced to the math
    kernel so attention is counted on every device); MFU = FLOPs/image × images/s ÷ dense bf16 peak.
  * strategies: every conf/weighting/*.yaml built and bound exactly as the Trainer does it and swapped
    into the same Trainer (same model, optimizer, batch, compiled graph); step time ÷ uniform's.
  * peer: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py written
    out with diffrun's own U-Net (`PeerLoop`), same batch and autocast precision.
  * FID evaluation: DDIM sampling with the EMA model (samples/s and network evaluations/s) and
    Inception-v3 feature extraction (torch-fidelity's extractor, weights from
    `diffrun.evaluation.inception.resolve_inception_weights`).
Strategy and peer windows are interleaved round-robin, so drift in a shared machine's load hits all
of them alike. Ratios use the amortised step time (all timed steps), which counts periodic work
(e.g. adaptive_timestep's KL probes every `update_every` steps); images/s uses the median window.
Each strategy's state is compared before and after: the table says which state tensors moved.

--overhead measures the host work of a step apart from the network (`NetworkWindows`: hooks mark the
network's forward and backward): ATen operators dispatched per step inside and outside the network
(`OpCounter`, a TorchDispatchMode), host reads (`_local_scalar_dense`: a sync on a GPU) and host
milliseconds outside the network (thread CPU time on CPU), for every strategy and for `BareLoop`.

This file is the command line; the parts are in scripts/bench/: throughput.py (the default run), overhead.py
(--overhead), compose.py (the Trainer and strategies), peer.py, fid.py, measure.py (clocks, memory, FLOPs) and
report.py (the tables).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from bench import overhead, throughput             # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ddpm_cifar10", "edm_ddpmpp_cifar10", "unet_small", "unet_tiny"], default=None,
                   help="conf/model (default: ddpm_cifar10 on CUDA, unet_tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 128 CUDA, 8 CPU)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile of the denoiser)")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per loop (default: 20 CUDA, 2 CPU)")
    p.add_argument("--windows", type=int, default=None, help="timed windows per loop (default: 5 CUDA, 3 CPU)")
    p.add_argument("--steps-per-window", type=int, default=None, help="steps per window (default: 20 CUDA, 3 CPU)")
    p.add_argument("--strategies", default="all", help="'all' (every conf/weighting/*.yaml) or a comma list")
    p.add_argument("--num-images", type=int, default=None, help="synthetic images (default: 50000 CUDA, 512 CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip the diffusers-style peer loop")
    p.add_argument("--peer-compile", action="store_true",
                   help="also torch.compile (and channels_last, if set) the peer; default: the example as written")
    p.add_argument("--peer-workers", type=int, default=0, help="peer DataLoader num_workers (the example's default: 0)")
    p.add_argument("--no-fid", action="store_true", help="skip sampler and Inception throughput")
    p.add_argument("--sampler", choices=["ddim", "heun"], default="ddim", help="the sampler timed")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps (heun: 18 is EDM's CIFAR-10, 35 NFE)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampler batch (default: 250 CUDA, 8 CPU)")
    p.add_argument("--inception-batch", type=int, default=None, help="Inception batch (default: 250 CUDA, 4 CPU)")
    p.add_argument("--inception-download", action="store_true", help="let resolve_inception_weights download")
    p.add_argument("--inception-random-init", action="store_true",
                   help="when no weights resolve, time a random-init Inception (labelled; no FID meaning)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, overriding the table")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, since OpenMP spin-waits collapse on a shared machine; "
                        "on CUDA: torch's default)")
    p.add_argument("--capture", action="store_true",
                   help="train.capture=compile (the whole step compiled; CUDA graphs on a GPU)")
    p.add_argument("--weighting-override", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="weighting.KEY=VALUE for strategy NAME only, e.g. adaptive_timestep:update_every=2 (repeatable)")
    p.add_argument("--overhead", action="store_true",
                   help="instead of throughput: operators and host ms per step outside the network, every strategy "
                        "against a bare loop (docs/performance.md)")
    p.add_argument("--overhead-steps", type=int, default=None,
                   help="steps counted and steps timed per loop with --overhead (default: 50 CUDA, 20 CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p.parse_args(argv)


def _defaults(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    for key, on_cuda, on_cpu in [("model", "ddpm_cifar10", "unet_tiny"), ("batch", 128, 8), ("warmup", 20, 2),
                                 ("windows", 5, 3), ("steps_per_window", 20, 3), ("num_images", 50_000, 512),
                                 ("sample_batch", 250, 8), ("inception_batch", 250, 4), ("overhead_steps", 50, 20)]:
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffrun.training.environment import resolve_device

    device = resolve_device(args.device)
    args = _defaults(args, device.type == "cuda")
    for item in args.weighting_override:
        name, sep, assignment = item.partition(":")
        if not (name and sep and "=" in assignment):
            raise SystemExit(f"--weighting-override {item!r}: expected NAME:KEY=VALUE, e.g. adaptive_timestep:update_every=2")
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    threads_before = torch.get_num_threads()
    recompile_limit = torch._dynamo.config.recompile_limit
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.capture:                                      # every strategy swapped in is a graph of its own
            torch._dynamo.config.recompile_limit = max(recompile_limit, 64)
        return (overhead.run if args.overhead else throughput.run)(args, argv, device)
    finally:
        torch.set_num_threads(threads_before)                 # main() is also called in-process (tests)
        torch._dynamo.config.recompile_limit = recompile_limit


if __name__ == "__main__":
    main()
