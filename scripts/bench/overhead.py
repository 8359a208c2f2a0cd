"""`--overhead`: host work per step outside the network (hooks mark its forward and backward), every strategy
against a bare loop: ATen operators dispatched, host reads, host milliseconds."""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.compose import base_overrides, build_strategies, changed_state, compose, strategy_state
from bench.measure import device_name, error_text, ratio
from bench.report import emit, format_overhead_report

ROOT = Path(__file__).resolve().parents[2]

class NetworkWindows:
    """When the network's own forward and backward run during a step, from hooks on the module: the forward
    from its pre-hook to its hook (with grad enabled: a strategy's no-grad probes are the strategy's work), the
    backward from the gradient reaching the network's output to the last parameter's accumulated gradient."""

    def __init__(self, module: torch.nn.Module, clock=time.perf_counter):
        self.clock = clock
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.expected_grads = len(self.params)    # lowered by `end_step` if some parameter never gets a gradient
        self.inside, self.network_s = False, 0.0
        self._since, self._grads_seen = 0.0, 0
        self._handles = [module.register_forward_pre_hook(self._forward_starts),
                         module.register_forward_hook(self._forward_ends),
                         *(p.register_post_accumulate_grad_hook(self._grad_accumulated) for p in self.params)]

    def _enter(self) -> None:
        self.inside, self._since = True, self.clock()

    def _leave(self) -> None:
        self.inside = False
        self.network_s += self.clock() - self._since

    def _forward_starts(self, module, args) -> None:
        if torch.is_grad_enabled() and not self.inside:
            self._enter()

    def _forward_ends(self, module, args, output) -> None:
        if torch.is_grad_enabled() and self.inside:
            self._leave()
            if output.requires_grad:
                output.register_hook(self._backward_starts)

    def _backward_starts(self, grad) -> None:
        self._grads_seen = 0
        self._enter()

    def _grad_accumulated(self, param) -> None:
        self._grads_seen += 1
        if self.inside and self._grads_seen == self.expected_grads:
            self._leave()

    def start_step(self) -> None:
        self.network_s = 0.0

    def end_step(self) -> None:
        if self.inside:                     # a parameter got no gradient: learn how many do (warm-up steps)
            self.expected_grads = self._grads_seen
            self._leave()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched to ATen, inside and outside the network's windows; host reads
    (`_local_scalar_dense`: `.item()`, `bool(t)`; a device sync on a GPU) apart; with `sources`, which
    line of diffrun (or of this script) issued each operator outside the network."""

    def __init__(self, windows: NetworkWindows | None, sources: bool = False):
        super().__init__()
        self.windows, self.with_sources = windows, sources
        self.inside = self.outside = self.reads = 0
        self.sources: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.windows is not None and self.windows.inside:
            self.inside += 1
        else:
            self.outside += 1
            if self.with_sources:
                self.sources[_issuing_line()] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _issuing_line() -> str:
    """`path:line function` of the innermost frame in diffrun/ or in this script's loops."""
    frame = sys._getframe(2)
    here = str(Path(__file__).resolve())
    package = str(ROOT / "diffrun")
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(package) or (name == here and frame.f_code.co_name in ("step", "_bare_step")):
            return f"{Path(name).resolve().relative_to(ROOT)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"


