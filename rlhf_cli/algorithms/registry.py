"""Registries: algorithm pieces chosen by the name the config gives (verl's `get_adv_estimator_fn`).

    @ADVANTAGE_ESTIMATORS.register("rloo_v2", needs_values=False)
    def my_estimator(rewards, values, response_mask, scores=None, *, gamma, group_size): ...

Every entry of one registry takes the same leading arguments (the registry's docstring says
which); after them it names, as keyword parameters, the config keys it reads (`gamma`,
`clip_low`, ...) and the run's values (`group_size`, `max_new_tokens`, ...). `bind` binds
those once at setup and refuses a name that is no key (a misspelt parameter is an error,
never a silent default). `traits` are facts about an entry the recipe and the config
checks read instead of testing names (does it need a critic's values? does its loss
trust-region clip?). The config's choice lists are the registries' keys.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping


class Registry(dict):
    """name -> function, plus per-name traits. `what` names the config key (for messages)."""

    def __init__(self, what: str, signature: str, **default_traits):
        super().__init__()
        self.what, self.signature, self.default_traits = what, signature, default_traits
        self._traits: dict[str, dict] = {}

    def register(self, name: str, **traits) -> Callable[[Callable], Callable]:
        """Decorator: file the function under `name` with these traits (unset ones take the defaults)."""
        unknown = set(traits) - set(self.default_traits)
        if unknown:
            raise TypeError(f"{self.what}: unknown trait(s) {sorted(unknown)}; known: {sorted(self.default_traits)}")

        def add(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.what}: {name!r} is registered twice")
            self[name] = fn
            self._traits[name] = {**self.default_traits, **traits}
            return fn

        return add

    def get(self, name: str) -> Callable:  # type: ignore[override]
        """The function filed under `name`; ValueError listing the valid names otherwise."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self))}") from None

    def trait(self, name: str, trait: str):
        self.get(name)
        return self._traits[name][trait]


def bind(fn: Callable, keys: Mapping[str, Any], leading: int, what: str) -> Callable:
    """`fn` with every parameter after its first `leading` bound once from `keys`, called with those alone.

    `keys`: the config section's keys and the run's values (e.g. ``dataclasses.asdict(cfg.algorithm) |
    {"group_size": K}``); `what`: the config key that chose `fn`, for the message. A parameter that `keys`
    does not hold is refused (ValueError naming it and the keys there are; the rl recipe says it as a
    config error, before any model loads), defaulted or not: a parameter
    named ``clip_hi`` would otherwise run at its default while ``algorithm.clip_high`` is ignored. So is
    ``**kwargs``, which would swallow any key.
    """
    params = _parameters(fn)[leading:]
    name = getattr(fn, "__qualname__", repr(fn))
    swallowing = [p.name for p in params if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if swallowing:
        raise ValueError(f"{what}: {name} takes *{swallowing[0]}, which would hide a misspelt key; name the keys "
                          f"it reads as keyword parameters (known: {', '.join(sorted(keys))})")
    unknown = [p.name for p in params if p.name not in keys]
    if unknown:
        raise ValueError(f"{what}: {name} names {', '.join(repr(u) for u in unknown)}, which no config key or run "
                          f"value supplies; rename the parameter to one of: {', '.join(sorted(keys))}")
    return functools.partial(fn, **{p.name: keys[p.name] for p in params})


def reads(fn: Callable, key: str) -> bool:
    """Whether `fn` names `key` among its parameters (the config checks ask it instead of testing names)."""
    return key in inspect.signature(fn).parameters


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> tuple:
    """fn's parameters, read once: aggregate and reinforce_advantages bind per call, in every micro-batch."""
    return tuple(inspect.signature(fn).parameters.values())
