"""A calculator tool: arithmetic a small model cannot do in its head, done by calling the tool.

    user:      What is 347 * 862? Use the calculator: write 'CALC <a> * <b>', then 'Answer: <n>'.
    assistant: CALC 347 * 862
    user:      RESULT 299114               (the tool's answer, as the next user turn: a plain-text protocol
    assistant: Answer: 299114               that any chat template renders)

A turn holding 'Answer: <n>' ends the episode: reward 1 and solved when n is the row's answer. A turn holding
'CALC <a> <op> <b>' (integers; + - * /, / is floor division) gets 'RESULT <value>'; any other turn gets a
reminder of the protocol. No reward before the answer: the tool earns its keep by the answer it makes right.
The demonstrator calls the tool half the time and otherwise answers in its head, off by a digit or more.
"""

from __future__ import annotations

import random
import re

from rlhf_cli.envs import Step
from rlhf_cli.envs.base import EnvTask

_CALL = re.compile(r"CALC\s*(-?\d+)\s*([-+*/])\s*(-?\d+)")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b if b else None}
PROTOCOL = "Use the calculator: write 'CALC <a> * <b>', then 'Answer: <n>'."


def calculate(text: str) -> str | None:
    """The tool: 'CALC a op b' anywhere in text -> 'RESULT value' ('RESULT error' for a division by 0); None
    when text holds no call."""
    match = _CALL.search(text)
    if match is None:
        return None
    value = OPS[match.group(2)](int(match.group(1)), int(match.group(3)))
    return f"RESULT {value if value is not None else 'error'}"


class Calculator:
    max_turns = 3

    def reset(self, row: dict) -> list[dict]:
        self.answer = str(row["answer"])
        return row["prompt"]

    def step(self, text: str) -> Step:
        answer = _ANSWER.search(text)
        if answer is not None:
            right = answer.group(1) == self.answer
            return Step([], float(right), True, solved=right)
        result = calculate(text)
        return Step([{"role": "user", "content": result or PROTOCOL}], 0.0, False)


def problem(rng: random.Random, digits: int = 3) -> dict:
    a, b = (rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(2))
    return {"prompt": [{"role": "user", "content": f"What is {a} * {b}? {PROTOCOL}"}], "a": a, "b": b,
            "answer": str(a * b)}


def _gold(row: dict, messages: list[dict]) -> str:
    results = [m["content"] for m in messages if m["content"].startswith("RESULT ")]
    return f"Answer: {results[-1].split()[1]}" if results else f"CALC {row['a']} * {row['b']}"


def _demo(row: dict, messages: list[dict], rng: random.Random) -> str:
    if len(messages) == 1 and rng.random() < 0.5:  # in its head: a digit or two wrong
        digits = list(str(row["a"] * row["b"]))
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(digits))
            digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
        return f"Answer: {''.join(digits).lstrip('0') or '0'}"
    return _gold(row, messages)


def answer_rule(prompt: str, response: str, answer=None, **row) -> float:
    """1.0 when the response's 'Answer: <n>' is the row's answer: the same task without the tool (measured
    first, `rlhf eval eval.rule=rlhf_cli.envs.calculator:answer_rule`)."""
    match = _ANSWER.search(response)
    return float(match is not None and match.group(1) == str(answer))


def no_tool_rows(held: list[dict]) -> dict[str, list[dict]]:
    """notool_eval: the held-out problems asked without the tool ('What is a * b? Write 'Answer: <n>'.'), for
    `rlhf eval ... eval.rule=rlhf_cli.envs.calculator:answer_rule`: what the model does in its head."""
    return {"notool_eval": [{"prompt": [{"role": "user", "content": f"What is {r['a']} * {r['b']}? Write 'Answer: <n>'."}],
                             "answer": r["answer"]} for r in held]}


TASK = EnvTask(Calculator, "3-digit multiplication with a calculator tool; reward for the right answer",
               problem, _demo, _gold, extra=no_tool_rows, n_sft=1000, n_prompts=1000, n_eval=100)
