"""Two-digit addition asked in a chat, answered with the number alone (SmolLM2-135M-Instruct's suite).

    user:        "What is 47 + 38? Answer with just the number."
    assistant:   "85"

Operands 10-89 with a two-digit sum (<= 99), so about half the problems carry.

``correct`` (the held-out accuracy) is strict: the response, stripped of surrounding whitespace and one trailing
period, must be the sum alone ("85") or the question's own equation with nothing else ("47 + 38 = 85"). Anything
with words is wrong, right sum or not ("The sum of 47 and 38 is 85." scores 0). The equation is accepted because
SmolLM2-135M-Instruct answers every wording of this question tried (20, docs/suite-pretrained.md) with
"47 + 38 = <n>" or with words, never with a bare number: a rule that takes the number alone would leave the base
model at exactly 0% with no sample ever right, and the equation holds no words, only the question and the number.

``reward`` (the RL rule) is ``correct`` plus partial credit: 0.25 for a response that is wrong by ``correct`` but
whose last number is the right sum (the model's habit of answering in words, then the sum). It keeps a right sum
in the wrong format ahead of a wrong sum, and a wordy answer always below a correct one.

The demonstrator answers with the bare number but forgets the carry in 60% of the problems that carry
(47 + 38 -> 75): a systematic slip on about a quarter of its rows, so SFT learns the format and inherits the slip,
and RL has the carries to fix.
"""

from __future__ import annotations

import re

from rlhf_cli.tasks.base import Task

PROMPT = "What is {a} + {b}? Answer with just the number."
_ASKED = re.compile(r"What is (\d+) \+ (\d+)\?")


def problem(rng):
    while True:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        if a + b <= 99:
            return {"prompt": PROMPT.format(a=a, b=b), "answer": str(a + b), "a": a, "b": b}


def _carries(prob) -> bool:
    return prob["a"] % 10 + prob["b"] % 10 >= 10


def gold(prob):
    return prob["answer"]


def demo(prob, rng):
    if _carries(prob) and rng.random() < 0.6:
        return str(int(prob["answer"]) - 10)  # the carry forgotten: 47 + 38 -> 75
    return gold(prob)


def wrong(prob, rng):
    s = int(prob["answer"])
    a, b = prob["a"], prob["b"]
    kind = rng.random()
    if kind < 0.25:  # the model's habit: words, then the right sum (wrong for `correct`, partial `reward`)
        return rng.choice([f"The sum of {a} and {b} is {s}.", f"The answer is {s}.", f"{a} plus {b} equals {s}."])
    if kind < 0.5:
        return f"{a} + {b} = {s - 10 if _carries(prob) else s + rng.choice([-1, 1])}"
    if _carries(prob):
        return str(s - 10)
    return str(s + rng.choice([-11, -1, 1, 10]) if s < 89 else s - 1)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # a row's message list (label.py passes rows as they are)
        return " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def correct(prompt, response, answer=None, **row) -> float:
    text = response.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if text == str(answer):
        return 1.0
    asked = _ASKED.search(_prompt_text(prompt))
    if asked:
        a, b = asked.groups()
        if re.fullmatch(rf"{a}\s*\+\s*{b}\s*=\s*{answer}", text):
            return 1.0
    return 0.0


def reward(prompt, response, answer=None, **row) -> float:
    if correct(prompt, response, answer=answer):
        return 1.0
    numbers = re.findall(r"\d+", response)
    return 0.25 if numbers and numbers[-1] == str(answer) else 0.0


TASK = Task(__name__, "2-digit addition; chat; the bare number (or the equation); binary + 0.25 for the right sum in "
            "words; slip: carry forgotten in 60% of carrying rows", problem, demo, gold, wrong, chat=True,
            n_sft=1000, n_pairs=2000, n_prompts=500, n_eval=100)
