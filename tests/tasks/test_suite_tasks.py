"""The task suite (rlhf_cli/tasks): files, held-out separation, rules, and each task's designed flaw."""

from __future__ import annotations

import json
import random

import pytest

from rlhf_cli import data
from rlhf_cli.models.embedded import build_tokenizer
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.tasks import HELD_OUT, TASKS, TUNING, rows, write

FILES = ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train", "prompts_eval")


def _prompt(row: dict) -> str:
    p = row.get("prompt") if "prompt" in row else row["messages"][0]
    return p if isinstance(p, str) else json.dumps(p) if isinstance(p, list) else p["content"]


def test_at_least_five_tasks_some_held_out_of_tuning():
    assert len(TASKS) >= 5 and set(TUNING) | set(HELD_OUT) == set(TASKS) and not set(TUNING) & set(HELD_OUT)
    assert 1 <= len(HELD_OUT) <= 3
    kinds = {(t.chat, t.summary.split(";")[3].strip()) for t in TASKS.values()}  # (format, reward shape)
    assert {c for c, _ in kinds} == {True, False}
    assert {"binary", "partial credit", "process reward"} <= {k for _, k in kinds}


@pytest.mark.parametrize("name", list(TASKS))
def test_files_load_and_held_out_prompts_never_train(tmp_path, name):
    task = TASKS[name]
    d = write(task, tmp_path / name)
    loaded = {f: data.load_rows(str(d / f"{f}.jsonl"), "data.train") for f in FILES}
    assert len(loaded["sft_train"]) == task.n_sft and len(loaded["prompts_eval"]) == task.n_eval
    held = {_prompt(r) for r in loaded["prompts_eval"]}
    assert len(held) == task.n_eval  # distinct
    for f in ("sft_train", "pairs_train", "prompts_train"):
        assert not held & {_prompt(r) for r in loaded[f]}, f
    assert rows(task, seed=0) == rows(task, seed=0) and rows(task, seed=1) != rows(task, seed=0)
    tok = build_tokenizer()
    for i, r in enumerate(loaded["sft_train"][:50]):
        prompt, completion = data.split_sft_row(tok, r, i, "data.train")
        assert len(data.encode(tok, prompt + completion)) <= 160  # fits the default policy.max_length


@pytest.mark.parametrize("name", list(TASKS))
def test_rules_reward_gold_over_rejected_and_demos_carry_the_designed_flaw(name):
    task = TASKS[name]
    reward, correct = import_reward_function(task.reward), import_reward_function(task.correct)
    rng = random.Random(0)
    wrong_demos = 0
    for _ in range(300):
        prob = task.problem(rng)
        gold, rejected = task.gold(prob), task.wrong(prob, rng)
        row = {"answer": prob["answer"]}

        def total(text):
            v = call_reward(reward, task.reward, prob["prompt"], text, row)
            return v if isinstance(v, float) else sum(x for _, x in v)

        assert correct(prob["prompt"], gold, **row) == 1.0 and correct(prob["prompt"], rejected, **row) == 0.0
        assert total(gold) > total(rejected)
        assert total(gold + " extra") < total(gold)
        wrong_demos += correct(prob["prompt"], task.demo(prob, rng), **row) == 0.0
    if name == "maxof":  # the flaw is too few rows, not wrong ones
        assert wrong_demos == 0 and task.n_sft <= 500
    else:  # systematic slips or random noise: a good share of demonstrations is wrong
        assert 0.2 <= wrong_demos / 300 <= 0.7, wrong_demos


def test_process_reward_places_one_value_per_step():
    task = TASKS["addcarry"]
    fn = import_reward_function(task.reward)
    prompt = "Add 47 and 38.\n"
    right = "units 7+8=15, carry 1. tens 4+3+1=8. Answer: 85"
    slipped = "units 7+8=15, carry 1. tens 4+3=7. Answer: 75"
    assert fn(prompt, right, answer="85") == [(21, 0.2), (35, 0.2), (len(right), 1.0)]
    assert fn(prompt, slipped, answer="85") == [(21, 0.2), (33, -0.2), (len(slipped), 0.0)]
    assert right[:21].endswith("carry 1") and right[:35].endswith("4+3+1=8")


@pytest.mark.slow
def test_make_suite_runs_every_stage_and_writes_the_table(tmp_path):
    """scripts/suite.py end to end on one task, shortened: one table row, cells resumable (a rerun runs nothing)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "scripts" / "suite.py"), "--runs", str(tmp_path / "suite"), "--tasks", "count",
           "--algorithms", "reinforce", "--rewards", "rule,rm,both", "--sft-args", "max_steps=60",
           "--rm-args", "max_steps=60", "--rl-args", "max_steps=3 eval.every=1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert [t["task"] for t in result["tasks"]] == ["count"] and result["tasks"][0]["held_out_task"]
    assert {(c["algorithm"], c["reward"]) for c in result["cells"]} == {("reinforce", r) for r in ("rule", "rm", "both")}
    both = json.loads((tmp_path / "suite" / "count" / "rl-reinforce-both" / "config.json").read_text())["reward"]
    assert both["functions"] == ["rlhf_cli.tasks.count:reward"] and both["model"]["path"].endswith("count/rm/final")
    assert all(c["cpu_minutes"] > 0 for c in result["cells"])
    sampled = result["tasks"][0]["sft_sampled"]
    assert 0 <= sampled["pass@1"] <= sampled["pass@8"] <= 1
    md = (tmp_path / "suite" / "suite.md").read_text()
    assert "Held-out tasks" in md and "| count |" in md and "reinforce rule+rm" in md
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "start" not in again.stdout  # every stage done: nothing rerun
