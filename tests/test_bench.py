"""`make bench` and the step profile run end to end on the tiny model and report figures that make sense."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # about a minute: five stage processes, each measuring the matmul peak
def test_bench_reports_every_stage(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--sizes", "tiny", "--steps", "4",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    tiny = results["sizes"]["tiny"]
    assert results["machine"]["matmul_peak_gflops"] > 0
    for stage in ("sft", "rm"):
        assert 0 < tiny[f"{stage}_mfu"] < 1.5, tiny  # a fraction of a peak measured in the same run
    for algorithm in ("reinforce", "a2c", "ppo"):
        assert tiny[f"rl_{algorithm}_samples_per_s"] > 0
        shares = [tiny[f"rl_{algorithm}_time_{part}_frac"] for part in ("rollout", "score", "update")]
        assert abs(sum(shares) - 1) < 0.05 and min(shares) > 0, shares
    assert "sft tokens/s" in proc.stdout  # the table


def test_profile_steps_buckets_each_step(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_steps.py"), "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 5, proc.stdout
    for row in rows:  # wall ms, then four shares that add up to about 100%
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert float(cells[1]) > 0
        assert abs(sum(int(c.rstrip("%")) for c in cells[2:]) - 100) <= 3, row


def test_profile_rl_times_each_part_of_real_steps(tmp_path, tiny_model_dir):
    """The real recipe's steps, timed by part: every part the step runs is there, and the parts add up to it."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_rl.py"), "--model", str(tiny_model_dir),
                           "--steps", "3", "--threads", "1", "--out", str(out), "--", "algorithm=ppo",
                           "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
                           "data.num_train=16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    seconds = report["seconds_per_step"]
    assert report["steps_counted"] == 2
    # PPO (two epochs, fp32): the sampler's log-probs are the old ones, the critic's values a no-grad forward;
    # then forwards and backwards with gradients
    for part in ("sampling", "rewards", "reference forward", "old log-probs forward", "update forward", "backward",
                 "optimizer step"):
        assert seconds[part] > 0, (part, seconds)
    assert abs(sum(v for k, v in seconds.items() if k != "step") - seconds["step"]) < 1e-6 * seconds["step"] + 1e-9
    assert seconds["rest (between the parts)"] >= -1e-6
    assert "old log-probs forward" in proc.stdout  # the table
    # model FLOPs: the old log-probs forward runs the critic alone (a body as large as the reference's, rows
    # whole, no LM head): the policy's log-probs come from the sampler, so less than the policy and critic both
    gflop = report["gflop_per_step"]
    assert 0 < gflop["old log-probs forward"] < 2 * gflop["reference forward"]
    assert gflop["backward"] == pytest.approx(2 * gflop["update forward"]) and gflop["update forward"] > 0
    assert gflop["step"] == pytest.approx(sum(v for k, v in gflop.items() if k != "step"))
    assert report["matmul_peak_gflops"] > 0 and 0 < report["step_of_peak"] < report["update_of_peak"] < 1


@pytest.mark.slow  # about 40 s: three short runs (one process, two torchruns)
def test_bench_async_compares_async_with_both_sync_runs(tmp_path):
    out = tmp_path / "async.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_async.py"), "--steps", "6", "--warmup", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert set(runs) == {"sync_1x2", "sync_ddp_2x1", "async_1+1"}
    assert all(r["samples_per_s"] > 0 for r in runs.values())
    assert report["async_vs_sync_1x2"] == runs["async_1+1"]["samples_per_s"] / runs["sync_1x2"]["samples_per_s"]
    actor = runs["async_1+1"]
    assert actor["lag"] == 1 and 0 < actor["actor_busy_frac"] <= 1 and actor["learner_wait_s"] >= 0
    assert 1 <= report["ideal_cpu_ratio"] <= 2 and report["predicted_gpu_ratio_vs_ddp"] > 0
    assert "async / sync (1 process x 2 threads)" in proc.stdout


def test_async_learning_summary_reads_the_threshold_and_the_budget():
    """scripts/async_learning.py's per-seed row: first evaluation at or past the threshold, the lowest one after
    it, and async's last evaluation within sync's whole wall time (hand-made curves: (step, seconds, accuracy))."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("async_learning", REPO / "scripts" / "async_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sync = [(0, 0.1, 0.3), (2, 2.0, 0.99), (4, 4.0, 0.97), (6, 6.0, 1.0)]
    asyn = [(0, 0.1, 0.3), (2, 1.0, 0.9), (4, 2.0, 0.98), (6, 3.0, 0.85), (8, 6.0, 1.0), (10, 7.5, 1.0)]
    r = module.summary(sync, asyn, 0.98)
    assert r["sync_first"] == (2, 2.0) and r["async_first"] == (4, 2.0)
    assert r["sync_low"] == 0.97 and r["async_low"] == 0.85
    assert r["sync_final"] == (6, 6.0, 1.0) and r["async_at_budget"] == (8, 6.0, 1.0)  # step 10 is past 6.0 s
    assert module.summary(sync, asyn[:2], 0.98)["async_first"] is None and module.summary(sync, asyn[:2], 0.98)["async_low"] is None
