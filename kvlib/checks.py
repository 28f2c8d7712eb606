"""Input checks shared by every module: one place that says what a valid count or id is.

NOTE: `bool` is a subclass of `int` in Python, so `True` would pass a plain isinstance check
as the number 1; every check here refuses it.

>>> require_int("block_size", 16, minimum=1)
16
>>> require_int("block_size", True, minimum=1)
Traceback (most recent call last):
...
ValueError: block_size must be an int >= 1, got True
"""

from __future__ import annotations

from collections.abc import Iterable


def is_int(value: object) -> bool:
    """True for Python ints, not bools (numpy and torch scalars are refused: pass int(x))."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value: object, minimum: int | None = None,
                maximum: int | None = None) -> int:
    """`value` if it is an int in [minimum, maximum] (either bound optional); else ValueError."""
    ok = is_int(value) and (minimum is None or value >= minimum) and (
        maximum is None or value <= maximum)
    if not ok:
        bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)
        raise ValueError(f"{name} must be an int{' ' + bounds if bounds else ''}, got {value!r}")
    return value  # type: ignore[return-value]


def require_ids(name: str, ids: Iterable[object]) -> list[int]:
    """A non-empty list of distinct non-negative ints (sequence ids), or ValueError."""
    out = list(ids)
    if not out:
        raise ValueError(f"{name} is empty: name at least one sequence")
    for i in out:
        require_int(f"each of {name}", i, minimum=0)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out}")
    return out  # type: ignore[return-value]
