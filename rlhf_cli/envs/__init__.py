"""Multi-turn environments: the model acts over several turns and an environment answers each one.

    rlhf rl env.name=rlhf_cli.envs.calculator:Calculator env.max_turns=3 reward.functions=[] ...

An environment is a class named by dotted path (`env.name=module:Class`, as reward functions are), made
anew for every episode (no argument) and driven through two methods:

    reset(row) -> list[dict]      the opening messages ({role, content}) of the row's episode
    step(text) -> Step            the assistant's turn as text -> Step(messages, reward, done, solved)

`messages` are appended to the conversation (a tool's result, the user's reply) and rendered by the model's
chat template; `reward` is this turn's reward, placed on the assistant turn's last token (process-reward
style: rlhf_cli/engines/episodes.py, docs/environments.md); `done` ends the episode; `solved` (given when
done) is the episode's success, the held-out accuracy of `rlhf rl` / `rlhf eval`. A class attribute
`max_turns` is the default for env.max_turns. A plain tuple (messages, reward, done[, solved]) is read as a Step.

Failures never end the run: a step that raises, runs past env.timeout_s or returns the wrong types ends that
episode with the reason logged (env_errors; the turn's reward 0), the run goes on. A class that cannot be
imported or has no reset/step, or a reset that fails on a data row at setup (the opening prompts are rendered
before any weights load), is one `error:` line, exit 2.
"""

from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass, field

from rlhf_cli.errors import UserError


@dataclass
class Step:
    """What an environment returns for one assistant turn."""
    messages: list[dict] = field(default_factory=list)  # appended to the conversation (tool results, replies)
    reward: float = 0.0  # this turn's reward, on the assistant turn's last token
    done: bool = False  # the episode ends after this turn
    solved: bool | None = None  # when done: the episode's success (held-out accuracy)


class EnvFailure(Exception):
    """An environment call that raised, hung or returned the wrong types: ends its episode, never the run."""


def env_class(name: str, key: str = "env.name"):
    """The class `module:Class` names, imported and checked for reset/step (one error line otherwise)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"{key}={name!r} is not 'module:Class'; e.g. {key}=rlhf_cli.envs.calculator:Calculator")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(f"{key}={name}: cannot import module {module_name!r} ({type(e).__name__}: {e}); check the "
                        f"name and that it is on PYTHONPATH") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise UserError(f"{key}={name} is not an environment class: name a class with reset(row) -> messages and "
                        f"step(text) -> Step(messages, reward, done, solved) (docs/environments.md)")
    return cls


def call(fn, args: tuple, timeout_s: float, what: str):
    """fn(*args) in a daemon thread, waited for at most timeout_s -> its value; raises EnvFailure when it raises
    or runs past the limit (a hung call's thread is left behind: Python cannot stop it, the episode ends)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - any failure of the user's code ends the episode only
            out["error"] = f"{what} raised {type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EnvFailure(f"{what} ran past env.timeout_s={timeout_s}")
    if "error" in out:
        raise EnvFailure(out["error"])
    return out["value"]


def check_messages(value, what: str) -> list[dict]:
    """A list of {role: str, content: str} messages, else EnvFailure naming what came back."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise EnvFailure(f"{what} returned {_short(value)}: expected a list of {{role, content}} messages")
    return value


def as_step(value) -> Step:
    """A Step, or a tuple (messages, reward, done[, solved]) read as one; EnvFailure on anything else."""
    if isinstance(value, tuple) and len(value) in (3, 4):
        value = Step(*value)
    if not isinstance(value, Step):
        raise EnvFailure(f"step returned {_short(value)}: expected Step(messages, reward, done, solved) or a tuple "
                         f"(messages, reward, done)")
    check_messages(value.messages, "step")
    if isinstance(value.reward, bool) or not isinstance(value.reward, (int, float)) or not math.isfinite(value.reward):
        raise EnvFailure(f"step returned reward {_short(value.reward)}: expected a finite number")
    if not isinstance(value.done, bool) or not (value.solved is None or isinstance(value.solved, bool)):
        raise EnvFailure(f"step returned done={_short(value.done)}, solved={_short(value.solved)}: expected bools")
    return value


def opening(cls, row: dict, timeout_s: float):
    """(a fresh environment for `row`, its opening messages); EnvFailure when reset fails."""
    env = call(cls, (), timeout_s, "the environment's constructor")
    return env, check_messages(call(env.reset, (row,), timeout_s, "reset"), "reset")


def openings(cls, rows: list[dict], timeout_s: float, key: str) -> list[list[dict]]:
    """The opening messages of every row (at setup, before any weights load): a failure is one error line."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(opening(cls, row, timeout_s)[1])
        except EnvFailure as e:
            raise UserError(f"{key} row {i}: {e}; fix the environment or the row") from None
    return out


def transcript(summary: dict) -> str:
    """An episode's summary (engines/episodes.Episode.summary) as lines 'role: content', then how it ended."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in summary["messages"]) + f"\n[{summary['end']}]"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
