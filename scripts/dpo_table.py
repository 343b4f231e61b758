"""SFT -> DPO, SFT -> iterated DPO and SFT -> RM -> RL side by side on the task suite, with each path's CPU time.

    python scripts/dpo_table.py --runs runs/suite                       # what `make dpo-table` runs
    python scripts/dpo_table.py --runs runs/suite --tasks sort3 --dpo-args "optim.lr=3e-4" --tag lr3e-4
    python scripts/dpo_table.py --runs runs/suite --tasks caesar --rounds 3 --no-rl
    python scripts/dpo_table.py --runs runs/dpo-smollm2 --model models/SmolLM2-135M-Instruct --tasks chatsum \
        --pairs 640 --prompts 64 --dpo-args "max_steps=20" --rl-args "max_steps=20 rollout.prompts_per_step=8 \
        rollout.samples_per_prompt=4" --rm-args "max_steps=15"              # the real model, a CPU budget

With --model, the tasks are rlhf_cli/tasks/pretrained's and every path starts from that checkpoint.
The runs share scripts/suite.py's layout and stages (RUNS/<task>/sft, rm, rl-<algorithm>-rm, each resumable and
read back when done), so a suite run's SFT and RL cells are reused. Every stage runs with its defaults:

- SFT -> DPO: `rlhf dpo` on the task's preference pairs (pairs_train.jsonl, the pairs the RM trains on).
- SFT -> iterated DPO: ROUNDS rounds of `rlhf generate` (SAMPLES responses to each training prompt from the last
  policy, up to 100 new tokens as the stages' evaluation) -> `rlhf label judge=rule` (the task's RL reward;
  pairs=best_worst; responses cut at the limit left out) -> `rlhf dpo` from the last policy on that round's
  pairs alone (its reference: the round's starting policy).
- SFT -> RM -> RL: train-rm, then `rlhf rl reward=rm` (REINFORCE by default, `--algorithm`).

Held-out accuracy is each final stage's own greedy evaluation by the task's exact-match rule on the 200 held-out
prompts (pairs_eval and prompts_eval hold the same prompts). CPU time is each stage process's own (`wait4`),
summed along the path (SFT included). Writes RUNS/dpo_table.json and RUNS/dpo_table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import run_stage  # noqa: E402  (scripts/suite.py: one stage, resumable, its CPU seconds)

from rlhf_cli.tasks import HELD_OUT, TASKS, write  # noqa: E402
from rlhf_cli.tasks import pretrained  # noqa: E402

COMMON = ["device.threads=1"]


def tool(out: Path, args: list[str], log) -> float:
    """`rlhf generate` / `rlhf label` unless `out` exists -> its CPU seconds (read back when done)."""
    cpu_file = out.with_suffix(".cpu_s")
    if out.exists() and cpu_file.exists():
        return float(cpu_file.read_text())
    import os
    import subprocess

    log(f"start  {out}")
    with open(out.with_suffix(".log"), "w") as tool_log:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], stdout=tool_log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: rlhf {' '.join(args)} failed; see {out.with_suffix('.log')}")
    cpu = usage.ru_utime + usage.ru_stime
    cpu_file.write_text(f"{cpu:.1f}\n")
    return cpu


def accuracy(run: Path) -> float:
    return json.loads((run / "final" / "manifest.json").read_text())["metrics"]["eval_accuracy"]


def first_rows(src: Path, n: int | None) -> Path:
    """src, or a file of its first n rows beside it (a CPU budget on the real model)."""
    if not n:
        return src
    out = src.with_name(f"{src.stem}-{n}.jsonl")
    if not out.exists():
        out.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return out


def task_row(runs: Path, task: str, args, log) -> dict:
    t = (pretrained.TASKS if args.model else TASKS)[task]
    d = write(t, runs / "data" / task)
    sft = runs / task / "sft"
    base = [f"model.path={Path(args.model).resolve()}"] if args.model else []
    cpu = {"sft": run_stage(sft, "sft", [*base, f"data.train={d / 'sft_train.jsonl'}", f"data.eval={d / 'sft_eval.jsonl'}",
                                         f"eval.rule={t.correct}", *COMMON, *args.sft_args.split()], log)}
    held = [f"data.eval={d / 'pairs_eval.jsonl'}", f"eval.rule={t.correct}", *COMMON, *args.dpo_args.split()]
    row = {"task": task, "held_out_task": task in (pretrained.HELD_OUT if args.model else HELD_OUT), "sft": accuracy(sft)}
    dpo = runs / task / f"dpo{args.tag}"
    pairs_train = first_rows(d / "pairs_train.jsonl", args.pairs)
    cpu["dpo"] = run_stage(dpo, "dpo", [f"model.path={sft / 'final'}", f"data.train={pairs_train}", *held], log)
    row["dpo"] = accuracy(dpo)
    policy, cpu["iterated"], row["rounds"] = sft, 0.0, []
    for k in range(1, args.rounds + 1):
        base = runs / task / f"idpo{args.tag}"
        base.mkdir(parents=True, exist_ok=True)
        gens, pairs = base / f"gens{k}.jsonl", base / f"pairs{k}.jsonl"
        prompts = first_rows(d / "prompts_train.jsonl", args.prompts)
        cpu["iterated"] += tool(gens, ["generate", f"model.path={policy / 'final'}", f"data.prompts={prompts}",
                                       f"samples_per_prompt={args.samples}", f"seed={k}", f"output={gens}",
                                       "max_new_tokens=100", *COMMON,
                                       *args.gen_args.split()], log)
        cpu["iterated"] += tool(pairs, ["label", f"input={gens}", "judge=rule", f"reward.functions=[{t.reward}]",
                                        "pairs=best_worst", f"output={pairs}", *COMMON], log)
        out = base / f"dpo{k}"
        cpu["iterated"] += run_stage(out, "dpo", [f"model.path={policy / 'final'}", f"data.train={pairs}", *held], log)
        policy = out
        row["rounds"].append({"accuracy": accuracy(out), "pairs": sum(1 for _ in pairs.open())})
    if args.rounds:
        row["iterated"] = row["rounds"][-1]["accuracy"]
    if not args.no_rl:
        rm = runs / task / "rm"
        cpu["rm"] = run_stage(rm, "train-rm", [f"model.path={sft / 'final'}", f"data.train={pairs_train}",
                                               f"data.eval={d / 'pairs_eval.jsonl'}", *COMMON, *args.rm_args.split()], log)
        rl = runs / task / f"rl-{args.algorithm}-rm"
        cpu["rl"] = run_stage(rl, "rl", [f"algorithm={args.algorithm}", f"policy.path={sft / 'final'}",
                                         f"data.train={d / 'prompts_train.jsonl'}", f"data.eval={d / 'prompts_eval.jsonl'}",
                                         f"eval.rule={t.correct}", "reward=rm", f"reward.model.path={rm / 'final'}",
                                         *COMMON, *args.rl_args.split()], log)
        row["rm_rl"] = accuracy(rl)
    row["cpu_minutes"] = {k: round(v / 60, 2) for k, v in cpu.items()}
    return row


def table(rows: list[dict], algorithm: str) -> str:
    """One markdown table: held-out accuracy and the CPU minutes of each path, SFT's included."""
    lines = []
    for held in (False, True):
        chosen = [r for r in rows if r["held_out_task"] == held]
        if not chosen:
            continue
        lines += ["", "Held-out tasks (never used to choose defaults):" if held else "Tuning tasks:", "",
                  f"| task | SFT | SFT -> DPO | SFT -> iterated DPO (rounds) | SFT -> RM -> RL ({algorithm}) |",
                  "|---|---|---|---|---|"]
        for r in chosen:
            m, s = r["cpu_minutes"], r["cpu_minutes"]["sft"]
            per_round = " / ".join(f"{x['accuracy']:.1%}" for x in r.get("rounds", []))
            iterated = f"{r['iterated']:.1%} ({per_round}), {s + m['iterated']:.1f} min" if "iterated" in r else ""
            rl = f"{r['rm_rl']:.1%}, {s + m['rm'] + m['rl']:.1f} min" if "rm_rl" in r else ""
            lines.append(f"| {r['task']} | {r['sft']:.1%}, {s:.1f} min | {r['dpo']:.1%}, {s + m['dpo']:.1f} min | "
                         f"{iterated} | {rl} |")
    return "\n".join(lines[1:]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/suite")
    parser.add_argument("--tasks", default="sort3,addcarry,caesar,count")
    parser.add_argument("--rounds", type=int, default=3, help="iterated DPO rounds (0: none)")
    parser.add_argument("--samples", type=int, default=4, help="responses per training prompt in a round")
    parser.add_argument("--algorithm", default="reinforce", help="the RL cell's algorithm")
    parser.add_argument("--no-rl", action="store_true", help="leave out SFT -> RM -> RL")
    parser.add_argument("--dpo-args", default="", help="extra overrides for every dpo run")
    parser.add_argument("--tag", default="", help="suffix of the dpo run dirs (a sweep point)")
    parser.add_argument("--model", help="a pretrained base model: the tasks of rlhf_cli/tasks/pretrained from it")
    parser.add_argument("--pairs", type=int, help="the first N training pairs only (dpo and train-rm; a CPU budget)")
    parser.add_argument("--prompts", type=int, help="the first N training prompts a round generates from")
    parser.add_argument("--sft-args", default="", help="extra overrides for the sft run")
    parser.add_argument("--rm-args", default="", help="extra overrides for the train-rm run")
    parser.add_argument("--rl-args", default="", help="extra overrides for the rl run")
    parser.add_argument("--gen-args", default="", help="extra overrides for each round's rlhf generate")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    rows = [task_row(runs, task, args, log) for task in args.tasks.split(",") if task]
    name = f"dpo_table{args.tag}"
    (runs / f"{name}.json").write_text(json.dumps({"rows": rows, "dpo_args": args.dpo_args}, indent=2))
    md = table(rows, args.algorithm)
    (runs / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
