"""The task record and the file writer shared by every task of the suite (see __init__)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Task:
    module: str            # the module holding the task's rules: rules are '<module>:reward' and '<module>:correct'
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
    def name(self) -> str:
        return self.module.rpartition(".")[2]

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


def _pair_row(task: Task, prob: dict, rng: random.Random) -> dict:
    return {"prompt": _prompt_field(task, prob["prompt"]), "chosen": task.gold(prob), "rejected": task.wrong(prob, rng),
            "answer": prob["answer"]}


def _problems(task: Task, rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """n problems (repeats allowed) whose prompts are not in exclude."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"task {task.name}: too few distinct problems outside the held-out set")
        prob = task.problem(rng)
        if prob["prompt"] not in exclude:
            out.append(prob)
    return out


def rows(task: Task, seed: int = 0) -> dict[str, list[dict]]:
    """Every file's rows of one task, deterministic in (task, seed). Held-out prompts are distinct
    and never appear in a training file; held-out SFT rows carry the gold completion."""
    rng = random.Random(f"{task.name}-{seed}")
    held, seen = [], set()
    while len(held) < task.n_eval:
        prob = task.problem(rng)
        if prob["prompt"] not in seen:
            seen.add(prob["prompt"])
            held.append(prob)
    return {
        "sft_train": [_sft_row(task, p, task.demo(p, rng)) for p in _problems(task, rng, task.n_sft, seen)],
        "sft_eval": [_sft_row(task, p, task.gold(p)) for p in held],
        "pairs_train": [_pair_row(task, p, rng) for p in _problems(task, rng, task.n_pairs, seen)],
        "pairs_eval": [_pair_row(task, p, rng) for p in held],
        "prompts_train": [{"prompt": _prompt_field(task, p["prompt"]), "answer": p["answer"]}
                          for p in _problems(task, rng, task.n_prompts, seen)],
        "prompts_eval": [{"prompt": _prompt_field(task, p["prompt"]), "answer": p["answer"]} for p in held],
    }


def write(task: Task, directory: Path, seed: int = 0) -> Path:
    """Write the task's six .jsonl files into directory (each atomically); returns directory."""
    return write_files(rows(task, seed), directory)


def write_files(files: dict[str, list[dict]], directory: Path) -> Path:
    """Each name's rows into directory/<name>.jsonl, one JSON object a line, each file atomically -> directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        tmp = directory / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(directory / f"{name}.jsonl")
    return directory


def partial_credit(response: str, answer: str, sep: str | None = " ") -> float:
    """Fraction of the answer's items (split on sep; characters when sep is None) that the response
    has at the same position; a response of another length loses the missing or extra items."""
    got = response.strip().split(sep) if sep else list(response.strip())
    want = answer.split(sep) if sep else list(answer)
    right = sum(g == w for g, w in zip(got, want))
    return right / max(len(want), len(got))
