"""How sure a comparison is: the power of Welch's test, the minimum detectable difference, the seeds needed, the
three verdicts, and the false-positive rate from relabellings — against textbook values, the normal
approximation, simulation and brute force, all computed here without the reporting code's helpers."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from diffrun.reporting.cli import main as report_main
from diffrun.reporting.significance import min_detectable_difference, relabel_false_positive_rate, seeds_needed, welch_power
from diffrun.reporting.stats import compare


def with_mean_and_sd(mean: float, sd: float, n: int) -> list[float]:
    """n values whose sample mean and sample standard deviation (ddof = 1) are exactly `mean` and `sd`."""
    z = np.linspace(-1.0, 1.0, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return list(mean + sd * z)


# ------------------------------------------------------------------------------------------------
# power, minimum detectable difference, seeds needed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, n", [(1.0, 17), (0.8, 26), (0.5, 64)])
def test_seeds_needed_matches_the_textbook(d, n):
    # Cohen (1988), Table 2.4.1: two-sided α = 0.05, power 0.80, equal groups: d = 0.8 → 26, 0.5 → 64; d = 1 → 17
    assert seeds_needed(d, 1.0, 1.0, limit=1000) == n
    assert seeds_needed(3.0 * d, 3.0, 3.0, limit=1000) == n          # only the effect size d = Δ/σ matters
    assert seeds_needed(d, 1.0, 1.0, limit=n - 1) is None             # past the limit: None


def test_minimum_detectable_difference_against_the_normal_approximation():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    # with many seeds the t distribution is the normal one: Δ = (z_{1−α/2} + z_{power}) · se
    for s1, n1, s2, n2 in [(1.0, 400, 1.0, 400), (2.0, 300, 0.5, 500)]:
        se = math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2)
        assert min_detectable_difference(s1, n1, s2, n2) == pytest.approx(z * se, rel=5e-3)
    # with few seeds it is larger (heavier tails): d = 1 needs 17 per arm, so with 17 the MDD is just under 1
    assert 0.98 < min_detectable_difference(1.0, 17, 1.0, 17) < 1.0 < min_detectable_difference(1.0, 16, 1.0, 16)
    mdd = min_detectable_difference(3.0, 6, 1.5, 9)
    assert welch_power(mdd, 3.0, 6, 1.5, 9) == pytest.approx(0.80, abs=1e-9)


def test_power_against_simulated_welch_tests():
    # unequal spreads and seed counts: the fraction of simulated Welch tests with p < 0.05 (scipy's own test)
    rng = np.random.default_rng(0)
    trials = 20_000
    for diff, s1, n1, s2, n2 in [(2.0, 1.0, 6, 2.0, 8), (1.0, 1.0, 6, 1.0, 6)]:
        a = rng.normal(diff, s1, (trials, n1))
        b = rng.normal(0.0, s2, (trials, n2))
        simulated = np.mean(stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05)
        # the noncentral-t formula takes the spreads as known; Welch's test estimates them: agreement within 0.03
        assert welch_power(diff, s1, n1, s2, n2) == pytest.approx(simulated, abs=0.03)


# ------------------------------------------------------------------------------------------------
# the three verdicts
# ------------------------------------------------------------------------------------------------
def test_three_verdicts_on_known_per_seed_numbers():
    base = with_mean_and_sd(50.0, 2.0, 6)
    # Δ = −3σ with 6 seeds: t = 3/√(2/6) = 5.2, p < 0.001
    shown = compare("a", with_mean_and_sd(44.0, 2.0, 6), "uniform", base, "final FID")
    assert shown.verdict_kind == "shown" and shown.verdict.startswith("shown: better (lower final FID, p = ")
    assert compare("a", with_mean_and_sd(56.0, 2.0, 6), "uniform", base, "final FID").verdict.startswith("shown: worse")
    # Δ = −1σ: t = 1.73, p = 0.11, and d = 1 needs 17 seeds per arm
    under = compare("a", with_mean_and_sd(48.0, 2.0, 6), "uniform", base, "final FID")
    assert under.p == pytest.approx(stats.ttest_ind(with_mean_and_sd(48.0, 2.0, 6), base, equal_var=False).pvalue)
    assert under.verdict_kind == "underpowered" and under.seeds_needed == 17
    assert under.verdict == "underpowered (needs ≈ 17 seeds per arm)"
    # Δ = −0.2σ would need 394 per arm: more than the limit of 30 → not shown
    assert seeds_needed(0.2, 1.0, 1.0, limit=1000) == 394
    tiny = compare("a", with_mean_and_sd(49.6, 2.0, 6), "uniform", base, "final FID")
    assert tiny.verdict_kind == "not shown" and tiny.seeds_needed is None
    assert tiny.verdict == "not shown (the observed Δ would need > 30 seeds per arm)"
    assert compare("a", with_mean_and_sd(49.6, 2.0, 6), "uniform", base, "final FID", max_seeds=400).seeds_needed == 394
    # the minimum detectable difference of 6 vs 6 seeds with σ = 2 (d = 1.75 by the noncentral t)
    assert under.mdd == pytest.approx(min_detectable_difference(2.0, 6, 2.0, 6)) and 3.4 < under.mdd < 3.6
    equal = compare("a", with_mean_and_sd(50.0, 1.0, 6), "uniform", base, "final FID")
    assert equal.verdict == "not shown (equal means)"


# ------------------------------------------------------------------------------------------------
# false-positive rate from relabellings
# ------------------------------------------------------------------------------------------------
def test_relabelling_rate_is_every_split_by_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 6), rng.normal(0, 3, 6)
    rate, splits, exact = relabel_false_positive_rate(a, b)
    pooled = np.concatenate([a, b])
    hits = 0
    for first in itertools.combinations(range(12), 6):
        rest = [i for i in range(12) if i not in first]
        hits += stats.ttest_ind(pooled[list(first)], pooled[rest], equal_var=False).pvalue < 0.05
    assert exact and splits == math.comb(12, 6) == 924
    assert rate == hits / 924


def test_relabelling_rate_of_one_distribution_is_near_alpha():
    rng = np.random.default_rng(7)
    values = rng.normal(0, 1, 40)
    rate, splits, exact = relabel_false_positive_rate(values[:20], values[20:], splits=4000)
    assert not exact and splits == 4000
    assert 0.03 < rate < 0.07
    # two clearly different arms: most relabellings mix them, the original split (and few others) is "shown"
    far, far_splits, _ = relabel_false_positive_rate(list(range(6)), [x + 100 for x in range(6)])
    assert far_splits == 924 and 0 < far < 0.5
    assert math.isnan(relabel_false_positive_rate([1.0], [2.0, 3.0])[0])


# ------------------------------------------------------------------------------------------------
# in the report: Markdown, results.csv, summary.json, --calibrate, --max-seeds
# ------------------------------------------------------------------------------------------------
def write_job(sweep: Path, num: int, strategy: str, seed: int, fids: list[float]) -> None:
    job = sweep / f"{num}_{strategy}_seed{seed}"
    job.mkdir(parents=True)
    job.joinpath("config.yaml").write_text(
        f"seed: {seed}\nsweep_name: aa\ntrain:\n  steps: 300\n  batch_size: 32\n"
        f"report:\n  baseline: arm_a\n  target_fid: 100\nmodel:\n  prediction: eps\nweighting:\n  name: {strategy}\n")
    lines = [{"step": 100, "loss": 0.1, "images_per_sec": 100.0}]
    lines += [{"step": 100 * (i + 1), "fid": f, "fid_num_samples": 50} for i, f in enumerate(fids)]
    job.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    job.joinpath("status.json").write_text(json.dumps({"state": "finished", "step": 300, "total_steps": 300}))


def make_aa_sweep(root: Path) -> tuple[Path, dict]:
    """Two arms, six seeds each; each seed's FID at steps 100, 200, 300 (the final FID known per arm)."""
    sweep = root / "aa"
    curves = {"arm_a": [[140, 105 + s, 90 + s] for s in (0, 3, 1, 4, 2, 5)],
              "arm_b": [[140, 95 + 2 * s, 88 + 2 * s] for s in (0, 3, 1, 4, 2, 5)]}
    num = 0
    for arm, rows in curves.items():
        for seed, fids in enumerate(rows):
            write_job(sweep, num, arm, seed if arm == "arm_a" else seed + 6, fids)
            num += 1
    return sweep, curves


