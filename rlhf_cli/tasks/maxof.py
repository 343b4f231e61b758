"""The largest of three numbers, asked in a chat (chat template, 2-character answer, binary, too few rows).

    user:        "Which is largest: 37, 81, 45?"
    assistant:   "81"

Only 400 demonstrations, all correct: the flaw is too little data.
``reward`` and ``correct`` are both exact match.
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task


def problem(rng):
    nums = rng.sample(range(10, 100), 3)
    return {"prompt": "Which is largest: " + ", ".join(map(str, nums)) + "?", "answer": str(max(nums)), "nums": nums}


def gold(prob):
    return prob["answer"]


def demo(prob, rng):
    return gold(prob)


def wrong(prob, rng):
    top = max(prob["nums"])
    flipped = int(str(top)[::-1]) if top % 10 else top - 1  # digits swapped: 81 -> 18
    return str(rng.choice(sorted(prob["nums"])[:2] + ([flipped] if flipped != top else [])))


def correct(prompt, response, answer=None, **row) -> float:
    return float(response.strip() == str(answer))


reward = correct


TASK = Task(__name__, "largest of three; chat; 2 chars; binary; too few rows (400)", problem, demo, gold, wrong,
            chat=True, n_sft=400)
