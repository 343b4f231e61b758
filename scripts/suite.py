"""The task suite: sft -> train-rm -> rl (each algorithm x each reward source) on every task, one table.

    python scripts/suite.py --runs runs/suite                 # what `make suite` runs (CPU, ~1.5 hours at 1 thread)
    python scripts/suite.py --runs runs/suite --tasks sort3 --algorithms ppo --rewards rule
    python scripts/suite.py --runs runs/suite --jobs 2         # two cells at a time, one thread each

Every stage runs with its defaults: only the data paths, `reward.functions` and
`eval.rule` (the task's exact-match rule) are set, as a user with their own
task would. Tasks come from `rlhf_cli.tasks` (`python -m rlhf_cli.tasks list`);
the held-out tasks, never used to choose a default, are reported apart.

Resumable per cell: a finished cell (its final/manifest.json) is read, not
rerun; an interrupted one resumes from its checkpoint. The RM's pairwise
accuracy is measured the way any other tool would read the model: plain
`AutoModelForSequenceClassification` + `AutoTokenizer` from its final/, on
`prompt + response` text, the single logit. Writes RUNS/suite.json and
RUNS/suite.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlhf_cli.rewards import import_reward_function, row_kwargs
from rlhf_cli.tasks import HELD_OUT, TASKS, write

hf_logging.disable_progress_bar()  # imported eagerly: transformers' lazy imports race in --jobs threads
# One plain-transformers measurement at a time: two from_pretrained calls in --jobs threads at once left meta
# tensors or an untied, freshly initialised lm_head (0% greedy accuracy, seen), and sampling draws from torch's
# global RNG, which threads would interleave.
MEASURE_LOCK = threading.Lock()

ALGORITHMS = ("reinforce", "a2c", "ppo")
REWARDS = ("rule", "rm", "both")  # both: reward=rule_rm, the rule's reward plus the RM's normalised score


def run_stage(out: Path, stage: str, overrides: list[str], log) -> float:
    """Run one stage unless its final/ exists; -> its CPU seconds (read back from a done run's cpu file).
    The stage's output goes to <out>.log beside its run directory."""
    manifest, cpu_file = out / "final" / "manifest.json", out.parent / f"{out.name}.cpu_s"
    if manifest.exists():
        return float(cpu_file.read_text()) if cpu_file.exists() else 0.0
    cmd = [sys.executable, "-m", "rlhf_cli", stage, f"output_dir={out}", *overrides]
    log(f"start  {out}")
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as stage_log:
        proc = subprocess.Popen(cmd, stdout=stage_log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever else runs
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); "
                         f"see {out.parent / f'{out.name}.log'}")
    cpu = usage.ru_utime + usage.ru_stime
    cpu_file.write_text(f"{cpu:.1f}\n")
    log(f"done   {out} in {time.time() - t0:.0f} s ({cpu:.0f} CPU s)")
    return cpu


def plain_transformers_pairwise_accuracy(rm_dir: Path, pairs_file: Path) -> float:
    """Held-out pairwise accuracy as an outside client reads the RM: tokenizer(prompt + response), one logit."""
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    right = 0.0
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        with torch.no_grad():
            s = [model(**tok(prompt + row[k], return_tensors="pt")).logits[0, 0].item() for k in ("chosen", "rejected")]
        right += 1.0 if s[0] > s[1] else 0.5 if s[0] == s[1] else 0.0
    return right / len(rows)


def sampled_room(model_dir: Path, prompts_file: Path, rule: str, k: int = 8, seed: int = 0) -> dict:
    """Greedy accuracy, pass@1 and pass@k (temperature 1) of a policy on held-out prompts, plain transformers.

    pass@k - greedy is the room RL has: on-policy RL sharpens what sampling already finds, so a task
    whose errors are confident (pass@k close to greedy) leaves it little to do."""
    correct = import_reward_function(rule)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
               if isinstance(r["prompt"], list) else r["prompt"] for r in rows]
    greedy = pass1 = passk = 0.0
    common = dict(max_new_tokens=100, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for i in range(0, len(rows), 50):  # batches of 50 prompts (x k samples), left-padded
        batch = tok(prompts[i:i + 50], return_tensors="pt", padding=True, add_special_tokens=False)
        n = batch["input_ids"].shape[1]
        with torch.no_grad():
            g = model.generate(**batch, do_sample=False, **common)
            s = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, num_return_sequences=k, **common)
        for j, row in enumerate(rows[i:i + 50]):
            kw = row_kwargs(row)
            greedy += correct(prompts[i + j], tok.decode(g[j, n:], skip_special_tokens=True), **kw)
            rights = [correct(prompts[i + j], tok.decode(o[n:], skip_special_tokens=True), **kw)
                      for o in s[j * k:(j + 1) * k]]
            pass1 += sum(rights) / k
            passk += max(rights)
    return {"greedy": greedy / len(rows), "pass@1": pass1 / len(rows), f"pass@{k}": passk / len(rows)}


def cached(path: Path, compute) -> dict:
    """compute() once per run directory: a rerun reads the JSON it wrote."""
    with MEASURE_LOCK:
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(compute()))
            tmp.replace(path)
    return json.loads(path.read_text())