def test_report_prints_power_and_verdicts_everywhere(tmp_path):
    sweep, curves = make_aa_sweep(tmp_path)
    assert report_main([str(sweep), "--no-figures", "--calibrate"]) == 0
    out = sweep / "report"
    text = (out / "report.md").read_text()
    final = {arm: [c[-1] for c in rows] for arm, rows in curves.items()}
    steps = {arm: [100 * (next(i for i, f in enumerate(c) if f <= 100) + 1) for c in rows] for arm, rows in curves.items()}
    ref = stats.ttest_ind(final["arm_b"], final["arm_a"], equal_var=False)
    mdd = min_detectable_difference(np.std(final["arm_b"], ddof=1), 6, np.std(final["arm_a"], ddof=1), 6)
    summary = json.loads((out / "summary.json").read_text())
    (fid,), (step,) = summary["comparisons"], summary["step_comparisons"]
    assert fid["p"] == pytest.approx(ref.pvalue, rel=1e-12) and fid["min_detectable_diff"] == pytest.approx(mdd)
    assert fid["verdict_kind"] in ("underpowered", "not shown") and fid["verdict"] in text
    assert f"{mdd:.3g}" in text
    # steps to FID ≤ 100: arm_a reaches it at 300 (105 + s > 100 at 200), arm_b at 200 or 300 (95 + 2s)
    assert step["n"] == len(steps["arm_b"]) and step["diff"] == pytest.approx(np.mean(steps["arm_b"]) - np.mean(steps["arm_a"]))
    assert "## Steps to the target FID (≤ 100) against the baseline (arm_a)" in text
    with open(out / "results.csv") as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert float(rows["arm_b"]["min_detectable_diff"]) == pytest.approx(mdd)
    assert rows["arm_b"]["verdict_kind"] == fid["verdict_kind"] and rows["arm_b"]["steps_verdict"] == step["verdict"]
    assert rows["arm_a"]["verdict"] == "" and rows["arm_a"]["steps_verdict"] == ""
    # --calibrate: every one of the 924 relabellings of the 12 final FIDs
    rate, splits, _ = relabel_false_positive_rate(final["arm_b"], final["arm_a"])
    assert fid["false_positive_rate"] == {"rate": pytest.approx(rate), "splits": 924, "exact": True}
    assert float(rows["arm_b"]["false_positive_rate"]) == pytest.approx(rate)
    assert "## Calibration: false-positive rate from relabellings" in text and f"| {rate:.3f} |" in text


