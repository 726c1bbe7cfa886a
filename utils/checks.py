"""Validation helpers: one way to say "this value is not allowed, and here is why".

Introduced in chapter 0 ("Why one device is not enough") with the first lab's
Config; every Config, ``ParallelDims``, the analytic models and the launcher use
them, so a bad value gets the same kind of message wherever it is caught: the name,
the value given, and what is allowed. They raise ``ValueError`` (``TypeError`` is
not used: a CLI maps both to the same exit, and a learner reads one kind of error).
"""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``."""
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer {allowed}, got {value!r} "
            f"({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = True,
) -> float:
    """``value`` if it is a finite real number above ``minimum`` (``strict``: >).

    Infinity and NaN are refused: they pass ``> 0`` (inf) or every comparison's
    negation (NaN) and then fail inside a rank, far from the flag that caused it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    given = value
    value = float(value)
    if minimum is not None and not (value > minimum if strict else value >= minimum):
        bound = f"{'>' if strict else '>='} {_plain(minimum)}"
        raise ValueError(f"{name} must be a number {bound}, got {given!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be a number <= {_plain(maximum)}, got {given!r}")
    return float(value)


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_choice(name: str, value, choices) -> None:
    """Raise unless ``value`` is one of ``choices`` (bools never match ints)."""
    ok = any(
        value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices
    )
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


SEED_MAX = 2**63 - 1
"""torch.manual_seed and torch.Generator take a signed 64-bit seed at most."""
