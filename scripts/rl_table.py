"""RL on the embedded default: each algorithm x reward source, from one SFT and one RM run.

    python scripts/rl_table.py --runs runs      # needs runs/sft/final and runs/rm/final (make demo makes them)

Prints a markdown table (held-out greedy accuracy before -> after, wall time)
and writes RUNS/rl_table-rule-rm.json (`--rewards rule`: RUNS/rl_table-rule.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rewards", default="rule,rm", help="reward sources: rule, rm or both")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run, e.g. device.threads=1")
    args = parser.parse_args()
    runs = Path(args.runs)
    sft, rm = runs / "sft" / "final", runs / "rm" / "final"
    rows = []
    for reward in args.rewards.split(","):
        for algorithm in ("reinforce", "a2c", "ppo"):
            out = runs / "table" / f"{algorithm}-{reward}-seed{args.seed}"
            extra = [f"reward.model.path={rm}"] if reward == "rm" else []
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "rlhf_cli", "rl", f"algorithm={algorithm}", f"reward={reward}",
                            f"policy.path={sft}", f"output_dir={out}", f"seed={args.seed}", *extra, *args.overrides],
                           check=True, capture_output=True)
            manifest = json.loads((out / "final" / "manifest.json").read_text())
            rows.append({"algorithm": algorithm, "reward": reward,
                         "before": manifest["metrics_before"]["eval_accuracy"],
                         "after": manifest["metrics"]["eval_accuracy"], "minutes": (time.time() - t0) / 60})
            r = rows[-1]
            print(f"| {algorithm} | {reward} | {r['before']:.1%} | {r['after']:.1%} | {r['minutes']:.1f} |", flush=True)
    (runs / f"rl_table-{args.rewards.replace(',', '-')}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    print("| algorithm | reward | held-out accuracy before (SFT) | after RL | minutes |\n|---|---|---|---|---|")
    main()
