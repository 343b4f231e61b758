"""Two-digit addition written as steps (plain text, ~45 characters, process reward, systematic slip).

    prompt:      "Add 47 and 38.\n"
    completion:  "units 7+8=15, carry 1. tens 4+3+1=8. Answer: 85"

The demonstrator forgets the carry in the tens step 60% of the time
("tens 4+3=7. Answer: 75"), so greedy decoding after SFT gets the carrying
half of the problems wrong. ``reward`` is a process reward: +0.2 or -0.2 on each
step as written against the right step, and 1 on a right final answer;
``correct`` checks the final answer.
"""

from __future__ import annotations

import re

from rlhf_cli.tasks.base import Task

SLIP_PROB = 0.6


def problem(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"Add {a} and {b}.\n", "answer": str(a + b), "a": a, "b": b}


def _steps(a: int, b: int, forget_carry: bool = False) -> list[str]:
    u = a % 10 + b % 10
    carry = u // 10
    steps = [f"units {a % 10}+{b % 10}={u}" + (f", carry {carry}" if carry else "")]
    if carry and not forget_carry:
        steps.append(f"tens {a // 10}+{b // 10}+{carry}={a // 10 + b // 10 + carry}")
        total = a + b
    else:
        steps.append(f"tens {a // 10}+{b // 10}={a // 10 + b // 10}")
        total = (a // 10 + b // 10) * 10 + u % 10
    return steps + [f"Answer: {total}"]


def gold(prob):
    return ". ".join(_steps(prob["a"], prob["b"]))


def demo(prob, rng):
    return ". ".join(_steps(prob["a"], prob["b"], forget_carry=rng.random() < SLIP_PROB))


def wrong(prob, rng):
    a, b = prob["a"], prob["b"]
    if (a % 10 + b % 10) >= 10 and rng.random() < 0.7:
        return ". ".join(_steps(a, b, forget_carry=True))
    steps = _steps(a, b)
    off = rng.choice([-10, -1, 1, 10])
    return ". ".join(steps[:-1] + [f"Answer: {a + b + off}"])


_ANSWER = re.compile(r"Answer: (-?\d+)\s*$")


def _final(response: str) -> str | None:
    m = _ANSWER.search(response.strip())
    return m.group(1) if m else None


def correct(prompt, response, answer=None, **row) -> float:
    return float(_final(response) == str(answer))


def reward(prompt, response, answer=None, **row) -> list[tuple[int, float]]:
    """Process reward: (end offset, +0.2 / -0.2) for each written step against the right one at its
    place, then (end of response, 1 or 0) for the final answer."""
    a, b = map(int, re.findall(r"\d+", prompt)[:2])
    want = _steps(a, b)[:-1]
    values, pos = [], 0
    for i, part in enumerate(response.split(". ")):
        pos += len(part) + (2 if i else 0)
        if part.startswith(("units", "tens")):
            values.append((min(pos, len(response)), 0.2 if i < len(want) and part == want[i] else -0.2))
    values.append((len(response), correct(prompt, response, answer)))
    return values


TASK = Task(__name__, "2-digit addition in steps; plain; ~45 chars; process reward; systematic slip (60%)",
            problem, demo, gold, wrong)
