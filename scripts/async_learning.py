"""Held-out accuracy against wall time: rollout.mode=async (1 actor + 1 learner x 1 thread) vs sync (1 process x
2 threads), A2C and PPO, from the demo's SFT checkpoint against the rule reward (docs/async.md's curve).

    python scripts/async_learning.py --sft runs/sft/final                       # after `make demo`; ~5 min on 2 cores
    python scripts/async_learning.py --sft runs/sft/final --algorithms a2c --steps 40 --out runs/async_learning

Each run is the real CLI with the stage's defaults (16 prompts x 8 samples a step, rollout.max_lag=1 for async),
evaluating every `--eval-every` steps; the curve puts each evaluation at the run's own clock (metrics.jsonl's
time_s), so evaluation time counts on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run(mode: str, algorithm: str, args, out: Path) -> list[tuple[int, float, float]]:
    """-> [(step, seconds since start, held-out accuracy)] of one run."""
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "OMP_NUM_THREADS": "2" if mode == "sync" else "1"}
    common = ["rl", f"output_dir={out}", f"policy.path={args.sft}", f"algorithm={algorithm}",
              f"max_steps={args.steps}", f"eval.every={args.eval_every}", f"seed={args.seed}", "checkpoint.every=100000", "device=cpu"]
    command = ([sys.executable, "-m", "rlhf_cli", *common, "device.threads=2"] if mode == "sync" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "rlhf_cli",
                *common, "device.threads=1", "rollout.mode=async", *args.async_set])
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} {algorithm} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["time_s"], r["eval_accuracy"]) for r in rows if r["kind"] == "eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT final/ to start from (make demo: runs/sft/final)")
    parser.add_argument("--algorithms", default="a2c,ppo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/async_learning")
    parser.add_argument("--async-set", nargs="*", default=[], help="overrides for the async runs, e.g. rollout.rho_max=2")
    parser.add_argument("--png", default="docs/images/async_learning.png")
    args = parser.parse_args()
    out = Path(args.out)
    curves = {}
    for algorithm in args.algorithms.split(","):
        for mode in ("sync", "async"):
            curves[f"{algorithm} {mode}"] = run(mode, algorithm, args, out / f"{algorithm}-{mode}")
            step, seconds, accuracy = curves[f"{algorithm} {mode}"][-1]
            print(f"{algorithm} {mode}: {accuracy:.1%} after {step} steps, {seconds:.1f} s", flush=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = args.algorithms.split(",")
    fig, axes = plt.subplots(1, len(algorithms), figsize=(5 * len(algorithms), 3.6), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        for mode, style in (("sync", "o-"), ("async", "s-")):
            points = curves[f"{algorithm} {mode}"]
            label = "sync, 1 process x 2 threads" if mode == "sync" else "async, 1 actor + 1 learner"
            ax.plot([p[1] for p in points], [100 * p[2] for p in points], style, markersize=3, label=label)
        ax.set_title(f"{algorithm}: held-out accuracy (embedded task, rule reward)")
        ax.set_xlabel("wall time (s), 2 CPU threads")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"curve: {args.png}")


if __name__ == "__main__":
    main()
