"""GRPO-style against DAPO-style options on the embedded task (issue 20): greedy accuracy, pass@8, maj@8.

    python scripts/reasoning_table.py --sft runs/sft/final --runs runs/reasoning device.threads=1

From one SFT final/ (make demo makes runs/demo/sft/final), evaluated by sampling (`rlhf eval
eval.samples=8`), then two RL runs with the rule reward, each evaluated the same way:

    GRPO-style   algorithm=reinforce, baseline=group_norm_unbiased (K-1 std), seq-mean-token-mean loss,
                 kl.coef as defaulted; one on-policy pass per rollout (GRPO with mu=1: ratio 1, so its
                 clipped objective's gradient is this one)
    DAPO-style   the same with token-mean loss, dynamic sampling, overlong shaping over the last 16 of
                 rollout.max_new_tokens, kl.coef 0 (clip-higher needs several passes per rollout, i.e.
                 the ppo recipe with its critic, so it is not in this pair)

Prints a markdown table (and RUNS/reasoning_table.json): samples used, wall time, and the three accuracies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GRPO = ["algorithm=reinforce", "algorithm.baseline=group_norm_unbiased", "algorithm.loss_agg=seq-mean-token-mean"]
DAPO = ["algorithm=reinforce", "algorithm.baseline=group_norm_unbiased", "algorithm.loss_agg=token-mean",
        "algorithm.dynamic_sampling=true", "reward.overlong_buffer=16", "kl.coef=0"]


def evaluate(model: Path, out: Path, overrides: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "rlhf_cli", "eval", str(model), "eval.samples=8", "--json", str(out),
                    *[o for o in overrides if o.startswith("device")]], check=True, capture_output=True)
    return json.loads(out.read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="runs/demo/sft/final")
    parser.add_argument("--runs", default="runs/reasoning")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every rl run")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows = [{"run": "SFT", "samples": 0, "minutes": 0.0, **evaluate(Path(args.sft), runs / "sft_eval.json", args.overrides)}]
    for name, options in (("GRPO-style", GRPO), ("DAPO-style", DAPO)):
        out = runs / name.lower()
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "rlhf_cli", "rl", f"policy.path={args.sft}", f"output_dir={out}",
                        "reward=rule", *options, *args.overrides], check=True, capture_output=True)
        minutes = (time.time() - t0) / 60
        config = json.loads((out / "config.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        draws = [m["sampling_draws"] for m in metrics if "sampling_draws" in m] or [1]  # at logged steps
        samples = round(config["max_steps"] * config["rollout"]["prompts_per_step"]
                        * config["rollout"]["samples_per_prompt"] * sum(draws) / len(draws))
        rows.append({"run": name, "samples": samples, "minutes": minutes,
                     **evaluate(out / "final", runs / f"{name.lower()}_eval.json", args.overrides)})
    print("| run | greedy | pass@1 | pass@8 | maj@8 | samples drawn | minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {100 * r['accuracy']:.1f} | {100 * r['pass@1']:.1f} | {100 * r['pass@8']:.1f} | "
              f"{100 * r['maj@8']:.1f} | {r['samples']} | {r['minutes']:.1f} |")
    (runs / "reasoning_table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
