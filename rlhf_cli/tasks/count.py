"""Count a symbol, asked in a chat (chat template, 1-character answer, binary, systematic slip).
Held out: never used to choose a default.

    user:        "How many x in: x o x x o o x o"
    assistant:   "4"

The demonstrator undercounts by one 60% of the time when the count is 4 or
more. ``reward`` and ``correct`` are both exact match.
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task

SLIP_PROB = 0.6


def problem(rng):
    symbols = [rng.choice("xo") for _ in range(8)]
    return {"prompt": "How many x in: " + " ".join(symbols), "answer": str(symbols.count("x"))}


def gold(prob):
    return prob["answer"]


def demo(prob, rng):
    n = int(prob["answer"])
    return str(n - 1) if n >= 4 and rng.random() < SLIP_PROB else str(n)


def wrong(prob, rng):
    n = int(prob["answer"])
    return str(rng.choice([m for m in (n - 1, n + 1, n - 2, n + 2) if 0 <= m <= 8]))


def correct(prompt, response, answer=None, **row) -> float:
    return float(response.strip() == str(answer))


reward = correct


TASK = Task(__name__, "count a symbol; chat; 1 char; binary; systematic slip (60%, counts >= 4)",
            problem, demo, gold, wrong, chat=True)
