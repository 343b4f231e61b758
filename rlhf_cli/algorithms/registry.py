"""Registries: algorithm pieces chosen by the name the config gives (verl's `get_adv_estimator_fn`).

    @ADVANTAGE_ESTIMATORS.register("rloo_v2", needs_values=False)
    def my_estimator(rewards, values, response_mask, scores=None, **hparams): ...

Every entry of one registry has the same signature (the registry's docstring says
which); `traits` are facts about an entry the recipe and the config checks read
instead of testing names (does it need a critic's values? does its loss trust-region
clip?). The config's choice lists are the registries' keys.
"""

from __future__ import annotations

from typing import Callable


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
