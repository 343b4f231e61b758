"""Running sums, one line each (plain text, ~10 characters, process reward per line, systematic slip on the
last line). Held out: never used to choose a default.

    prompt:      "Running sums of 7 8 4 9\n"
    completion:  "7\n15\n19\n28"

Each line is the sum so far. The demonstrator's last line forgets the carry 60% of the time where the last
addition has one (19 + 9 written as 18), so greedy decoding after SFT gets those problems wrong on the last
line alone (single-digit terms: the tiny model's arithmetic is not the limit; with 2-digit terms it was, and
its third and fourth lines were wrong far more often than the designed slip). ``reward`` is a process reward, one per line: +0.2 / -0.2 for each line as written against the
right one at its place, and 1 more on the last line for a right final sum; ``total`` is the same sum as one
outcome reward (the per-line rewards added up); ``correct`` checks the final sum.
"""

from __future__ import annotations

import re

from rlhf_cli.tasks.base import Task

SLIP_PROB = 0.6
TERMS = 4


def problem(rng):
    nums = [rng.randint(2, 9) for _ in range(TERMS)]
    return {"prompt": f"Running sums of {' '.join(map(str, nums))}\n", "answer": str(sum(nums)), "nums": nums}


def _lines(nums: list[int], forget_carry: bool = False) -> list[str]:
    sums = [sum(nums[:i + 1]) for i in range(len(nums))]
    before, last = sums[-2], nums[-1]
    if forget_carry and before % 10 + last % 10 >= 10:  # the last addition without its carry
        sums[-1] = (before // 10 + last // 10) * 10 + (before + last) % 10
    return [str(s) for s in sums]


def gold(prob):
    return "\n".join(_lines(prob["nums"]))


def demo(prob, rng):
    return "\n".join(_lines(prob["nums"], forget_carry=rng.random() < SLIP_PROB))


def wrong(prob, rng):
    nums = prob["nums"]
    slipped = _lines(nums, forget_carry=True)
    if slipped != _lines(nums) and rng.random() < 0.7:
        return "\n".join(slipped)
    lines = _lines(nums)
    lines[-1] = str(int(lines[-1]) + rng.choice([-10, -1, 1, 10]))
    return "\n".join(lines)


def _numbers(prompt: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", prompt.split("Running sums of", 1)[-1])[:TERMS]]


def correct(prompt, response, answer=None, **row) -> float:
    lines = response.strip().split("\n")
    return float(lines[-1].strip() == str(answer))


def reward(prompt, response, answer=None, **row) -> list[tuple[int, float]]:
    """Process reward: (end offset of each line, +0.2 / -0.2 against the right line at its place), the last
    line's value plus 1 for a right final sum."""
    want = _lines(_numbers(prompt))
    values, pos = [], 0
    lines = response.split("\n")
    for i, line in enumerate(lines):
        pos += len(line) + (1 if i else 0)
        values.append((pos, 0.2 if i < len(want) and line.strip() == want[i] else -0.2))
    end, last = values[-1]
    values[-1] = (end, last + correct(prompt, response, answer))
    return values


def total(prompt, response, answer=None, **row) -> float:
    """The per-line rewards added up, given as one outcome reward (the score of the whole response)."""
    return sum(v for _, v in reward(prompt, response, answer))


TASK = Task(__name__, "running sums, one line each; plain; ~10 chars; process reward; systematic slip (60%)",
            problem, demo, gold, wrong)
