"""The whole pipeline on the embedded default: sft -> train-rm -> rl, chained by path.

    python scripts/demo.py                     # what `make demo` runs (CPU, a few minutes)
    python scripts/demo.py --algorithm a2c --reward rule

Each stage is the real CLI in a subprocess; rerunning resumes (finished stages
only rewrite their final/). Ends with one table and writes RUNS/demo.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def stage(console: Console, name: str, *overrides: str) -> float:
    console.rule(f"rlhf {name} {' '.join(overrides)}")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "rlhf_cli", name, *overrides])
    if proc.returncode != 0:
        console.print(f"[red]rlhf {name} failed with exit code {proc.returncode}")
        sys.exit(proc.returncode)
    return time.time() - t0


def manifest(run: Path) -> dict:
    return json.loads((run / "final" / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="directory for the three run dirs")
    parser.add_argument("--algorithm", default="ppo", choices=["reinforce", "a2c", "ppo"])
    parser.add_argument("--reward", default="rule_rm", choices=["rule", "rm", "rule_rm"])
    args = parser.parse_args()
    console = Console()
    runs = Path(args.runs)
    sft_dir, rm_dir, rl_dir = runs / "sft", runs / "rm", runs / f"rl-{args.algorithm}-{args.reward}"

    t0 = time.time()
    minutes = {"sft": stage(console, "sft", f"output_dir={sft_dir}")}
    minutes["train-rm"] = stage(console, "train-rm", f"model.path={sft_dir / 'final'}", f"output_dir={rm_dir}")
    rl_reward = [f"reward={args.reward}"] + ([f"reward.model.path={rm_dir / 'final'}"] if args.reward != "rule" else [])
    minutes["rl"] = stage(console, "rl", f"algorithm={args.algorithm}", f"policy.path={sft_dir / 'final'}",
                          *rl_reward, f"output_dir={rl_dir}")
    total = time.time() - t0

    sft, rm, rl = manifest(sft_dir), manifest(rm_dir), manifest(rl_dir)
    summary = {
        "sft_accuracy_before": sft["metrics_before"].get("eval_accuracy"),
        "sft_accuracy": sft["metrics"]["eval_accuracy"],
        "rm_pairwise_accuracy": rm["metrics"]["eval_accuracy"],
        "rl_accuracy": rl["metrics"]["eval_accuracy"],
        "algorithm": args.algorithm, "reward": args.reward,
        "seconds": {k: round(v, 1) for k, v in minutes.items()}, "total_seconds": round(total, 1),
    }
    table = Table(title="rlhf demo: held-out results on the embedded task")
    table.add_column("stage")
    table.add_column("held-out metric")
    table.add_column("value", justify="right")
    table.add_column("wall time (s)", justify="right")
    table.add_row("sft", "accuracy (greedy, rule)", f"{summary['sft_accuracy_before']:.1%} -> {summary['sft_accuracy']:.1%}",
                  f"{minutes['sft']:.0f}")
    table.add_row("train-rm", "pairwise accuracy", f"{summary['rm_pairwise_accuracy']:.1%}", f"{minutes['train-rm']:.0f}")
    table.add_row(f"rl ({args.algorithm}, reward={args.reward})", "accuracy (greedy, rule)",
                  f"{summary['sft_accuracy']:.1%} -> {summary['rl_accuracy']:.1%}", f"{minutes['rl']:.0f}")
    table.add_row("total", "", "", f"{total:.0f}")
    console.print(table)
    (runs / "demo.json").write_text(json.dumps(summary, indent=2))
    plot = runs / "curves.png"  # loss, reward, KL, accuracy and length curves of the three stages
    subprocess.run([sys.executable, "-m", "rlhf_cli", "plot", str(sft_dir), str(rm_dir), str(rl_dir), "-o", str(plot)],
                   check=True)
    console.print(f"curves: {plot}")


if __name__ == "__main__":
    main()
