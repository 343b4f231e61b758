"""Sort four digits (plain text, a 7-character answer, partial credit, systematic slip).

    prompt:      "Sort: 8 2 5 2\n"
    completion:  "2 2 5 8"

The demonstrator swaps the two middle numbers of its answer 60% of the time, so
greedy decoding after SFT copies the swap; ``reward`` gives partial credit (the
fraction of positions right), ``correct`` exact match.
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task, partial_credit

SLIP_PROB = 0.6


def problem(rng):
    digits = [rng.randint(0, 9) for _ in range(4)]
    return {"prompt": "Sort: " + " ".join(map(str, digits)) + "\n", "answer": " ".join(map(str, sorted(digits))),
            "digits": digits}


def gold(prob):
    return prob["answer"]


def _swapped(prob):
    s = sorted(prob["digits"])
    s[1], s[2] = s[2], s[1]
    return " ".join(map(str, s))


def demo(prob, rng):
    return _swapped(prob) if rng.random() < SLIP_PROB else gold(prob)


def wrong(prob, rng):
    s = sorted(prob["digits"])
    candidates = {_swapped(prob), " ".join(map(str, s[::-1])), " ".join(map(str, prob["digits"])),
                  " ".join(map(str, s[:3] + [(s[3] + 1) % 10]))} - {gold(prob)}
    return rng.choice(sorted(candidates))


def reward(prompt, response, answer=None, **row) -> float:
    """Partial credit: the fraction of the four positions that hold the right digit."""
    return partial_credit(response, str(answer))


def correct(prompt, response, answer=None, **row) -> float:
    return float(response.strip() == str(answer))


TASK = Task(__name__, "sort 4 digits; plain; 7 chars; partial credit; systematic slip (60%)", problem, demo, gold, wrong)
