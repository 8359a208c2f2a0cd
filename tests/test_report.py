"""diffrun-report on synthetic sweep directories (known FID curves, a failed job, per-λ statistics),
and end to end on a real `smoke` multirun (slow).

Expected numbers are recomputed here straight from the files each job wrote, with plain json/numpy,
not with the reporting code, and compared with what report.md prints.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from diffrun.run_folder.index import append_entry
from diffrun.reporting.cli import main as report_main
from diffrun.reporting.collect import ReportError
from diffrun.reporting.wandb_runs import collect_wandb

STRATEGIES = {"uniform": 32.0, "min_snr": 20.0, "lognormal": 26.0}   # strategy → FID floor
SEEDS = (0, 1, 2)
EVAL_STEPS = list(range(100, 1001, 100))
TARGET = 35.0
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# a synthetic sweep in the on-disk format the trainer writes
# ------------------------------------------------------------------------------------------------
def fid_at(strategy: str, seed: int, step: int) -> float:
    # a seed effect shared by all strategies (1.3 per seed) plus a small strategy × seed part, so paired
    # differences have a spread; the last eval is worse than the best
    return (STRATEGIES[strategy] + 60.0 * math.exp(-step / 250.0) + 1.3 * seed
            + 0.3 * math.sin(3 * seed + sum(map(ord, strategy))) + 1.0 * (step == 1000))


def write_config(job: Path, strategy: str, seed: int, experiment: str = "min_snr_cifar10") -> None:
    job.mkdir(parents=True, exist_ok=True)
    job.joinpath("config.yaml").write_text(
        f"name: cifar10_{strategy}_seed{seed}\nseed: {seed}\nsweep_name: synth\nexperiment: {experiment}\n"
        f"train:\n  steps: 1000\n  batch_size: 128\n"
        f"report:\n  baseline: uniform\n  target_fid: {TARGET}\n"
        f"dataset:\n  name: cifar10\nmodel:\n  prediction: eps\n"
        f"weighting:\n  name: {strategy}\n")


def write_npz(job: Path, strategy: str, seed: int, flushes: int = 10, bins: int = 32) -> None:
    rng = np.random.default_rng(seed)
    edges = np.linspace(-20, 20, bins + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    peak = {"uniform": 0.0, "min_snr": 2.0, "lognormal": -2.0}[strategy]
    density = np.exp(-0.5 * ((centers - peak) / 4.0) ** 2) * (np.abs(centers) < 14)
    count = np.vstack([rng.poisson(400 * density / density.sum()) for _ in range(flushes)]).astype(float)
    steps = np.arange(1, flushes + 1) * 100
    decay = np.exp(-steps / 500.0)[:, None]
    loss_mean = (1.0 / (1.0 + np.exp(centers)))[None, :] * (0.5 + decay)
    weight = np.minimum(np.exp(centers), 5.0) / np.exp(centers) if strategy == "min_snr" else np.ones(bins)
    has, has2 = count > 0, count > 1
    nan = np.full_like(count, np.nan)
    np.savez(job / "logsnr_stats.npz", step=steps, edges=edges, centers=centers, count=count,
             loss_mean=np.where(has, loss_mean, nan), loss_var=np.where(has2, 0.3 * loss_mean ** 2, nan),
             wloss_mean=np.where(has, loss_mean * weight, nan),
             wloss_var=np.where(has2, 0.3 * (loss_mean * weight) ** 2, nan),
             weight_mean=np.where(has, weight[None, :], nan))


def write_job(sweep: Path, num: int, strategy: str, seed: int, fid: bool = True, npz: bool = True,
              state: str = "finished", error: str | None = None, steps: int = 1000) -> Path:
    job = sweep / f"{num}_{strategy}_seed{seed}"
    write_config(job, strategy, seed)
    lines = []
    for step in range(50, steps + 1, 50):
        loss = 0.05 + 0.5 * math.exp(-step / 300) + 0.001 * seed + 0.002 * len(strategy)
        lines.append({"step": step, "images_seen": step * 128, "loss": loss, "weighted_loss": loss * 0.8,
                      "grad_norm": 1.0, "lr": 2e-4, "images_per_sec": 1000.0 + 10 * seed + (step % 150),
                      "nonfinite_steps": 0, "time": 1.7e9 + step})
        if fid and step in EVAL_STEPS:
            lines.append({"step": step, "images_seen": step * 128, "fid": fid_at(strategy, seed, step),
                          "kid_mean": 0.01, "kid_std": 0.001, "fid_num_samples": 1000, "eval_seconds": 3.0})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    job.joinpath("metrics.jsonl").write_text(text + '{"step": 10')   # torn last line: a job killed mid-write
    status = {"state": state, "step": steps, "total_steps": 1000}
    if error:
        status["error"] = error
    job.joinpath("status.json").write_text(json.dumps(status))
    if npz:
        write_npz(job, strategy, seed)
    return job


def make_sweep(root: Path, fid: bool = True, npz: bool = True) -> Path:
    sweep = root / "synth"
    num = 0
    for strategy in STRATEGIES:
        for seed in SEEDS:
            write_job(sweep, num, strategy, seed, fid=fid, npz=npz)
            num += 1
    write_job(sweep, num, "min_snr", 3, fid=False, npz=False, state="failed", steps=350,
              error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback (most recent call last): ...")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


# ------------------------------------------------------------------------------------------------
# ground truth, read straight from the job folders
# ------------------------------------------------------------------------------------------------
def truth(sweep: Path) -> dict:
    """strategy → per-seed final/best FID, steps to target, median images/s, final loss (finished jobs only)."""
    out: dict = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != "report"):
        status = json.loads((job / "status.json").read_text())
        if status["state"] != "finished":
            continue
        strategy = re.match(r"\d+_(.+)_seed\d+", job.name)[1]
        recs = []
        for line in (job / "metrics.jsonl").read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        evals = sorted((r for r in recs if "fid" in r), key=lambda r: r["step"])
        train = [r for r in recs if "loss" in r]
        d = out.setdefault(strategy, {"final": [], "best": [], "reach": [], "ips": [], "loss": [], "fid_seed": []})
        if evals:
            d["fid_seed"].append(int(re.search(r"seed(\d+)$", job.name)[1]))
            d["final"].append(evals[-1]["fid"])
            d["best"].append(min(r["fid"] for r in evals))
            d["reach"].append(next((r["step"] for r in evals if r["fid"] <= TARGET), None))
        d["ips"].append(float(np.median([r["images_per_sec"] for r in train])))
        d["loss"].append(train[-1]["loss"])
    return out


def table_rows(report: str, section: str) -> dict[str, list[str]]:
    """First column (without bold) → cells, for the table under `## section`."""
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("*")] = cells
    return rows


def run_report(sweep: Path, *args: str, figures: bool = False) -> str:
    assert report_main([str(sweep), *args, *([] if figures else ["--no-figures"])]) == 0
    return (sweep / "report" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_table_matches_per_run_files(tmp_path):
    sweep = make_sweep(tmp_path)
    report = run_report(sweep)
    rows = table_rows(report, "Results per strategy")
    for strategy, t in truth(sweep).items():
        cells = rows[strategy]
        assert cells[1] == "3"
        assert cells[2] == f"{np.mean(t['final']):.2f} ± {np.std(t['final'], ddof=1):.2f}"
        assert cells[3] == f"{np.mean(t['best']):.2f}"
        reached = [s for s in t["reach"] if s is not None]
        assert cells[4] == (f"{np.mean(reached):.0f} ({len(reached)}/3 seeds reached)" if reached
                            else "— (0/3 seeds reached)")
        assert cells[5] == f"{np.mean(t['ips']):.1f}"
    # the seeds straddle the target for some strategies: the k/n column is exercised both ways
    assert "(3/3 seeds reached)" in report and re.search(r"\((1|2)/3 seeds reached\)", report)
    assert "FID ≤ 35" in report
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    t = truth(sweep)["min_snr"]
    assert summary["strategies"]["min_snr"]["final_fid_mean"] == pytest.approx(np.mean(t["final"]))
    assert summary["strategies"]["min_snr"]["steps_to_target"] == t["reach"]


def test_failed_job_listed_with_first_error_line(tmp_path):
    sweep = make_sweep(tmp_path)
    report = run_report(sweep)
    err = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert table_rows(report, "Results per strategy")["min_snr"][6] == f"1: 9_min_snr_seed3: {err}"
    failed = table_rows(report, "Failed or incomplete jobs")["9_min_snr_seed3"]
    assert failed[3:] == ["failed", "350/1000", err]
    assert "Traceback" not in report
    # a job dir without status.json is incomplete too
    (sweep / "10_uniform_seed9").mkdir()
    write_config(sweep / "10_uniform_seed9", "uniform", 9)
    report = run_report(sweep)
    assert "no status.json" in table_rows(report, "Failed or incomplete jobs")["10_uniform_seed9"][5]


def test_welch_and_bootstrap_against_scipy(tmp_path):
    sweep = make_sweep(tmp_path)
    report = run_report(sweep)
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    t = truth(sweep)
    rows = table_rows(report, "Comparison against the baseline (uniform)")
    assert "Better = lower FID" in report
    for c in summary["comparisons"]:
        ref = stats.ttest_ind(t[c["strategy"]]["final"], t["uniform"]["final"], equal_var=False)
        assert c["p"] == pytest.approx(ref.pvalue, rel=1e-12)
        assert c["t"] == pytest.approx(ref.statistic, rel=1e-12)
        diff = np.mean(t[c["strategy"]]["final"]) - np.mean(t["uniform"]["final"])
        assert c["diff"] == pytest.approx(diff)
        assert c["ci"][0] <= diff <= c["ci"][1]
        cells = rows[c["strategy"]]
        assert cells[7] == f"{ref.pvalue:.3g}"
        assert cells[8] == ("yes" if ref.pvalue < 0.05 else "no")
        # paired over the seeds both finished (min_snr's seed 3 failed): scipy's ttest_rel on those pairs
        mine = dict(zip(t[c["strategy"]]["fid_seed"], t[c["strategy"]]["final"]))
        base = dict(zip(t["uniform"]["fid_seed"], t["uniform"]["final"]))
        common = sorted(set(mine) & set(base))
        ref_paired = stats.ttest_rel([mine[s] for s in common], [base[s] for s in common])
        assert c["paired"]["n"] == len(common) == 3
        assert c["paired"]["p"] == pytest.approx(ref_paired.pvalue, rel=1e-12)
        assert cells[9] == f"{ref_paired.pvalue:.3g} (3 pairs)"
    # min_snr's floor is 10 FID lower with a 1.3-per-seed spread: significantly better
    assert rows["min_snr"][12].startswith("shown: better (lower final FID, p = ")
    # reproducible: a second report gives the same CI
    again = json.loads(json.dumps(summary["comparisons"]))
    run_report(sweep)
    assert json.loads((sweep / "report" / "summary.json").read_text())["comparisons"] == again


def test_fewer_than_two_seeds_is_not_tested(tmp_path):
    sweep = tmp_path / "few"
    write_job(sweep, 0, "uniform", 0)
    write_job(sweep, 1, "uniform", 1)
    write_job(sweep, 2, "min_snr", 0)
    report = run_report(sweep)
    row = table_rows(report, "Comparison against the baseline (uniform)")["min_snr"]
    assert row[-1] == "n/a (need ≥ 2 seeds)" and row[7] == "—"


def test_figures_exist_and_are_linked(tmp_path):
    sweep = make_sweep(tmp_path)
    for job in sweep.glob("*_seed*"):
        write_grid(job, 1000, 128)
    report = run_report(sweep, figures=True)
    names = ["fid_curves.png", "loss_curves.png", "loss_vs_logsnr.png", "loss_var_heatmap.png",
             "wloss_var_heatmap.png", "logsnr_density.png", "sample_grids.png"]
    for name in names:
        path = sweep / "report" / name
        assert path.exists() and path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report          # relative link
    assert "Not drawn" not in report


def test_header_quotes_the_preset(tmp_path):
    sweep = make_sweep(tmp_path)
    report = run_report(sweep)
    assert report.startswith("# Sweep report: synth")
    assert "**Experiment**: min_snr_cifar10" in report and "**Dataset**: cifar10" in report
    assert "**Jobs**: 10 (9 finished, 1 failed or incomplete)" in report
    preset = (REPO / "conf/experiment/min_snr_cifar10.yaml").read_text().splitlines()
    comment = [ln for ln in preset[1:] if ln.startswith("#")]
    reference = report.split("## Reference (from the preset)", 1)[1].split("\n## ", 1)[0]
    assert "\n".join(comment[:4]) in reference


def test_without_npz(tmp_path):
    sweep = make_sweep(tmp_path, npz=False)
    report = run_report(sweep, figures=True)
    assert (sweep / "report" / "fid_curves.png").exists()
    assert not (sweep / "report" / "loss_var_heatmap.png").exists()
    assert "Loss-variance heatmaps: no logsnr_stats.npz" in report
    # a torn npz reads as absent
    (sweep / "0_uniform_seed0" / "logsnr_stats.npz").write_bytes(b"PK\x03\x04 torn")
    run_report(sweep, figures=True)


def test_without_fid_compares_loss(tmp_path):
    sweep = make_sweep(tmp_path, fid=False)
    report = run_report(sweep, figures=True)
    assert "No FID in this sweep" in report and "unweighted training loss" in report
    assert not (sweep / "report" / "fid_curves.png").exists()
    rows = table_rows(report, "Results per strategy")
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    t = truth(sweep)
    for strategy in STRATEGIES:
        losses = t[strategy]["loss"]
        assert rows[strategy][2] == f"{np.mean(losses):.4g} ± {np.std(losses, ddof=1):.4g}"
    for c in summary["comparisons"]:
        assert c["metric"] == "final training loss"
        ref = stats.ttest_ind(t[c["strategy"]]["loss"], t["uniform"]["loss"], equal_var=False)
        assert c["p"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_different_targets_are_not_compared(tmp_path):
    sweep = make_sweep(tmp_path, fid=False, npz=False)
    cfg = sweep / "3_min_snr_seed0" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("prediction: eps", "prediction: v"))
    report = run_report(sweep)
    assert "not comparable" in report and "eps, v" in report
    assert json.loads((sweep / "report" / "summary.json").read_text())["comparisons"] == []


def test_index_overrides_folder_names_and_cli_options(tmp_path):
    sweep = make_sweep(tmp_path, npz=False)
    for p in sorted(q for q in sweep.iterdir() if q.is_dir()):  # the lines diffrun.launching.sweep appends
        entry = {"event": "start", "job_num": int(p.name.split("_", 1)[0]), "dir": p.name,
                 "weighting": "renamed" if p.name.startswith("0_") else p.name.split("_seed")[0].split("_", 1)[1],
                 "seed": int(p.name.rsplit("seed", 1)[1])}
        append_entry(sweep, entry)
    out = tmp_path / "elsewhere"
    assert report_main([str(sweep), "--out", str(out), "--baseline", "min_snr", "--target-fid", "40"]) == 0
    report = (out / "report.md").read_text()
    rows = table_rows(report, "Results per strategy")
    assert rows["renamed"][1] == "1" and rows["uniform"][1] == "2"
    assert "FID ≤ 40" in report and "## Comparison against the baseline (min_snr)" in report


def test_errors_are_clear(tmp_path, monkeypatch, capsys):
    assert report_main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ReportError, match="network access and an API key"):
        collect_wandb("team/project", "g")
    assert report_main(["--wandb", "team/project", "--group", "g"]) == 1
    assert "diffrun-report outputs/sweeps/" in capsys.readouterr().err
    with pytest.raises(ReportError, match="ENTITY/PROJECT"):
        collect_wandb("justproject", "g")


# ------------------------------------------------------------------------------------------------
# end to end: a real smoke multirun (eval disabled → the loss-based comparison)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_sweep_report_end_to_end(tmp_path, monkeypatch):
    sweep = tmp_path / "smoke"
    # W&B offline (never online: no key, an unreachable server) so the same runs also feed the W&B source below
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"} | {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffrun.cli", "-m", "experiment=smoke", f"hydra.sweep.dir={sweep}", "wandb.mode=offline",
           "eval.enabled=false", "train.steps=20", "checkpoint.every_steps=10", "optimizer.warmup_steps=5",
           # smaller than the preset so the test stays well under a minute on 2 shared cores
           "train.batch_size=8", "train.log_every=5", "sample.num_images=4", "sample.steps=2", "device=cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "diffrun.reporting.cli", str(sweep)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (sweep / "report" / "report.md").read_text()
    assert "# Sweep report: smoke" in report and "**Jobs**: 4 (4 finished, 0 failed or incomplete)" in report
    assert "No FID in this sweep" in report and "`eval.enabled=false`" in report
    rows = table_rows(report, "Results per strategy")
    assert set(rows) >= {"uniform", "min_snr"}
    t = truth(sweep)
    for strategy in ("uniform", "min_snr"):
        losses = t[strategy]["loss"]
        assert rows[strategy][1] == "2"
        assert rows[strategy][2] == f"{np.mean(losses):.4g} ± {np.std(losses, ddof=1):.4g}"
        assert rows[strategy][4] == f"{np.mean(t[strategy]['ips']):.1f}"
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    (c,) = summary["comparisons"]
    ref = stats.ttest_ind(t["min_snr"]["loss"], t["uniform"]["loss"], equal_var=False)
    assert c["strategy"] == "min_snr" and c["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert (sweep / "report" / "loss_curves.png").stat().st_size > 0
    # the per-log-SNR figures come from the logsnr_stats.npz files the real runs wrote
    assert "no logsnr_stats.npz" not in report
    assert len(list((sweep / "report").glob("*.png"))) >= 5

    # the W&B source (`diffrun-report --wandb ENTITY/PROJECT --group G`) on the same four runs, as the
    # offline logs hold them, served through a stand-in for wandb.Api: the same table
    import wandb

    runs = [OfflineRun(run_dir) for run_dir in sorted(sweep.glob("*/wandb/offline-run-*"))]
    assert len(runs) == 4 and {r.group for r in runs} == {"smoke/uniform", "smoke/min_snr"}   # one per strategy
    monkeypatch.setattr(wandb, "Api", lambda timeout=None: OfflineApi(runs))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert report_main(["--wandb", "me/diffrun", "--group", "smoke", "--out", str(tmp_path / "from_wandb"),
                        "--no-figures"]) == 0
    remote = (tmp_path / "from_wandb" / "report.md").read_text()
    assert "wandb:me/diffrun group=smoke" in remote and "**Jobs**: 4 (4 finished" in remote
    remote_rows = table_rows(remote, "Results per strategy")
    for strategy in ("uniform", "min_snr"):
        assert remote_rows[strategy][1:3] == rows[strategy][1:3]        # seeds, final loss mean ± std
    remote_summary = json.loads((tmp_path / "from_wandb" / "summary.json").read_text())
    assert remote_summary["comparisons"][0]["p"] == pytest.approx(c["p"], rel=1e-9)


class OfflineRun:
    """What `wandb.Api().runs()` yields (name, group, state, config, summary, scan_history), read from an
    offline run's transaction log by wandb's own decoder (`wandb leet inspect --json`)."""

    def __init__(self, run_dir: Path):
        log = next(run_dir.glob("run-*.wandb"))
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "WANDB_SILENT": "true", "WANDB_DIR": str(run_dir)})
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        run = next(r["run"] for r in records if r["type"] == "run")
        self.name, self.group = run.get("display_name") or run["run_id"], run.get("run_group")
        self.config = run["config"]["update"]
        exits = [r for r in records if r["type"] == "exit"]
        self.state = "finished" if exits and not exits[-1].get("exit", {}).get("exit_code") else "crashed"
        self.summary = {}
        self._rows = [{"_step": r["history"]["step"]["num"], **self._scalars(r["history"]["item"])}
                      for r in records if r["type"] == "history"]

    @staticmethod
    def _scalars(item: dict) -> dict:
        """Numbers as they are; media (flattened `key._type`, `key.path`, ...) regrouped into one dict per key."""
        out: dict = {}
        for key, value in item.items():
            head, dot, attr = key.partition(".")
            if dot and f"{head}._type" in item:
                out.setdefault(head, {})[attr] = value
            else:
                out[key] = value
        return out

    def scan_history(self):
        return iter(self._rows)


class OfflineApi:
    def __init__(self, runs):
        self._runs = runs

    def runs(self, path, filters=None):
        pattern = (filters or {}).get("group", {}).get("$regex")     # W&B's MongoDB-style filter
        return [r for r in self._runs if pattern is None or re.match(pattern, r.group)]


def test_paired_test_edge_cases():
    from diffrun.reporting.significance import paired

    t, p, n = paired({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.0, 1: 1.0, 2: 2.5})      # every pair differs by exactly 1
    assert n == 3 and math.isnan(t) and math.isnan(p)
    assert paired({0: 1.0, 5: 2.0}, {0: 0.5, 1: 1.0})[2] == 1                  # one common seed: no test
    t, p, n = paired({0: 1.0, 1: 2.5, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.9})
    ref = stats.ttest_rel([1.0, 2.5, 2.0], [0.0, 1.0, 1.9])
    assert n == 3 and t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


# ------------------------------------------------------------------------------------------------
# CSV tables, sample grids side by side, one style per strategy
# ------------------------------------------------------------------------------------------------
def test_tables_as_csv(tmp_path):
    import csv

    sweep = make_sweep(tmp_path)
    report = run_report(sweep)
    assert "[results.csv](results.csv)" in report and "[jobs.csv](jobs.csv)" in report
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    with open(sweep / "report" / "results.csv") as fh:
        results = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert list(results) == list(STRATEGIES)
    t = truth(sweep)
    for strategy, row in results.items():
        assert float(row["final_fid_mean"]) == pytest.approx(np.mean(t[strategy]["final"]), rel=1e-12)
        assert float(row["final_fid_std"]) == pytest.approx(np.std(t[strategy]["final"], ddof=1), rel=1e-12)
        assert float(row["images_per_sec"]) == pytest.approx(np.mean(t[strategy]["ips"]), rel=1e-12)
        assert row["baseline"] == str(strategy == "uniform") and row["seeds"] == "3"
    for c in summary["comparisons"]:
        assert float(results[c["strategy"]]["welch_p"]) == pytest.approx(c["p"], rel=1e-12)
        assert results[c["strategy"]]["verdict"] == c["verdict"]
    assert results["uniform"]["welch_p"] == "" and results["min_snr"]["failed_jobs"] == "1"
    with open(sweep / "report" / "jobs.csv") as fh:
        jobs = {r["job"]: r for r in csv.DictReader(fh)}
    assert len(jobs) == 10 and jobs["9_min_snr_seed3"]["state"] == "failed"
    assert jobs["9_min_snr_seed3"]["error"].startswith("RuntimeError: CUDA out of memory")
    assert float(jobs["0_uniform_seed0"]["final_fid"]) == pytest.approx(fid_at("uniform", 0, 1000))


def write_grid(job: Path, step: int, shade: int) -> None:
    from PIL import Image

    (job / "samples").mkdir(exist_ok=True)
    Image.new("L", (66, 66), shade).save(job / "samples" / f"step_{step:08d}.png")


def test_sample_grids_side_by_side(tmp_path):
    sweep = make_sweep(tmp_path)
    for job in sweep.iterdir():
        if job.is_dir():
            job.joinpath("config.yaml").write_text(job.joinpath("config.yaml").read_text() + "sample:\n  seed: 0\n")
            for step in (250, 500, 750, 1000):
                write_grid(job, step, 25 * int(job.name.split("_")[0]))
    os.remove(sweep / "3_min_snr_seed0" / "samples" / "step_00000250.png")   # 250: not every strategy has it
    report = run_report(sweep, figures=True)
    assert "](sample_grids.png)" in report
    caption = report.split("### Samples side by side", 1)[1].split("\n###", 1)[0]
    assert "(500, 750, 1000)" in caption and "training seed 0" in caption and "one sample seed (0)" in caption
    assert (sweep / "report" / "sample_grids.png").stat().st_size > 10_000
    # without a seed common to every strategy, each column is its smallest seed, and the caption says so
    for job in sweep.iterdir():
        if job.name in ("0_uniform_seed0", "2_uniform_seed2", "4_min_snr_seed1"):
            for png in (job / "samples").glob("*.png"):
                png.unlink()
    caption = run_report(sweep, figures=True).split("### Samples side by side", 1)[1].split("\n###", 1)[0]
    assert "no training seed is common to every strategy" in caption


def test_one_style_per_strategy_in_every_figure(tmp_path, monkeypatch):
    from diffrun.monitoring import plots
    from diffrun.reporting import figures

    known = plots.STRATEGY_ORDER
    all_styles = plots.strategy_styles(known)
    assert len({(str(s["color"]), s["ls"]) for s in all_styles.values()}) == len(known)
    assert plots.strategy_styles(["p2", "min_snr"])["min_snr"] == all_styles["min_snr"]
    odd = plots.strategy_styles(["mine_a", "mine_b", "uniform"])
    assert len({(str(s["color"]), s["ls"]) for s in odd.values()}) == 3
    assert plots.strategy_styles(["mine_a"])["mine_a"] == plots.strategy_styles(["mine_a", "uniform"])["mine_a"]

    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.__setitem__(path.name, fig))
    sweep = make_sweep(tmp_path)
    from diffrun.reporting.collect import collect_sweep
    from diffrun.reporting.stats import analyse

    figures.make_figures(analyse(collect_sweep(sweep)), tmp_path / "out")
    lines = {line.get_label().split(" (")[0]: line for line in drawn["fid_curves.png"].axes[0].get_lines()}
    for strategy in STRATEGIES:
        assert lines[strategy].get_color() == all_styles[strategy]["color"]
        assert lines[strategy].get_linestyle() == all_styles[strategy]["ls"]
    fig = plots.fig_density_weight([plots.load_run(j) for j in sorted(sweep.glob("*_seed0"))], "diffrun-plot")
    labelled = [line for line in fig.axes[1].get_lines() if not line.get_label().startswith("_")]
    assert sorted(line.get_label() for line in labelled) == sorted(STRATEGIES)
    for line in labelled:
        assert line.get_color() == all_styles[line.get_label()]["color"]
        assert line.get_linestyle() == all_styles[line.get_label()]["ls"]
