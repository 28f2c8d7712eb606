"""Input checks shared by every module: one place that says what a valid count, id or number is.

NOTE: `bool` is a subclass of `int` in Python, so `True` would pass a plain isinstance check
as the number 1; every check here refuses it. Numbers must also be finite: a temperature of
`inf` or a theta of `nan` is refused where it is written, not found later as NaN logits.

>>> require_int("block_size", 16, minimum=1)
16
>>> require_int("block_size", True, minimum=1)
Traceback (most recent call last):
...
ValueError: block_size must be an int >= 1, got True
>>> require_number("temperature", float("inf"), minimum=0)
Traceback (most recent call last):
...
ValueError: temperature must be a finite number >= 0, got inf
"""

from __future__ import annotations

import math
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


def require_number(name: str, value: object, minimum: float | None = None,
                   maximum: float | None = None, *, above: float | None = None) -> float:
    """`value` as a float if it is a finite int or float (not a bool) in range; else ValueError.

    `minimum` and `maximum` are inclusive bounds, `above` an exclusive lower bound.

    >>> require_number("top_p", 1, above=0, maximum=1)
    1.0
    """
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value)
          and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
          and (above is None or value > above))
    if not ok:
        bounds = " and ".join(b for b in (f"> {above}" if above is not None else "",
                                          f">= {minimum}" if minimum is not None else "",
                                          f"<= {maximum}" if maximum is not None else "") if b)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, "
                         f"got {value!r}")
    return float(value)  # type: ignore[arg-type]


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