class BareLoop:
    """The least a diffusion training step does (the reference of `--overhead`): t ~ U[0, 1] on the run's
    schedule, ε ~ N(0, I), z = αx + σε, forward, ε-MSE, backward, fused AdamW. No NaN guard, no statistics,
    and unless `clip_and_ema`, no gradient clipping and no EMA (with it: `clip_grad_norm_` and one
    `_foreach_lerp_` with a constant decay, as timm's ModelEmaV3 does). Its own copy of the Trainer's
    denoiser, so the network work is identical."""

    def __init__(self, denoiser: torch.nn.Module, schedule, autocast_dtype: torch.dtype | None, lr: float,
                 clip_and_ema: bool = False):
        from diffrun.schedules import alpha_sigma

        self.alpha_sigma = alpha_sigma
        self.denoiser = copy.deepcopy(denoiser).train()
        self.schedule, self.autocast_dtype = schedule, autocast_dtype
        device = next(self.denoiser.parameters()).device
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"))
        self.params = list(self.denoiser.parameters())
        self.ema = [p.detach().clone() for p in self.params] if clip_and_ema else None

    def step(self, x0: torch.Tensor) -> None:
        t = torch.rand(x0.shape[0], device=x0.device)
        logsnr = self.schedule.logsnr(t).float()
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in self.alpha_sigma(logsnr))
        eps = torch.randn_like(x0)
        z = alpha * x0 + sigma * eps
        with torch.autocast(x0.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.denoiser(z, logsnr)
        loss = F.mse_loss(out.float(), eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.ema is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.999)


def host_clock(cuda: bool):
    """The thread's CPU time on CPU (other jobs on a shared machine do not count); wall time on a GPU (the
    time the host takes to enqueue the work, measured after a synchronize)."""
    return time.perf_counter if cuda else time.thread_time


class OverheadProbe:
    """One loop under `--overhead`. `step(x0)` runs one training step, `batch()` draws x0 (not counted),
    `windows` watch the network (None: the step is captured, and its forward and backward cannot be told
    apart from the rest; nor can its operators be counted: torch.compile runs eagerly under a
    TorchDispatchMode, so `count` is not called for it)."""

    def __init__(self, step, batch, windows: NetworkWindows | None, cuda: bool):
        self.step, self.batch, self.cuda, self.windows = step, batch, cuda, windows
        self.clock = host_clock(cuda)
        self.counter: OpCounter | None = None
        self.counted_steps, self.host_s, self.outside_s = 0, [], []

    def _one(self, x0) -> tuple[float, float | None]:
        if self.windows is not None:
            self.windows.start_step()
        if self.cuda:
            torch.cuda.synchronize()            # host time of this step only, not of waiting for the last one
        start = self.clock()
        self.step(x0)
        seconds = self.clock() - start
        if self.windows is not None:
            self.windows.end_step()
            return seconds, self.windows.network_s
        return seconds, None

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self._one(self.batch())

    def count(self, steps: int, sources: bool) -> None:
        self.counter, self.counted_steps = OpCounter(self.windows, sources), steps
        for _ in range(steps):
            x0 = self.batch()
            with self.counter:
                self._one(x0)

    def time(self, steps: int) -> None:
        for _ in range(steps):
            seconds, network = self._one(self.batch())
            self.host_s.append(seconds)
            if network is not None:
                self.outside_s.append(seconds - network)

    def result(self) -> dict:
        c, n = self.counter, self.counted_steps
        median = lambda xs: statistics.median(xs) * 1e3 if xs else None       # noqa: E731
        mean = lambda xs: statistics.fmean(xs) * 1e3 if xs else None          # noqa: E731
        return {"ops_per_step": (c.inside + c.outside) / n if c else None,
                "ops_outside_per_step": c.outside / n if c and self.windows is not None else None,
                "host_reads_per_step": c.reads / n if c else None,
                "step_ms": median(self.host_s), "step_ms_mean": mean(self.host_s), "timed_steps": len(self.host_s),
                "outside_ms": median(self.outside_s), "outside_ms_mean": mean(self.outside_s),
                "sources": [{"line": line, "ops_per_step": k / n} for line, k in c.sources.most_common()] if c else []}


def run(args: argparse.Namespace, argv, device: torch.device) -> dict:
    """`--overhead`: the two bare loops, then every strategy's step in one Trainer (swapped in as in `_run`)."""
    from diffrun.training.trainer import Trainer

    started = time.perf_counter()
    cuda = device.type == "cuda"
    base = base_overrides(args)
    run_dir = Path(tempfile.mkdtemp(prefix="diffrun-bench-"))
    try:
        trainer = Trainer(compose([*base, "weighting=uniform"], args.num_images, args.seed), run_dir, callbacks=[])
        trainer.denoiser.train()
        wanted, strategies, errors = build_strategies(args, base, trainer)

        def batch():
            return trainer.data.batch(trainer.parts.local_batch_size)[0]

        lr = trainer.optimizer.defaults["lr"]
        clock = host_clock(cuda)
        # a captured step has no network windows to time
        windows = [] if args.capture else [NetworkWindows(trainer.denoiser, clock)]
        probes, rows, strategy_rows = {}, {}, {}
        for label, clip_and_ema in (("bare loop", False), ("bare + clip + EMA", True)):
            bare = BareLoop(trainer.denoiser, trainer.schedule, trainer.autocast_dtype, lr, clip_and_ema)
            windows.append(NetworkWindows(bare.denoiser, clock))
            probes[label] = OverheadProbe(bare.step, batch, windows[-1], cuda)
        for strategy_name in wanted:
            if strategy_name not in strategies:
                rows[strategy_name] = {"name": strategy_name, "status": "error", "error": errors[strategy_name]}
                continue
            strategy, taken = strategies[strategy_name], [0]
            strategy_rows[strategy_name] = {"before": strategy_state(strategy), "taken": taken}

            def step(x0, strategy=strategy, taken=taken):
                trainer.parts.strategy, trainer.step = strategy, taken[0]
                trainer.step_fn(trainer.parts, x0, trainer.step, trainer.counters, trainer.stats)
                taken[0] += 1

            probes[strategy_name] = OverheadProbe(step, batch, None if args.capture else windows[0], cuda)

        def guarded(name, work) -> None:
            if name in rows:                                         # failed before
                return
            try:
                work(probes[name])
            except Exception as exc:
                rows[name] = {"name": name, "status": "error", "error": error_text(exc)}

        try:
            for name in probes:                                      # warm-up and operator counts, loop by loop
                guarded(name, lambda probe: probe.warm_up(args.warmup))
                if probes[name].windows is not None:                 # not a captured step (see OverheadProbe)
                    guarded(name, lambda probe: probe.count(args.overhead_steps,
                                                            sources=name in ("bare loop", "uniform")))
            rounds = min(5, args.overhead_steps)                     # timing round-robin: load drift hits all alike
            for r in range(rounds):
                share = args.overhead_steps // rounds + (r < args.overhead_steps % rounds)
                for name in probes:
                    guarded(name, lambda probe: probe.time(share))
        finally:
            for watch in windows:
                watch.remove()
        ordered = []
        for name in ("bare loop", "bare + clip + EMA", *wanted):
            if name in rows:
                ordered.append(rows[name])
                continue
            row = {"name": name, "status": "ok", "error": None, **probes[name].result()}
            if name in strategy_rows:
                row.update(steps=strategy_rows[name]["taken"][0],
                           state_changed=changed_state(strategy_rows[name]["before"], strategies[name]))
            ordered.append(row)
        rows = ordered
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    bare, bare_plus = rows[0], rows[1]
    for row in rows[1:]:
        if row["status"] == "ok":
            row["ops_outside_x_bare"] = ratio(row["ops_outside_per_step"], bare.get("ops_outside_per_step"))
            row["outside_ms_x_bare"] = ratio(row["outside_ms"], bare.get("outside_ms"))
            row["outside_ms_x_bare_clip_ema"] = ratio(row["outside_ms"], bare_plus.get("outside_ms"))
    import hydra

    result = {
        "meta": {
            "mode": "overhead", "date": datetime.date.today().isoformat(),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "hydra": hydra.__version__, "python": platform.python_version(),
            "model": args.model, "params": sum(p.numel() for p in trainer.denoiser.parameters()),
            "param_tensors": sum(1 for _ in trainer.denoiser.parameters()), "batch": args.batch,
            "precision": args.precision, "autocast_dtype": str(trainer.autocast_dtype or "fp32").replace("torch.", ""),
            "compile": args.compile, "capture": args.capture, "channels_last": args.channels_last,
            "warmup_steps": args.warmup, "steps": args.overhead_steps, "threads": torch.get_num_threads(),
            "weighting_overrides": list(args.weighting_override),
            "seconds_total": time.perf_counter() - started,
            "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "overhead": rows,
    }
    return emit(result, format_overhead_report(result), args.quiet, args.json)
