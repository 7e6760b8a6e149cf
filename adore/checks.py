"""The checks every setting goes through: a count is an int that is not a bool (YAML's `true` is an int to
Python, and must not pass as 1), a share a real number inside (0, 1), a positive number a real above 0. One
function each, so that every config key fails the same way: one line naming the key, the value and the fix."""

from __future__ import annotations


def is_integer(value, least: int = 1) -> bool:
    """An int >= `least` that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_integer(name: str, value, least: int = 1, *, optional: bool = False, fix: str = "") -> None:
    """ValueError `name=value must be a positive integer` (or `an integer >= least`; `or null` where
    `optional` allows None) unless `value` is one; `fix` is appended (e.g. ": pass e.g. K=64")."""
    if (value is None and optional) or is_integer(value, least):
        return
    kind = "a positive integer" if least == 1 else f"an integer >= {least}"
    raise ValueError(f"{name}={value!r} must be {kind}" + (" or null" if optional else "") + fix)


def is_share(value, closed: bool = False) -> bool:
    """A real number in (0, 1), or in [0, 1] when `closed`; never a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 <= value <= 1 if closed else 0 < value < 1


def check_share(name: str, value, closed: bool = False, *, optional: bool = False, fix: str = "") -> None:
    """ValueError `name=value must be a share in (0, 1)` (`[0, 1]` when `closed`; `or null` where `optional`)
    unless `value` is one; `fix` is appended."""
    if (value is None and optional) or is_share(value, closed):
        return
    interval = "[0, 1]" if closed else "(0, 1)"
    raise ValueError(f"{name}={value!r} must be a share in {interval}" + (" or null" if optional else "") + fix)


def check_positive(name: str, value, *, fix: str = "") -> None:
    """ValueError `name=value must be a number > 0` unless `value` is a real number above 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a number > 0" + fix)
