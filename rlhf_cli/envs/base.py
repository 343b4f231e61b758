"""The shipped environments' tasks: problems, a demonstrator that plays the environment, and the files.

An `EnvTask` names an environment class and how its rows are made: `problem(rng)` gives a row (the opening
`prompt` messages and the fields the environment reads), `demo(row, messages, rng)` the flawed demonstrator's
next assistant turn, `gold(row, messages)` the right one. SFT rows come from playing the environment itself
with the demonstrator, so every environment reply in them is the one the environment gives; each assistant
turn is one `messages` row (the conversation up to it, that turn last), which `rlhf sft` trains as it trains
any chat row.

    python -m rlhf_cli.envs write DIR        # DIR/<env>/{sft,prompts}_{train,eval}.jsonl for each environment
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_cli.envs import Step
from rlhf_cli.tasks.base import write_files


@dataclass(frozen=True)
class EnvTask:
    env: type  # the environment class (made anew per episode)
    summary: str  # one line
    problem: Callable  # rng -> row: {"prompt": opening messages, ...fields the environment reads}
    demo: Callable  # (row, messages so far, rng) -> the demonstrator's next assistant text (flawed by design)
    gold: Callable  # (row, messages so far) -> the right next assistant text
    extra: Callable | None = None  # held-out rows -> more files of the task's own, by name (the calculator's no-tool rows)
    n_sft: int = 2000  # episodes the SFT rows come from (one row per assistant turn)
    n_prompts: int = 2000
    n_eval: int = 200

    @property
    def name(self) -> str:
        return f"{self.env.__module__}:{self.env.__name__}"


def play(task: EnvTask, row: dict, policy: Callable, max_turns: int | None = None) -> tuple[list[dict], Step]:
    """One episode of `policy(row, messages) -> text` against the task's environment -> (the conversation,
    opening included, the last Step)."""
    env = task.env()
    messages = list(env.reset(row))
    step = Step()
    for _ in range(max_turns or getattr(task.env, "max_turns", 4)):
        text = policy(row, messages)
        step = env.step(text)
        messages += [{"role": "assistant", "content": text}, *step.messages]
        if step.done:
            break
    return messages, step


def turn_rows(messages: list[dict]) -> list[dict]:
    """A conversation as one SFT row per assistant turn: the messages up to it, that turn last."""
    return [{"messages": messages[:i + 1]} for i, m in enumerate(messages) if m["role"] == "assistant"]


def rows(task: EnvTask, seed: int = 0) -> dict[str, list[dict]]:
    """The task's files, deterministic in (task, seed): held-out prompts are distinct and never in a training
    file; held-out SFT rows are the gold policy's turns."""
    rng = random.Random(f"{task.name}-{seed}")
    held, seen = [], set()
    while len(held) < task.n_eval:
        row = task.problem(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            held.append(row)

    def fresh(n: int) -> list[dict]:
        out = []
        while len(out) < n:
            row = task.problem(rng)
            if json.dumps(row, sort_keys=True) not in seen:
                out.append(row)
        return out

    sft = [r for row in fresh(task.n_sft) for r in turn_rows(play(task, row, lambda w, m: task.demo(w, m, rng))[0])]
    return {"sft_train": sft,
            "sft_eval": [r for row in held for r in turn_rows(play(task, row, task.gold)[0])],
            "prompts_train": fresh(task.n_prompts), "prompts_eval": held, **(task.extra(held) if task.extra else {})}


def write(task: EnvTask, directory: Path, seed: int = 0) -> Path:
    """The task's .jsonl files in directory (sft_train, sft_eval, prompts_train, prompts_eval and its extra ones),
    each written atomically."""
    return write_files(rows(task, seed), directory)
