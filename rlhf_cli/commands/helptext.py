"""Help text on stdout: a table on a terminal, plain `key = value  # doc` lines anywhere else.

    rlhf rl algorithm=ppo --help | grep kl       # every key, never cut, greppable
    rlhf rl --help                               # on a terminal: a table

Help goes to stdout (so it pipes into grep / less), and when stdout is not a
terminal it is printed as one unwrapped line per key: rich would otherwise
wrap or cut a table at 80 columns in a pipe. Values are written as YAML
scalars (null, true, 0.0003, [0.9, 0.95]), the way `--cfg job` writes them.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def out() -> Console:
    """A console on stdout that never wraps a line outside a terminal."""
    return Console(highlight=False, soft_wrap=not stdout_is_terminal())


def render(value) -> str:
    """A config value as one YAML scalar: null, true, a number, a plain string, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    return json.dumps(value, separators=(", ", ": "))


def print_text(text: str) -> None:
    out().print(text, markup=False)


def print_keys(title: str, rows: list[tuple[str, str, str]]) -> None:
    """rows: (dotted key, rendered default, doc)."""
    console = out()
    if stdout_is_terminal():
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title)
        for col in ("key", "default", "doc"):
            table.add_column(col)
        for key, default, doc in rows:
            table.add_row(escape(key), escape(default), escape(doc))
        console.print(table)
        return
    console.print(f"{title}:", markup=False)
    width = max((len(k) for k, _, _ in rows), default=0)
    for key, default, doc in rows:
        console.print(f"  {key:<{width}} = {default}" + (f"  # {doc}" if doc else ""), markup=False)
