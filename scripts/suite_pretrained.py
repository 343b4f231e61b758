"""The real-model task suite: sft -> train-rm -> rl (each algorithm x each reward source) on SmolLM2-135M-Instruct.

    python scripts/suite_pretrained.py --runs runs/suite-pretrained        # `make suite-pretrained` (hours on CPU)
    python scripts/suite_pretrained.py --runs runs/sp-smoke --device cpu --tasks chatsum --algorithms reinforce \\
        --steps-sft 2 --steps-rm 2 --steps-rl 1 --prompts-per-step 2 --samples 2      # a smoke of every stage

The tasks are `rlhf_cli.tasks.pretrained` (chatsum, politeness; wordlimit held out), and every stage starts from
the real checkpoint in models/SmolLM2-135M-Instruct (`make pretrained`): SFT from it, the reward model from the
SFT's final/ (`--rm-from base`: from the checkpoint itself), RL from the SFT's final/. RL runs with the task's rule
(`reward=rule`) and with the reward model alone (`reward=rm`); the RM-only task (politeness, no rule reward) runs
the RM cells alone, and its held-out accuracy is its hidden rule. Only the data paths, `eval.rule`,
`reward.functions` / `reward.model.path`, `device.threads=1` and the budget options below are set: learning rates,
KL coefficients and every other setting are the stages' own defaults for this model.

Budget options (unset = the stage's default): --steps-sft, --steps-rm, --steps-rl (`max_steps`),
--prompts-per-step (`rollout.prompts_per_step`), --samples (`rollout.samples_per_prompt`).

General ability: the perplexity of the assistant turns of a fixed held-out chat set
(rlhf_cli/tasks/pretrained/general.jsonl, 32 everyday questions with good answers; `general_perplexity`, plain
transformers) for the base model and for each stage's final/ (the reward model has no LM head: not measured),
shown before -> after each stage. Held-out accuracy before -> after comes from each stage's manifest (the SFT's
"before" is the base model); the SFT's pass@k (`--room-k`, samples at temperature 1) and the RM's pairwise accuracy
are read through plain transformers by scripts/suite.py's functions.

Resumable per cell (scripts/suite.py's run_stage): a finished stage is read, not rerun. Writes RUNS/suite.json and
RUNS/suite.md (one table: a row per stage and cell, with its own CPU minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import cached, cell, plain_transformers_pairwise_accuracy, run_stage, sampled_room  # noqa: E402

from rlhf_cli.tasks.base import write  # noqa: E402
from rlhf_cli.tasks.pretrained import HELD_OUT, MODEL, RM_ONLY, TASKS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GENERAL = ROOT / "rlhf_cli" / "tasks" / "pretrained" / "general.jsonl"
ALGORITHMS = ("reinforce", "a2c", "ppo")
REWARDS = ("rule", "rm", "both")  # both (rule + RM) is not a default here: `--rewards rule,rm,both` adds it


def general_perplexity(model_dir, rows) -> float:
    """exp(mean per-token loss) of the assistant turns of `rows` (messages rows), plain transformers.

    Each assistant turn is scored given the conversation before it, rendered by the model's own chat template
    (`add_generation_prompt=True`): its tokens up to and including the template's end-of-turn token, all turns'
    tokens pooled (a token-weighted mean)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    total, count = 0.0, 0
    for row in rows:
        messages = row["messages"]
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages[:i + 1], tokenize=False)
            p_ids = tok(prefix, add_special_tokens=False).input_ids
            ids = tok(full, add_special_tokens=False).input_ids
            if ids[:len(p_ids)] != p_ids:
                raise ValueError(f"the chat template does not extend the prompt with the turn (row {row})")
            end = next((j + 1 for j in range(len(p_ids), len(ids)) if ids[j] in stops), len(ids))
            with torch.no_grad():
                logits = model(torch.tensor([ids[:end]])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:end])
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(p_ids) - 1:]
            total += nll.sum().item()
            count += nll.numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/suite-pretrained")
    parser.add_argument("--model", default=str(ROOT / MODEL), help="the base model of every stage (an HF dir)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--rewards", default="rule,rm", help="rule, rm, both (the RM-only task runs its RM cells only)")
    parser.add_argument("--rm-from", choices=("sft", "base"), default="sft", help="the reward model's starting point")
    parser.add_argument("--steps-sft", type=int, help="sft max_steps (default: the stage's)")
    parser.add_argument("--steps-rm", type=int, help="train-rm max_steps (default: the stage's)")
    parser.add_argument("--steps-rl", type=int, help="rl max_steps (default: the stage's)")
    parser.add_argument("--prompts-per-step", type=int, help="rl rollout.prompts_per_step (default: the stage's)")
    parser.add_argument("--samples", type=int, help="rl rollout.samples_per_prompt (default: the stage's)")
    parser.add_argument("--room-k", type=int, default=4, help="the SFT's pass@k samples per held-out prompt (0: skip)")
    parser.add_argument("--device", help="device of every stage (cpu, cuda; default: the stages' auto)")
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time (each with one thread)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this script's own measurements")
    parser.add_argument("--sft-args", default="", help="extra overrides for every sft run (space-separated)")
    parser.add_argument("--rm-args", default="", help="extra overrides for every train-rm run")
    parser.add_argument("--rl-args", default="", help="extra overrides for every rl run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Path(args.model).resolve()
    if not (base / "config.json").is_file():
        raise SystemExit(f"error: no model at {base}; run `make pretrained` (or pass --model DIR)")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {','.join(unknown)}; the tasks are {','.join(TASKS)}")
    algorithms = [a for a in args.algorithms.split(",") if a]
    rewards = [r for r in args.rewards.split(",") if r]
    bad = [a for a in algorithms if a not in ALGORITHMS] + [r for r in rewards if r not in REWARDS]
    if bad:
        raise SystemExit(f"error: unknown {','.join(bad)}; algorithms {','.join(ALGORITHMS)}, "
                         f"rewards {','.join(REWARDS)}")
    runs = Path(args.runs).resolve()
    data = runs / "data"
    common = ["device.threads=1"] + ([f"device={args.device}"] if args.device else [])
    steps = lambda n: [f"max_steps={n}"] if n is not None else []  # noqa: E731
    rollout = ([f"rollout.prompts_per_step={args.prompts_per_step}"] if args.prompts_per_step is not None else []) + \
              ([f"rollout.samples_per_prompt={args.samples}"] if args.samples is not None else [])
    general_rows = [json.loads(line) for line in GENERAL.read_text().splitlines() if line.strip()]
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    def ppl(model_dir: Path, cache: Path) -> float:
        return cached(cache, lambda: {"model": str(model_dir),
                                      "perplexity": general_perplexity(model_dir, general_rows)})["perplexity"]

    runs.mkdir(parents=True, exist_ok=True)
    base_ppl = ppl(base, runs / "general_ppl_base.json")
    log(f"base model {base}: general perplexity {base_ppl:.2f}")

    def prepare(task: str) -> dict:
        t = TASKS[task]
        d = write(t, data / task)
        sft_dir, rm_dir = runs / task / "sft", runs / task / "rm"
        sft_cpu = run_stage(sft_dir, "sft", [f"model.path={base}", f"data.train={d / 'sft_train.jsonl'}",
                                             f"data.eval={d / 'sft_eval.jsonl'}", f"eval.rule={t.correct}", *common,
                                             *steps(args.steps_sft), *args.sft_args.split()], log)
        rm_init = sft_dir / "final" if args.rm_from == "sft" else base
        rm_cpu = run_stage(rm_dir, "train-rm", [f"model.path={rm_init}", f"data.train={d / 'pairs_train.jsonl'}",
                                                f"data.eval={d / 'pairs_eval.jsonl'}", *common, *steps(args.steps_rm),
                                                *args.rm_args.split()], log)
        sft_m = json.loads((sft_dir / "final" / "manifest.json").read_text())
        rm_m = json.loads((rm_dir / "final" / "manifest.json").read_text())
        room = (cached(runs / task / "sft_sampled.json", lambda: sampled_room(
            sft_dir / "final", d / "prompts_eval.jsonl", t.correct, k=args.room_k)) if args.room_k > 0 else {})
        return {"task": task, "summary": t.summary, "held_out_task": task in HELD_OUT, "rm_only": task in RM_ONLY,
                "base_accuracy": sft_m["metrics_before"].get("eval_accuracy"),
                "sft_accuracy": sft_m["metrics"].get("eval_accuracy"), "sft_sampled": room,
                "rm_stage_accuracy": rm_m["metrics"].get("eval_accuracy"), "rm_from": args.rm_from,
                "rm_plain_hf_accuracy": cached(runs / task / "rm_plain_hf.json", lambda: {
                    "accuracy": plain_transformers_pairwise_accuracy(rm_dir / "final", d / "pairs_eval.jsonl")
                })["accuracy"],
                "ppl_base": base_ppl, "ppl_sft": ppl(sft_dir / "final", runs / task / "sft_general_ppl.json"),
                "sft_cpu_minutes": round(sft_cpu / 60, 2), "rm_cpu_minutes": round(rm_cpu / 60, 2)}

    def rl_cell(job) -> dict:
        task, algorithm, reward = job
        extra = common + steps(args.steps_rl) + rollout + args.rl_args.split()
        c = cell(runs, data, task, algorithm, reward, extra, log, tasks=TASKS)
        out = runs / task / f"rl-{algorithm}-{reward}"
        c["ppl_before"] = ppl(runs / task / "sft" / "final", runs / task / "sft_general_ppl.json")
        c["ppl_after"] = ppl(out / "final", runs / task / f"rl-{algorithm}-{reward}_general_ppl.json")
        return c

    with ThreadPoolExecutor(args.jobs) as pool:
        prepared = list(pool.map(prepare, tasks))
        jobs = [(task, a, r) for task in tasks for a in algorithms for r in rewards
                if not (task in RM_ONLY and r != "rm")]  # the RM-only task has no rule: its RM cells alone
        cells = list(pool.map(rl_cell, jobs))
    result = {"model": str(base), "tasks": prepared, "cells": cells, "room_k": args.room_k,
              "rl_args": common + steps(args.steps_rl) + rollout + args.rl_args.split(),
              "sft_args": common + steps(args.steps_sft) + args.sft_args.split(),
              "rm_args": common + steps(args.steps_rm) + args.rm_args.split()}
    (runs / "suite.json").write_text(json.dumps(result, indent=2))
    md = table(result)
    (runs / "suite.md").write_text(md)
    print(md)


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def table(result: dict) -> str:
    """One markdown table: a row per stage (SFT, RM) and RL cell of each task, tuning tasks then held-out ones."""
    k = result.get("room_k", 0)
    head = ("| task | stage | held-out before | held-out after | general ppl before | general ppl after | CPU min |\n"
            "|---|---|---|---|---|---|---|")
    lines = []
    for held in (False, True):
        tasks = [t for t in result["tasks"] if t["held_out_task"] == held]
        if not tasks:
            continue
        lines += ["", "Held-out tasks (never used to choose defaults):" if held else "Tuning tasks:", "", head]
        for t in tasks:
            name = t["task"] + (" (RM only)" if t["rm_only"] else "")
            room = t["sft_sampled"].get(f"pass@{k}") if k else None
            after = _pct(t["sft_accuracy"]) + (f" (pass@{k} {_pct(room)})" if room is not None else "")
            lines.append(f"| {name} | sft | {_pct(t['base_accuracy'])} (base) | {after} | {t['ppl_base']:.2f} | "
                         f"{t['ppl_sft']:.2f} | {t['sft_cpu_minutes']:.1f} |")
            lines.append(f"| {name} | train-rm (from {t['rm_from']}) | | pairwise {_pct(t['rm_plain_hf_accuracy'])} "
                         f"(plain HF; stage {_pct(t['rm_stage_accuracy'])}) | | | {t['rm_cpu_minutes']:.1f} |")
            for c in (c for c in result["cells"] if c["task"] == t["task"]):
                reward = "rule+rm" if c["reward"] == "both" else c["reward"]
                lines.append(f"| {name} | rl {c['algorithm']} {reward} | {_pct(c['before'])} | {_pct(c['after'])} | "
                             f"{c['ppl_before']:.2f} | {c['ppl_after']:.2f} | {c['cpu_minutes']:.1f} |")
    return "\n".join(lines[1:]) + "\n"


if __name__ == "__main__":
    main()
