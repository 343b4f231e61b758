"""Reward sources: rule functions named by dotted path, called safely, combined by weight.

A reward function is ``f(prompt, response, **row) -> float`` (a verifiable
reward), or returns a list of ``(end_char, value)`` pairs: process rewards, one
per reasoning step, each placed on the token that holds the step's last
character. Functions are imported only from the dotted paths the config names.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

from rlhf_cli.errors import UserError

RESERVED = ("prompt", "response")


def import_reward_function(dotted: str, key: str = "reward.functions") -> Callable:
    module_name, _, attr = dotted.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(f"{key}: cannot import module {module_name!r} for {dotted!r} ({type(e).__name__}: {e}); "
                        f"check the name and that it is on PYTHONPATH") from None
    if not hasattr(module, attr):
        raise UserError(f"{key}: {module_name!r} has no function {attr!r}; write 'module:function'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"{key}: {module_name}:{attr} is {type(fn).__name__} {_short(fn)}, not callable; name a "
                        f"function f(prompt, response, **row) -> float")
    return fn


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def row_kwargs(row: dict) -> dict:
    """The row's other fields, passed to reward functions as keyword arguments."""
    return {k: v for k, v in row.items() if k not in RESERVED}


def call_reward(fn: Callable, name: str, prompt: str, response: str, row: dict):
    """-> float, or list of (end_char, value). A raise or a non-number is a UserError naming the prompt."""
    try:
        value = fn(prompt, response, **row_kwargs(row))
    except Exception as e:
        raise UserError(f"reward function {name} raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from None
    if isinstance(value, (list, tuple)):
        try:
            pairs = [(int(end), float(v)) for end, v in value]
        except (TypeError, ValueError):
            raise UserError(f"reward function {name} returned {value!r}: expected a number or (end_char, value) pairs "
                            f"(prompt {prompt[:60]!r})") from None
        if any(not math.isfinite(v) for _, v in pairs):
            raise UserError(f"reward function {name} returned a non-finite value (prompt {prompt[:60]!r})")
        return pairs
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UserError(f"reward function {name} returned {value!r}, not a finite number (prompt {prompt[:60]!r})")
    return float(value)
