"""The environments on the embedded tiny model: sft on an environment's turns -> rl over episodes, one table.

    python scripts/envs.py --runs runs/envs                        # what `make envs` runs (CPU, ~30 min, a run at a time)
    python scripts/envs.py --runs runs/envs --cells modsteps/ppo --seeds 0

Each cell is one `rlhf rl env.name=...` run from the environment's SFT checkpoint, with the stage's defaults
but for the response length (12 tokens a turn, 24 for guess; guess's sequences up to the tiny model's 256
positions) and RL_STEPS steps; held-out success is the share
of the 200 (guess: 100) held-out episodes the environment calls solved, greedy. Cells:

    modsteps/<algorithm>            ModSteps: 1/3 a right turn, intermediate rewards (per-turn credit)
    modsteps-outcome/<algorithm>    ModStepsOutcome: 1 at the end for a right last value (the episode return)
    modsteps/reinforce-position     ModSteps with algorithm.baseline=rloo_position
    guess/<algorithm>               guess the number (held out: no setting was chosen on it)

Resumable per run (a finished run's final/manifest.json is read, not rerun). Writes RUNS/envs.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import run_stage  # noqa: E402  (scripts/ is not a package)

from rlhf_cli.envs.__main__ import TASKS  # noqa: E402
from rlhf_cli.envs.base import write  # noqa: E402

RL_STEPS = 30
ALGORITHMS = ("reinforce", "a2c", "ppo")
# cell -> (environment files, env.name, extra settings)
CELLS = {
    **{f"modsteps/{a}": ("modsteps", "rlhf_cli.envs.modsteps:ModSteps", [f"algorithm={a}"]) for a in ALGORITHMS},
    **{f"modsteps-outcome/{a}": ("modsteps", "rlhf_cli.envs.modsteps:ModStepsOutcome", [f"algorithm={a}"])
       for a in ALGORITHMS},
    "modsteps/reinforce-position": ("modsteps", "rlhf_cli.envs.modsteps:ModSteps",
                                    ["algorithm=reinforce", "algorithm.baseline=rloo_position"]),
    **{f"guess/{a}": ("guess", "rlhf_cli.envs.guess:GuessNumber", [f"algorithm={a}"]) for a in ALGORITHMS},
}
TOKENS = {"modsteps": 12, "guess": 24}
# guess's five turns take ~215 tokens: the tiny model's positions (256), past its default max_length (160)
LENGTH = {"modsteps": [], "guess": ["model.max_length=256"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python scripts/envs.py")
    parser.add_argument("--runs", default="runs/envs")
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=1, help="device.threads of every run (1: two jobs share 2 cores)")
    args = parser.parse_args()
    runs = Path(args.runs)
    seeds = [int(s) for s in args.seeds.split(",")]
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    results = {}
    for cell in args.cells.split(","):
        name, env, extra = CELLS[cell]
        data = runs / name / "data"
        if not (data / "prompts_eval.jsonl").exists():
            write(TASKS[name], data)
        sft = runs / name / "sft"
        device = ["device=cpu", f"device.threads={args.threads}"]
        run_stage(sft, "sft", [f"data.train={data / 'sft_train.jsonl'}", f"data.eval={data / 'sft_eval.jsonl'}",
                               "eval.rule=null", *device, *LENGTH[name]], log)
        n = TOKENS[name]
        for seed in seeds:
            out = runs / name / cell.replace("/", "-") / f"seed{seed}"
            run_stage(out, "rl", [f"policy.path={sft / 'final'}", f"env.name={env}", "reward.functions=[]",
                                  f"data.train={data / 'prompts_train.jsonl'}", f"data.eval={data / 'prompts_eval.jsonl'}",
                                  f"rollout.max_new_tokens={n}", f"eval.max_new_tokens={n}", f"max_steps={RL_STEPS}",
                                  f"seed={seed}", "eval.every=10", *device, *extra,
                                  *[k.replace("model.", "policy.") for k in LENGTH[name]]], log)
            manifest = json.loads((out / "final" / "manifest.json").read_text())
            results.setdefault(cell, []).append((manifest["metrics_before"], manifest["metrics"]))
    lines = [f"| cell | SFT success | RL success ({RL_STEPS} steps; seeds {args.seeds}) | SFT turns | RL turns |",
             "|---|---|---|---|---|"]
    for cell, pairs in results.items():
        pct = lambda m, k="eval_accuracy": f"{100 * m[k]:.1f}%"  # noqa: E731
        lines.append(f"| {cell} | {pct(pairs[0][0])} | {' / '.join(pct(after) for _, after in pairs)} | "
                     f"{pairs[0][0]['eval_turns']:.2f} | {' / '.join(format(a['eval_turns'], '.2f') for _, a in pairs)} |")
    (runs / "envs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
