"""The embedded task over turns: the environment reveals the mod-10 chain one operation a turn.

    user:      Start at 7. add 2.          (the opening: the start and the first operation)
    assistant: 7+2=9
    user:      sub 3.                      (the environment: the next operation, known only now)
    assistant: 9-3=6
    user:      add 1.
    assistant: 6+1=7                       (done: solved when the last value is right)

The operations come from the environment, so no policy can solve an episode without its answers. Each turn
whose value is right earns 1 / (number of operations) (`ModSteps`: intermediate rewards summing to the share of
right turns); `ModStepsOutcome` pays 1 at the end for a right last value and nothing before (the episode
return alone). The demonstrator slips as the embedded task's does (adds instead of subtracting, with
probability rlhf_cli.task.SLIP_PROB), so SFT leaves room for RL.
"""

from __future__ import annotations

import random
import re

from rlhf_cli.envs import Step
from rlhf_cli.envs.base import EnvTask
from rlhf_cli.task import SLIP_PROB

N_OPS = 3
_VALUE = re.compile(r"=\s*(\d+)\s*$")


def _apply(value: int, op: str, operand: int) -> int:
    return (value + operand) % 10 if op == "+" else (value - operand) % 10


def _say(op: str, operand: int) -> str:
    return f"{'add' if op == '+' else 'sub'} {operand}."


class ModSteps:
    """Reward 1 / N_OPS for each turn whose value is right; solved when the last value is right."""
    max_turns = N_OPS
    per_turn = True

    def reset(self, row: dict) -> list[dict]:
        self.ops, self.turn, self.value = [tuple(o) for o in row["ops"]], 0, int(row["start"])
        self.right = 0
        return row["prompt"]

    def step(self, text: str) -> Step:
        op, operand = self.ops[self.turn]
        self.value = _apply(self.value, op, operand)  # the true running value
        match = _VALUE.search(text.strip())
        right = match is not None and int(match.group(1)) == self.value
        self.right += right
        self.turn += 1
        done = self.turn == len(self.ops)
        reward = (right / len(self.ops)) if self.per_turn else float(done and right)
        if done:
            return Step([], reward, True, solved=bool(right))
        return Step([{"role": "user", "content": _say(*self.ops[self.turn])}], reward, False)


class ModStepsOutcome(ModSteps):
    """The same episodes, rewarded once: 1 at the end for a right last value."""
    per_turn = False


def problem(rng: random.Random) -> dict:
    start = rng.randint(0, 9)
    ops = [(rng.choice("+-"), rng.randint(1, 3)) for _ in range(N_OPS)]
    return {"prompt": [{"role": "user", "content": f"Start at {start}. {_say(*ops[0])}"}], "start": start,
            "ops": [list(o) for o in ops]}


def _turn(row: dict, messages: list[dict], slip: bool) -> str:
    """The next turn 'a+b=c' from the last value the assistant wrote (the start before any)."""
    done = [m for m in messages if m["role"] == "assistant"]
    value = int(done[-1]["content"].rsplit("=", 1)[1]) if done else int(row["start"])
    op, operand = row["ops"][len(done)]
    return f"{value}{op}{operand}={_apply(value, '+' if slip and op == '-' else op, operand)}"


TASK = EnvTask(ModSteps, "mod-10 chain revealed a step a turn; reward per right turn",
               problem, lambda row, messages, rng: _turn(row, messages, rng.random() < SLIP_PROB),
               lambda row, messages: _turn(row, messages, False))
