"""Field helpers of every schema: a doc on each field, and the range checks `__post_init__` methods call."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from rlhf_cli.errors import ConfigError


def doc(default, help: str, **kw):
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'} (got {value}); set {key}=<a positive number>")


INT64 = (-2**63, 2**63 - 1)  # what torch and numpy take as a C integer (seeds, counts)
INT_RANGES = {"device.threads": (1, 2**31 - 1)}  # torch.set_num_threads takes a C int


def check_int_ranges(config, prefix: str = "") -> None:
    """Every integer of a config (nested groups included) within what the libraries it reaches take: an
    out-of-range value is a one-line ConfigError here, not an overflow deep inside torch."""
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_int_ranges(value, key + ".")
        elif isinstance(value, int) and not isinstance(value, bool):
            low, high = INT_RANGES.get(key, INT64)
            if not low <= value <= high:
                shown = {2**63 - 1: "2**63-1", -2**63: "-2**63", 2**31 - 1: "2**31-1"}
                raise ConfigError(f"{key}={value} is out of range: it must be from {shown.get(low, low)} to "
                                  f"{shown.get(high, high)}; set {key}=<an integer in that range>")


def check_room(new_key: str, new_tokens: int, length_key: str, max_length: int) -> None:
    """A response limit must leave a prompt room in the sequence length (prompt + response)."""
    if new_tokens >= max_length:
        raise ConfigError(f"{new_key}={new_tokens} leaves no room for a prompt in {length_key}={max_length} "
                          f"(prompt + response); set {new_key} below {max_length} or raise {length_key}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}; set {key}=<one of those>")


def field_docs(schema, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field of a schema, for --help."""
    rows = []
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        help_text = f.metadata.get("help", "")
        ftype = f.type if not isinstance(f.type, str) else None
        default_factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if default_factory is not None and dataclasses.is_dataclass(default_factory):
            rows.extend(field_docs(default_factory, key + "."))
            continue
        default = default_factory() if default_factory is not None else f.default
        rows.append((key, repr(default) if default is not None else "null", help_text))
        del ftype
    return rows


def check_engine_name(key: str, engine: str, names: tuple[str, ...]) -> None:
    """A rollout engine: one of the shipped `names`, or a class of the user's by dotted path 'module:Class'
    (imported when the run builds it, like a reward function; engines/rollout.py)."""
    if ":" not in engine:
        check_choice(key, engine, names + ("module:Class",))


def leaf_keys(schema) -> list[str]:
    return [k for k, _, _ in field_docs(schema)]
