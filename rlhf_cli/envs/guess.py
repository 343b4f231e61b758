"""Guess the number: later moves depend on the environment's feedback, and fewer turns pay more.

    user:      I picked a number from 21 to 36. Guess it: write 'Guess: <n>'.
    assistant: Guess: 28
    user:      Higher.
    assistant: Guess: 32
    user:      Lower.
    assistant: Guess: 30
    user:      Correct!                    (done, solved)

Reward: +1 for the right guess, -0.1 for each other turn (a wrong or unreadable guess): intermediate rewards,
so the return is higher the fewer turns an episode takes. Each row has its own range of 16 numbers (from
LOW..LOW + 15, LOW up to MAX_LOW), so held-out rows are other ranges and secrets; halving the range finds any
of 16 numbers in 5 turns (`max_turns`). The demonstrator halves the range half the time and otherwise ignores the feedback (any
number of the row's range not guessed yet), so it often runs out of turns; RL has to learn to halve.
"""

from __future__ import annotations

import random
import re

from rlhf_cli.envs import Step
from rlhf_cli.envs.base import EnvTask

SPAN, MAX_LOW = 16, 50
TURN_COST = 0.1
_GUESS = re.compile(r"Guess:\s*(-?\d+)")


class GuessNumber:
    max_turns = 5

    def reset(self, row: dict) -> list[dict]:
        self.secret = int(row["secret"])
        return row["prompt"]

    def step(self, text: str) -> Step:
        match = _GUESS.search(text)
        if match is None:
            return Step([{"role": "user", "content": "Write 'Guess: <n>'."}], -TURN_COST, False)
        guess = int(match.group(1))
        if guess == self.secret:
            return Step([], 1.0, True, solved=True)
        return Step([{"role": "user", "content": "Higher." if guess < self.secret else "Lower."}], -TURN_COST, False)


def problem(rng: random.Random) -> dict:
    low = rng.randint(1, MAX_LOW)
    return {"prompt": [{"role": "user", "content": f"I picked a number from {low} to {low + SPAN - 1}. Guess it: "
                                                   f"write 'Guess: <n>'."}],
            "low": low, "high": low + SPAN - 1, "secret": rng.randint(low, low + SPAN - 1)}


def _range(row: dict, messages: list[dict]) -> tuple[int, int]:
    """The numbers the feedback so far allows."""
    low, high = row["low"], row["high"]
    for said, answer in zip(messages[1::2], messages[2::2]):
        guess = int(_GUESS.search(said["content"]).group(1))
        if answer["content"] == "Higher.":
            low = max(low, guess + 1)
        elif answer["content"] == "Lower.":
            high = min(high, guess - 1)
    return low, high


def _gold(row: dict, messages: list[dict]) -> str:
    low, high = _range(row, messages)
    return f"Guess: {(low + high) // 2}"


def _demo(row: dict, messages: list[dict], rng: random.Random) -> str:
    """Half the time the middle of what the feedback allows; else any number of the row's range not guessed
    yet (the feedback ignored)."""
    if rng.random() < 0.5:
        return _gold(row, messages)
    guessed = {int(_GUESS.search(m["content"]).group(1)) for m in messages if m["role"] == "assistant"}
    return f"Guess: {rng.choice([n for n in range(row['low'], row['high'] + 1) if n not in guessed])}"


TASK = EnvTask(GuessNumber, "guess a number in a range of 16 with higher/lower feedback; -0.1 a wasted turn",
               problem, _demo, _gold, n_prompts=2000, n_eval=100)