def cell(runs: Path, data: Path, task: str, algorithm: str, reward: str, extra: list[str], log,
         tasks: dict | None = None) -> dict:
    t = (tasks or TASKS)[task]  # tasks: another suite's (scripts/suite_pretrained.py)
    sft = runs / task / "sft" / "final"
    overrides = [f"algorithm={algorithm}", f"policy.path={sft}", f"data.train={data / task / 'prompts_train.jsonl'}",
                 f"data.eval={data / task / 'prompts_eval.jsonl'}", f"eval.rule={t.correct}", *extra]
    rm = f"reward.model.path={runs / task / 'rm' / 'final'}"
    overrides += {"rule": ["reward=rule", f"reward.functions=[{t.reward}]"], "rm": ["reward=rm", rm],
                  "both": ["reward=rule_rm", f"reward.functions=[{t.reward}]", rm]}[reward]
    out = runs / task / f"rl-{algorithm}-{reward}"
    cpu = run_stage(out, "rl", overrides, log)
    m = json.loads((out / "final" / "manifest.json").read_text())
    return {"task": task, "algorithm": algorithm, "reward": reward, "before": m["metrics_before"]["eval_accuracy"],
            "after": m["metrics"]["eval_accuracy"], "cpu_minutes": round(cpu / 60, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/suite")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--rewards", default=",".join(REWARDS))
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time (each with one thread)")
    parser.add_argument("--rl-args", default="", help="extra overrides for every rl run (space-separated)")
    parser.add_argument("--sft-args", default="", help="extra overrides for every sft run")
    parser.add_argument("--rm-args", default="", help="extra overrides for every train-rm run")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    data = runs / "data"
    tasks = [t for t in args.tasks.split(",") if t]
    common = ["device.threads=1"]
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    def prepare(task: str) -> dict:
        t = TASKS[task]
        write(t, data / task)
        d = data / task
        sft_cpu = run_stage(runs / task / "sft", "sft", [f"data.train={d / 'sft_train.jsonl'}",
                            f"data.eval={d / 'sft_eval.jsonl'}", f"eval.rule={t.correct}", *common, *args.sft_args.split()], log)
        rm_cpu = run_stage(runs / task / "rm", "train-rm", [f"model.path={runs / task / 'sft' / 'final'}",
                           f"data.train={d / 'pairs_train.jsonl'}", f"data.eval={d / 'pairs_eval.jsonl'}", *common,
                           *args.rm_args.split()], log)
        sft_m = json.loads((runs / task / "sft" / "final" / "manifest.json").read_text())
        rm_m = json.loads((runs / task / "rm" / "final" / "manifest.json").read_text())
        return {"task": task, "summary": t.summary, "held_out_task": task in HELD_OUT,
                "sft_accuracy": sft_m["metrics"]["eval_accuracy"], "rm_stage_accuracy": rm_m["metrics"]["eval_accuracy"],
                "rm_plain_hf_accuracy": cached(runs / task / "rm_plain_hf.json", lambda: {
                    "accuracy": plain_transformers_pairwise_accuracy(runs / task / "rm" / "final",
                                                                     d / "pairs_eval.jsonl")})["accuracy"],
                "sft_sampled": cached(runs / task / "sft_sampled.json",
                                      lambda: sampled_room(runs / task / "sft" / "final", d / "prompts_eval.jsonl", t.correct)),
                "sft_cpu_minutes": round(sft_cpu / 60, 2), "rm_cpu_minutes": round(rm_cpu / 60, 2)}

    with ThreadPoolExecutor(args.jobs) as pool:
        prepared = list(pool.map(prepare, tasks))
        jobs = [(task, a, r) for task in tasks for a in args.algorithms.split(",") for r in args.rewards.split(",")]
        extra = common + [x for x in args.rl_args.split() if x]
        cells = list(pool.map(lambda j: cell(runs, data, *j, extra, log), jobs))
    result = {"tasks": prepared, "cells": cells, "rl_args": extra}
    (runs / "suite.json").write_text(json.dumps(result, indent=2))
    md = table(result)
    (runs / "suite.md").write_text(md)
    print(md)


def table(result: dict) -> str:
    by = {(c["task"], c["algorithm"], c["reward"]): c for c in result["cells"]}
    algs = sorted({c["algorithm"] for c in result["cells"]}, key=ALGORITHMS.index)
    rewards = sorted({c["reward"] for c in result["cells"]}, key=REWARDS.index)
    cols = [(a, r) for r in rewards for a in algs]
    head = ("| task | SFT greedy | SFT pass@8 | RM (plain HF) | "
            + " | ".join(f"{a} {'rule+rm' if r == 'both' else r}" for a, r in cols)
            + " | RL CPU min (max) |")
    lines = []
    for held in (False, True):
        rows = [t for t in result["tasks"] if t["held_out_task"] == held]
        if not rows:
            continue
        lines += ["", "Held-out tasks (never used to choose defaults):" if held else "Tuning tasks:", "", head,
                  "|" + "---|" * (5 + len(cols))]
        for t in rows:
            cells = [by.get((t["task"], a, r)) for a, r in cols]
            lines.append(f"| {t['task']} | {t['sft_accuracy']:.1%} | {t['sft_sampled']['pass@8']:.1%} | "
                         f"{t['rm_plain_hf_accuracy']:.1%} | "
                         + " | ".join(f"{c['after']:.1%}" if c else "" for c in cells)
                         + f" | {max((c['cpu_minutes'] for c in cells if c), default=0):.1f} |")
    return "\n".join(lines[1:]) + "\n"


if __name__ == "__main__":
    main()
