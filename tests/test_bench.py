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
