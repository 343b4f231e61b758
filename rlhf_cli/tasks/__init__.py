"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Task:
    name: str
    summary: str           # one line for the suite table
    problem: Callable      # rng -> problem (a dict holding at least 'prompt' text and 'answer')
    demo: Callable         # (problem, rng) -> the demonstrator's completion (flawed by design)
    gold: Callable         # problem -> the correct completion
    wrong: Callable        # (problem, rng) -> a plausible wrong completion (the rejected side)
    chat: bool = False     # rows as chat messages instead of plain prompt/completion
    n_sft: int = 3000
    n_pairs: int = 8000
    n_prompts: int = 2000
    n_eval: int = 200

    @property
    def module(self) -> str:
        return f"rlhf_cli.tasks.{self.name}"

    @property
    def reward(self) -> str:
        return f"{self.module}:reward"

    @property
    def correct(self) -> str:
        return f"{self.module}:correct"


def _prompt_field(task: Task, prompt: str):
    return [{"role": "user", "content": prompt}] if task.chat else prompt


def _sft_row(task: Task, prob: dict, completion: str) -> dict:
    if task.chat:
        return {"messages": [{"role": "user", "content": prob["prompt"]}, {"role": "assistant", "content": completion}],
                "answer": prob["answer"]}
    return {"prompt": prob["prompt"], "completion": completion, "answer": prob["answer"]}


def _problems(task: Task, rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    out, seen, tries = [], set(exclude), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"task {task.name}: too few distinct problems for {n} rows")
        prob = task.problem(rng)
        if prob["prompt"] in exclude:
            continue  # held-out prompts never appear in training files
        out.append(prob)
    return out


def rows(task: Task, seed: int = 0) -> dict[str, list[dict]]:
    """

from __future__ import annotations

from rlhf_cli.tasks import addcarry, caesar, count, digitwords, maxof, sort3
from rlhf_cli.tasks.base import Task, rows, write

TASKS: dict[str, Task] = {t.name: t for t in (sort3.TASK, addcarry.TASK, digitwords.TASK, maxof.TASK,
                                               caesar.TASK, count.TASK)}
TUNING = ("sort3", "addcarry", "digitwords", "maxof")  # defaults were chosen on these
HELD_OUT = ("caesar", "count")  # never used to choose anything: the check that defaults were not fitted

__all__ = ["TASKS", "TUNING", "HELD_OUT", "Task", "rows", "write"]
