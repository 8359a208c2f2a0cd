"""The default benchmark: diffrun's training step, every strategy swapped in, the peer loop and FID evaluation,
interleaved round-robin in one process."""
from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.compose import base_overrides, build_strategies, changed_state, compose, strategy_state
from bench.fid import bench_inception, bench_sampler
from bench.measure import Clock, Memory, count_flops, device_name, error_text, peak_bf16_tflops, run_steps, window_row
from bench.peer import PeerLoop
from bench.report import emit, format_report


def run(args: argparse.Namespace, argv, device: torch.device) -> dict:
    from diffrun.training.trainer import Trainer

    clock, memory = Clock(device), Memory(device)
    name = device_name(device)
    peak_tflops = args.peak_tflops or peak_bf16_tflops(name, device)
    started = time.perf_counter()

    base = base_overrides(args)
    run_dir = Path(tempfile.mkdtemp(prefix="diffrun-bench-"))
    try:
        # --- diffrun: one Trainer, strategies swapped in ------------------------------------------
        base_alloc = memory.allocated()
        trainer = Trainer(compose([*base, "weighting=uniform"], args.num_images, args.seed), run_dir, callbacks=[])
        trainer.denoiser.train()
        params = sum(p.numel() for p in trainer.denoiser.parameters())
        flops_fwd, flops_fwd_bwd = count_flops(trainer)

        wanted, strategies, errors = build_strategies(args, base, trainer)
        steps = {strategy_name: 0 for strategy_name in strategies}
        initial_state = {strategy_name: strategy_state(s) for strategy_name, s in strategies.items()}

        def run_strategy(strategy_name: str, n: int) -> None:
            trainer.parts.strategy, trainer.step = strategies[strategy_name], steps[strategy_name]
            run_steps(trainer, n)
            steps[strategy_name] = trainer.step

        for strategy_name in list(strategies):                   # warm-up (compilation happens in uniform's)
            try:
                run_strategy(strategy_name, args.warmup)
            except Exception as exc:
                errors[strategy_name] = error_text(exc)
                del strategies[strategy_name]
        if "uniform" not in strategies:
            raise RuntimeError(f"uniform weighting failed, nothing to compare against: {errors.get('uniform')}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        trainer_resident = memory.allocated() - base_alloc

        peer, peer_note, peer_resident = None, None, 0
        if args.no_peer:
            peer_note = "skipped (--no-peer)"
        else:
            before = memory.allocated()
            peer = PeerLoop(trainer.cfg.model.net, trainer.data.images, args.batch, device, trainer.autocast_dtype,
                            args.peer_workers, compile=args.peer_compile, channels_last=args.peer_compile and args.channels_last)
            peer.step(args.warmup)
            peer_resident = memory.allocated() - before

        # --- timed windows, round-robin -------------------------------------------------------
        times = {n: [] for n in strategies}
        peaks = {n: 0 for n in strategies}
        peer_times, peer_peak = [], 0
        for _ in range(args.windows):
            for strategy_name in list(strategies):
                memory.reset()
                try:
                    times[strategy_name].append(clock.time(lambda: run_strategy(strategy_name, args.steps_per_window)))
                except Exception as exc:
                    errors[strategy_name] = error_text(exc)
                    del strategies[strategy_name], times[strategy_name]
                    continue
                peaks[strategy_name] = max(peaks[strategy_name], memory.peak(peer_resident))
            if peer is not None:
                memory.reset()
                peer_times.append(clock.time(lambda: peer.step(args.steps_per_window)))
                peer_peak = max(peer_peak, memory.peak(trainer_resident))

        diffrun_row = window_row(times["uniform"], args.steps_per_window, args.batch, flops_fwd_bwd, peak_tflops, peaks["uniform"])
        diffrun_row["loop"] = "diffrun train_step (uniform)"
        peer_row = None
        if peer is not None:
            peer_row = window_row(peer_times, args.steps_per_window, args.batch, flops_fwd_bwd, peak_tflops, peer_peak)
            peer_row["loop"] = "peer: diffusers train_unconditional.py loop" + (" (compiled)" if args.peer_compile else "")
            peer_row["last_loss"] = peer.logs.get("loss")
            diffrun_row["speedup_vs_peer"] = peer_row["step_ms_mean"] / diffrun_row["step_ms_mean"]
            peer_row["speedup_vs_peer"] = 1.0

        uniform_mean = diffrun_row["step_ms_mean"]
        strategy_rows = []
        for strategy_name in wanted:
            if strategy_name in strategies:
                row = window_row(times[strategy_name], args.steps_per_window, args.batch, None, None, peaks[strategy_name])
                row.update(name=strategy_name, status="ok", error=None,
                           ratio_to_uniform=row["step_ms_mean"] / uniform_mean, steps=steps[strategy_name],
                           state_changed=changed_state(initial_state[strategy_name], strategies[strategy_name]))
            else:
                row = {"name": strategy_name, "status": "error", "error": errors.get(strategy_name, "unknown error"),
                       "step_ms": None, "step_ms_mean": None, "ratio_to_uniform": None, "images_per_s": None,
                       "peak_mem_bytes": None}
            strategy_rows.append(row)

        # --- FID evaluation throughput --------------------------------------------------------
        fid = None
        if not args.no_fid:
            trainer.parts.strategy = strategies["uniform"]
            fid = {"sampler": bench_sampler(trainer, clock, args.sample_batch, args.sample_steps, max(1, args.windows // 2),
                                            args.sampler),
                   "inception": bench_inception(device, clock, args.inception_batch, max(1, args.windows // 2),
                                                args.inception_download, args.inception_random_init)}
            fid["sampler"]["achieved_tflops"] = flops_fwd * fid["sampler"]["net_evals_per_s"] / 1e12
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    import hydra

    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "device": str(device), "device_name": name,
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "hydra": hydra.__version__, "python": platform.python_version(),
            "model": args.model, "params": params, "batch": args.batch,
            "precision": args.precision, "autocast_dtype": str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
            "compile": args.compile, "channels_last": args.channels_last,
            "fused_optimizer": bool(trainer.optimizer.defaults.get("fused")),
            "warmup_steps": args.warmup, "windows": args.windows, "steps_per_window": args.steps_per_window,
            "num_images": args.num_images, "memory_kind": memory.kind, "threads": torch.get_num_threads(),
            "seconds_total": time.perf_counter() - started,
            "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "flops": {"forward_per_image": flops_fwd, "fwd_bwd_per_image": flops_fwd_bwd,
                  "peak_bf16_tflops": peak_tflops,
                  "peak_source": ("--peak-tflops" if args.peak_tflops else "table") if peak_tflops else None},
        "train": {"diffrun": diffrun_row, "peer": peer_row, "peer_note": peer_note},
        "strategies": strategy_rows,
        "fid": fid,
    }
    result["meta"]["seconds_total"] = time.perf_counter() - started
    return emit(result, format_report(result), args.quiet, args.json)
