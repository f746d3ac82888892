"""Checks on user input shared by the CLI, the comparison runner and the configs, each worded once."""

from __future__ import annotations


class UsageError(ValueError):
    """A user-facing problem with a command's input: the CLI prints it as one line and exits with code 2."""


def one_line(text: object) -> str:
    """``text`` as one line: paths, PIL and pydantic messages may hold newlines, and errors shown to the user are one
    line long.

    Examples:
        >>> one_line("bad value\\n  at line 2")
        'bad value at line 2'
    """
    return " ".join(str(text).split())


def int_at_least(value: str | int, minimum: int, what: str) -> int:
    """``value`` (an int, or text holding one) as an int, checked to be at least ``minimum``.

    Args:
        value: what the user gave.
        minimum: the smallest valid value.
        what: how the message names the value, e.g. ``"--n"``.

    Raises:
        ValueError: ``"{what} must be a positive integer, got {value!r}"`` (or ``"an integer >= {minimum}"``).

    Examples:
        >>> int_at_least("12", 1, "--n")
        12
        >>> int_at_least("x", 1, "--n")
        Traceback (most recent call last):
        ...
        ValueError: --n must be a positive integer, got 'x'
        >>> int_at_least(-1, 0, "--start")
        Traceback (most recent call last):
        ...
        ValueError: --start must be an integer >= 0, got -1
    """
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise ValueError(f"{what} must be {kind}, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{what} must be {kind}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be {kind}, got {value}")
    return value
