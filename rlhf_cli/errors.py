"""User-facing errors: one line, exit code 2, no traceback (the CLI formats them)."""


class UserError(Exception):
    """A problem the user can fix: bad input, config, path. Message names the problem and the fix."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot work; raised before any model loads."""


class DataError(UserError):
    """Missing, malformed or empty data."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line for a one-line message, at most `limit` characters ('...' marks a cut)."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."
