"""Samples/s of rollout.mode=async (1 actor + 1 learner, 1 thread each) against synchronous runs with the same
2 threads, on CPU, in one run (`make bench` runs it after bench.py).

    python scripts/bench_async.py                                # a2c on the embedded tiny model, ~2 min on 2 cores
    python scripts/bench_async.py --algorithm ppo --steps 24 --out bench/async.json

Three real CLI runs of the same work (same prompts, samples and response length; evaluation and checkpoints
out of the way):
- sync, 1 process x 2 threads: today's loop on the same total threads;
- sync, 2 ranks x 1 thread (torchrun, DDP): each rank generates and trains half the batch;
- async, 1 actor + 1 learner x 1 thread (torchrun, rollout.max_lag=1): the actor generates step s while the
  learner trains on step s - 1.
Samples/s count the steps after the first `--warmup` (their wall time from metrics.jsonl's time_s); the wait
of each side is the median over those steps of the learner's wait for its batch (time_rollout_frac of its
step) and the actor's wait for weights (async_actor_wait_s). The GPU figure is a prediction from the sync
run's measured split between generation + scoring (g) and the update (u): 2 GPUs as actor + learner do a
step in max(g, u), and 2 GPUs in DDP in g + u / 2 when decoding at half the batch takes as long as at the
full batch (decoding is latency-bound at RLHF batch sizes), so the predicted ratio is (g + u/2) / max(g, u).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORK = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=24",
        "eval.every=100000", "checkpoint.every=100000", "log_every=1", "data.num_eval=4", "eval.max_new_tokens=4",
        "device=cpu"]


def run(kind: str, out: Path, algorithm: str, steps: int) -> float:
    """One run of `kind` into `out` -> its wall time in seconds (start-up included)."""
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    args = ["rl", f"output_dir={out}", f"algorithm={algorithm}", f"max_steps={steps}", *WORK]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "rlhf_cli"]
    command = {"sync_1x2": [sys.executable, "-m", "rlhf_cli", *args, "device.threads=2"],
               "sync_ddp_2x1": [*torchrun, *args, "device.threads=1"],
               "async_1+1": [*torchrun, *args, "device.threads=1", "rollout.mode=async", "rollout.max_lag=1"]}[kind]
    if kind == "sync_1x2":
        env["OMP_NUM_THREADS"] = "2"
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def figures(run_dir: Path, warmup: int, rows_per_step: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steady = train[warmup:]
    seconds = steady[-1]["time_s"] - train[warmup - 1]["time_s"]
    median = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else None  # noqa: E731
    step_s = seconds / len(steady)
    out = {"samples_per_s": rows_per_step * len(steady) / seconds, "step_s": step_s,
           "generate_score_frac": median("time_rollout_frac") + median("time_score_frac"),
           "update_frac": median("time_update_frac")}
    if "async_lag" in steady[0]:
        out |= {"learner_wait_s": median("async_learner_wait_s"), "learner_wait_frac": median("time_rollout_frac"),
                "actor_wait_s": median("async_actor_wait_s"), "actor_busy_frac": median("async_actor_busy_frac"),
                "actor_generate_s": median("async_actor_generate_s"), "actor_score_s": median("async_actor_score_s"),
                "lag": median("async_lag")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", default="a2c")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs, interleaved (a busy "
                        "machine drifts: each figure is the median over rounds)")
    parser.add_argument("--out", default="bench/async.json")
    args = parser.parse_args()
    rows_per_step = 8 * 4
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for kind in ("sync_1x2", "sync_ddp_2x1", "async_1+1"):
                out = Path(tmp) / f"{kind}-{round_}"
                wall = run(kind, out, args.algorithm, args.steps)
                rounds.setdefault(kind, []).append(figures(out, args.warmup, rows_per_step) | {"wall_s": wall})
                print(f"{kind:>13}: {rounds[kind][-1]['samples_per_s']:7.1f} samples/s  " + "  ".join(
                    f"{k}={v:.3g}" for k, v in rounds[kind][-1].items() if k != "samples_per_s"), flush=True)
    results = {kind: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for kind, runs in rounds.items()}
    sync = results["sync_1x2"]
    g, u = sync["generate_score_frac"], sync["update_frac"]
    report = {
        "algorithm": args.algorithm, "steps": args.steps, "warmup": args.warmup, "work": WORK, "runs": results, "rounds": rounds,
        "async_vs_sync_1x2": results["async_1+1"]["samples_per_s"] / sync["samples_per_s"],
        "async_vs_sync_ddp_2x1": results["async_1+1"]["samples_per_s"] / results["sync_ddp_2x1"]["samples_per_s"],
        "ideal_cpu_ratio": (g + u) / max(g, u),  # one process's step vs a perfect overlap of its two halves
        "predicted_gpu_ratio_vs_ddp": (g + u / 2) / max(g, u),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
    }
    print(f"async / sync (1 process x 2 threads): {report['async_vs_sync_1x2']:.2f}x; async / sync DDP (2 x 1): "
          f"{report['async_vs_sync_ddp_2x1']:.2f}x; generation+scoring {g:.0%} / update {u:.0%} of a sync step: "
          f"ideal overlap {report['ideal_cpu_ratio']:.2f}x, predicted on 2 GPUs vs DDP {report['predicted_gpu_ratio_vs_ddp']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
