"""The printed tables of the benchmark."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Column headers of the printed tables (tests check them; keep them stable).


TRAIN_COLUMNS = ["loop", "img/s", "step ms", "vs peer", "GFLOP/img", "TFLOP/s", "MFU", "peak mem"]
STRATEGY_COLUMNS = ["strategy", "step ms", "x uniform", "img/s", "peak mem", "status", "state changed"]


FID_COLUMNS = ["stage", "batch", "img/s", "net evals/s", "notes"]
OVERHEAD_COLUMNS = ["loop", "ops/step", "outside", "x bare", "host reads", "outside ms", "ms x bare",
                    "ms x bare+clip+EMA", "step ms", "state changed"]


def _num(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _mem(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def _table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)    # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_report(result: dict) -> str:
    meta, flops = result["meta"], result["flops"]
    cpu = meta["device"] == "cpu"
    head = (f"diffrun bench {meta['date']}: {meta['model']} ({meta['params'] / 1e6:.2f}M params), batch {meta['batch']}, "
            f"{meta['autocast_dtype']}, compile={meta['compile']}, channels_last={meta['channels_last']}\n"
            f"device {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), torch {meta['torch']}; "
            f"{meta['windows']} windows x {meta['steps_per_window']} steps after {meta['warmup_steps']} warm-up steps"
            + ("\nCPU, shared machine: not a performance claim. Peak memory on CPU is the process RSS high-water."
               if cpu else ""))
    rows = []
    for row in (result["train"]["diffrun"], result["train"]["peer"]):
        if row is None:
            continue
        rows.append([row["loop"], _num(row["images_per_s"]), _num(row["step_ms"], 2),
                     _num(row.get("speedup_vs_peer"), 2, "x"), _num(flops["fwd_bwd_per_image"] / 1e9, 3),
                     _num(row["achieved_tflops"], 3), "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                     _mem(row["peak_mem_bytes"])])
    parts = [head, "", "Training step", _table(TRAIN_COLUMNS, rows)]
    if result["train"]["peer"] is None:
        parts.append(f"peer: {result['train']['peer_note']}")
    peak = flops["peak_bf16_tflops"]
    parts.append(f"model FLOPs/image: forward {flops['forward_per_image'] / 1e9:.3f} G, forward+backward "
                 f"{flops['fwd_bwd_per_image'] / 1e9:.3f} G; MFU vs dense bf16 peak "
                 + (f"{peak:.0f} TFLOP/s" if peak else "n/a (no peak known for this device)"))
    srows = [[r["name"], _num(r["step_ms"], 2), _num(r["ratio_to_uniform"], 3, "x"), _num(r["images_per_s"]),
              _mem(r["peak_mem_bytes"]), "ok" if r["status"] == "ok" else r["error"],
              ", ".join(_grouped(r.get("state_changed")) or []) or ("none" if r["status"] == "ok" else "")]
             for r in result["strategies"]]
    parts += ["", "Weighting strategies (same Trainer, model and batch; x uniform = amortised step time ratio)",
              _table(STRATEGY_COLUMNS, srows)]
    if result["fid"] is not None:
        frows = [[r["stage"], r["batch"], _num(r["images_per_s"]), _num(r["net_evals_per_s"]), r["notes"]]
                 for r in (result["fid"]["sampler"], result["fid"]["inception"])]
        parts += ["", "FID evaluation", _table(FID_COLUMNS, frows)]
    parts.append(f"\ntotal {meta['seconds_total']:.1f} s")
    return "\n".join(parts)


def _grouped(names: list[str] | None) -> list[str] | None:
    """State names with a module's parameters folded: policy.mlp.0.weight, policy.head.bias → policy.*"""
    if names is None:
        return None
    return sorted({name.split(".")[0] + ".*" if "." in name else name for name in names})


def format_overhead_report(result: dict) -> str:
    meta = result["meta"]
    head = (f"diffrun overhead {meta['date']}: {meta['model']} ({meta['params'] / 1e6:.2f}M params in "
            f"{meta['param_tensors']} tensors), batch {meta['batch']}, {meta['autocast_dtype']}, "
            f"capture={meta['capture']}, compile={meta['compile']}\n"
            f"device {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), torch {meta['torch']}; "
            f"per loop {meta['warmup_steps']} warm-up steps, then {meta['steps']} steps counted and {meta['steps']} timed "
            f"(medians)\n"
            "ops: ATen operators dispatched per step; outside: not in the network's forward/backward; host reads: "
            "_local_scalar_dense (.item()/bool(); a sync on a GPU)"
            + ("\ncaptured steps: step ms only (operators cannot be counted: torch.compile runs eagerly under the "
               "counting TorchDispatchMode; the network cannot be timed apart)" if meta["capture"] else ""))
    rows = []
    for r in result["overhead"]:
        if r["status"] != "ok":
            rows.append([r["name"], *["n/a"] * (len(OVERHEAD_COLUMNS) - 2), r["error"]])
            continue
        changed = _grouped(r.get("state_changed"))
        rows.append([r["name"], _num(r["ops_per_step"]), _num(r["ops_outside_per_step"]),
                     _num(r.get("ops_outside_x_bare"), 2, "x"), _num(r["host_reads_per_step"], 2),
                     _num(r["outside_ms"], 3), _num(r.get("outside_ms_x_bare"), 2, "x"),
                     _num(r.get("outside_ms_x_bare_clip_ema"), 2, "x"), _num(r["step_ms"], 2),
                     "-" if changed is None else (", ".join(changed) if changed else "none")])
    parts = [head, "", _table(OVERHEAD_COLUMNS, rows)]
    bare, uniform = result["overhead"][0], next((r for r in result["overhead"] if r["name"] == "uniform"), None)
    for row in (bare, uniform):
        if row is not None and row.get("sources"):
            parts += ["", f"operators outside the network per step, by the line that issued them: {row['name']}"]
            parts += [f"  {s['ops_per_step']:7.1f}  {s['line']}" for s in row["sources"][:15]]
    parts.append(f"\ntotal {meta['seconds_total']:.1f} s")
    return "\n".join(parts)


def emit(result: dict, text: str, quiet: bool, json_path: str | None) -> dict:
    """Print the table (unless `quiet`) and write the result as JSON (with `json_path`); returns the result."""
    if not quiet:
        print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
