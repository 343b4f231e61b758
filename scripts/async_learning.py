"""Held-out accuracy against wall time: rollout.mode=async (1 actor + 1 learner x 1 thread) vs sync (1 process x
2 threads), A2C and PPO, from the demo's SFT checkpoint against the rule reward (docs/async.md's curve).

    python scripts/async_learning.py --sft runs/sft/final                       # after `make demo`; ~5 min on 2 cores
    python scripts/async_learning.py --sft runs/sft/final --algorithms a2c --steps 40 --out runs/async_learning
    python scripts/async_learning.py --sft runs/sft/final --seeds 0,1,2,3,4,5 --async-steps 50
        # six seeds, one table (RUNS/summary.md): when each side first reached 98%, and async's accuracy at its
        # last evaluation within sync's whole wall time (the budget; ~10 min on 2 cores)

Each run is the real CLI with the stage's defaults (16 prompts x 8 samples a step, rollout.max_lag=1 for async)
except dynamic sampling, which async mode does not support yet: it is off on both sides, so the two differ in
asynchrony alone. Each run evaluates every `--eval-every` steps; the curve puts each evaluation at the run's
own clock (metrics.jsonl's time_s), so evaluation time counts on both sides alike.
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
    steps = args.async_steps if mode == "async" and args.async_steps else args.steps
    common = ["rl", f"output_dir={out}", f"policy.path={args.sft}", f"algorithm={algorithm}",
              f"max_steps={steps}", f"eval.every={args.eval_every}", f"seed={args.seed}", "checkpoint.every=100000", "device=cpu",
              "algorithm.dynamic_sampling=false"]  # both sides alike: async does not redraw yet (docs/async.md)
    command = ([sys.executable, "-m", "rlhf_cli", *common, "device.threads=2", *args.sync_set] if mode == "sync" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "rlhf_cli",
                *common, "device.threads=1", "rollout.mode=async", *args.async_set])
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} {algorithm} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["time_s"], r["eval_accuracy"]) for r in rows if r["kind"] == "eval"]


def summary(sync: list, asyn: list, threshold: float) -> dict:
    """One seed's sync and async curves -> when each first reached `threshold`, its lowest evaluation after that,
    and async's accuracy at the last evaluation within sync's whole wall time (its budget)."""
    def first(points):
        return next(((s, t) for s, t, a in points if a >= threshold), None)

    def lowest_after(points):
        hit = first(points)
        return min(a for s, t, a in points if s >= hit[0]) if hit else None

    budget = sync[-1][1]
    within = [p for p in asyn if p[1] <= budget]
    return {"sync_first": first(sync), "async_first": first(asyn), "sync_low": lowest_after(sync),
            "async_low": lowest_after(asyn), "sync_final": sync[-1], "async_at_budget": within[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT final/ to start from (make demo: runs/sft/final)")
    parser.add_argument("--algorithms", default="a2c,ppo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="several seeds, e.g. 0,1,2,3,4,5: a table of them (summary.md)")
    parser.add_argument("--async-steps", type=int, default=None, help="async runs this many steps (default --steps): "
                        "to read async's accuracy at sync's whole wall time")
    parser.add_argument("--threshold", type=float, default=0.98)
    parser.add_argument("--out", default="runs/async_learning")
    parser.add_argument("--async-set", nargs="*", default=[], help="overrides for the async runs, e.g. rollout.rho_max=2")
    parser.add_argument("--sync-set", nargs="*", default=[], help="overrides for the sync runs, e.g. algorithm.epochs=1")
    parser.add_argument("--modes", default="sync,async", help="which runs to make (sync, async or both)")
    parser.add_argument("--png", default="docs/images/async_learning.png")
    args = parser.parse_args()
    if args.seeds:
        several_seeds(args)
    else:
        one_seed(args)


def one_seed(args) -> None:
    """Each algorithm's runs for args.seed -> OUT/curves.json and the PNG."""
    out = Path(args.out)
    curves = {}
    for algorithm in args.algorithms.split(","):
        for mode in args.modes.split(","):
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
            if f"{algorithm} {mode}" not in curves:
                continue
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


def several_seeds(args) -> None:
    """Each seed's sync and async runs (the first seed's curve drawn), then one table: RUNS/summary.md."""
    lines = [f"| algorithm | seed | sync first >= {args.threshold:.0%} | async first | sync lowest after | async lowest "
             f"after | sync after {args.steps} steps | async at sync's wall time |", "|" + "---|" * 8]
    seeds, root, png = [int(x) for x in args.seeds.split(",")], Path(args.out), args.png
    for i, seed in enumerate(seeds):
        args.seed, args.seeds, args.out = seed, None, str(root / f"seed{seed}")
        args.png = png if i == 0 else str(root / f"seed{seed}.png")
        one_seed(args)
        curves = json.loads((root / f"seed{seed}" / "curves.json").read_text())
        for algorithm in args.algorithms.split(","):
            r = summary(curves[f"{algorithm} sync"], curves[f"{algorithm} async"], args.threshold)
            hit = lambda h: f"{h[1]:.1f} s (step {h[0]})" if h else "never"
            low = lambda v: f"{v:.1%}" if v is not None else "-"
            lines.append(f"| {algorithm} | {seed} | {hit(r['sync_first'])} | {hit(r['async_first'])} | {low(r['sync_low'])} "
                         f"| {low(r['async_low'])} | {r['sync_final'][2]:.1%} ({r['sync_final'][1]:.1f} s) | "
                         f"{r['async_at_budget'][2]:.1%} (step {r['async_at_budget'][0]}, {r['async_at_budget'][1]:.1f} s) |")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