def test_max_seeds_moves_the_line_between_underpowered_and_not_shown(tmp_path, capsys):
    sweep, _ = make_aa_sweep(tmp_path)
    kinds = {}
    for limit in ("2", "1000"):
        assert report_main([str(sweep), "--no-figures", "--max-seeds", limit]) == 0
        kinds[limit] = json.loads((sweep / "report" / "summary.json").read_text())["comparisons"][0]
    assert kinds["2"]["verdict_kind"] == "not shown" and kinds["1000"]["verdict_kind"] == "underpowered"
    assert report_main([str(sweep), "--no-figures", "--max-seeds", "1"]) == 1
    assert "--max-seeds 1: a t-test needs at least 2 seeds per arm" in capsys.readouterr().err
    assert report_main([str(sweep), "--no-figures", "--wandb-summary", "no-slash"]) == 1
    assert "--wandb-summary 'no-slash': expected ENTITY/PROJECT" in capsys.readouterr().err


@pytest.mark.slow
def test_wandb_summary_scalars_in_an_offline_run(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep, _ = make_aa_sweep(tmp_path)
    assert report_main([str(sweep), "--no-figures", "--wandb-summary", "me/diffrun"]) == 0
    log = next((sweep / "report" / "wandb").glob("offline-run-*/run-*.wandb"))
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "WANDB_DIR": str(tmp_path)})
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    scalars = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["display_name"] == "aa-report" and run["run_group"] == "aa" and run["job_type"] == "report"
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    for key, comparison in (("final_fid", summary["comparisons"][0]), ("steps_to_target", summary["step_comparisons"][0])):
        prefix = f"report/arm_b/{key}"
        assert scalars[f"{prefix}/p"] == pytest.approx(comparison["p"])
        assert scalars[f"{prefix}/min_detectable_diff"] == pytest.approx(comparison["min_detectable_diff"])
        assert scalars[f"{prefix}/verdict"] == comparison["verdict"]
        assert scalars[f"{prefix}/shown"] == int(comparison["verdict_kind"] == "shown")
    assert scalars["report/arm_b/steps_to_target/seeds_needed"] == summary["step_comparisons"][0]["seeds_needed"]


def test_calibration_preset_arms_differ_only_in_label_and_seed():
    from omegaconf import OmegaConf

    from conftest import compose_config

    even, odd = (compose_config(["experiment=calibration", f"seed={seed}"], fast=False) for seed in (4, 7))
    assert (even.weighting.name, odd.weighting.name) == ("uniform_even", "uniform_odd")
    assert even.report.baseline == "uniform_even"
    plain = [OmegaConf.to_container(cfg, resolve=True) for cfg in (even, odd)]
    for cfg in plain:
        cfg.pop("seed"), cfg.pop("name"), cfg["weighting"].pop("name")
        cfg.pop("callbacks")                          # their settings repeat the keys above (the strategy's name)
    assert plain[0] == plain[1]
    seeds = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/experiment/calibration.yaml").hydra.sweeper.params.seed
    assert seeds == "range(0,12)"                     # six seeds per arm
