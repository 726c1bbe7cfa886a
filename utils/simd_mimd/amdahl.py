"""Amdahl's and Gustafson's laws, and fitting the serial fraction to timings:
chapter 6, "SIMD and MIMD", section "Why adding workers stops paying".

Amdahl (G. M. Amdahl, "Validity of the single processor approach to achieving large
scale computing capabilities", AFIPS Spring Joint Computer Conference, 1967, in the
form it is usually written): a job whose fraction ``s`` of the one-worker time
cannot be shared runs on ``n`` workers in

    T(n) = T(1) (s + (1 - s) / n),   so the speedup is   1 / (s + (1 - s) / n),

which never exceeds ``1 / s`` however many workers there are (*strong* scaling: the
same job, more workers).

Gustafson (J. L. Gustafson, "Reevaluating Amdahl's Law", Communications of the
ACM 31(5), 1988): let the job grow with the workers so that each keeps the same
share, and call ``s'`` the serial fraction of the time *on n workers*; the scaled
speedup, the time one worker would need for the grown job over the time n take, is

    S(n) = n - s' (n - 1)

(*weak* scaling). The two are the same arithmetic read from opposite ends.

:func:`fit_serial_fraction` and :func:`fit_gustafson` are least-squares fits, linear
in the fraction, so they have a closed form: no optimiser, no starting guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from utils.checks import check_number


def _check_fraction(s: float) -> float:
    return check_number("serial_fraction", s, minimum=0, maximum=1, strict=False)


def amdahl_speedup(serial_fraction: float, workers: float) -> float:
    """``1 / (s + (1 - s) / n)``; ``workers=math.inf`` gives the bound ``1 / s``."""
    s = _check_fraction(serial_fraction)
    if not workers >= 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if math.isinf(workers):
        return math.inf if s == 0 else 1 / s
    return 1 / (s + (1 - s) / workers)


def gustafson_speedup(serial_fraction: float, workers: float) -> float:
    """Scaled speedup ``n - s' (n - 1)``, with ``s'`` measured on ``n`` workers."""
    s = _check_fraction(serial_fraction)
    if not workers >= 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    return workers - s * (workers - 1)


def _points(times: Mapping[int, float]) -> tuple[list[int], list[float]]:
    if 1 not in times:
        raise ValueError(f"need the one-worker time; got workers {sorted(times)}")
    others = [n for n in sorted(times) if n != 1]
    if not others:
        raise ValueError("need at least one time with more than one worker")
    for n, t in times.items():
        check_number(f"time at {n} workers", t, minimum=0)
    return others, [times[n] for n in others]


def fit_serial_fraction(times: Mapping[int, float]) -> float:
    """Amdahl's ``s`` from times (seconds) per number of workers.

    Minimises ``sum_n (T(n)/T(1) - s (1 - 1/n) - 1/n)^2`` over ``n > 1``:
    ``s = sum (y_n - 1/n)(1 - 1/n) / sum (1 - 1/n)^2`` with ``y_n = T(n)/T(1)``.
    Not clipped: below 0 means better than linear (cache effects, or noise), above
    1 means slower with more workers (contention); both are worth seeing.
    """
    ns, ts = _points(times)
    t1 = times[1]
    num = sum((t / t1 - 1 / n) * (1 - 1 / n) for n, t in zip(ns, ts))
    den = sum((1 - 1 / n) ** 2 for n in ns)
    return num / den


def fit_gustafson(scaled_speedups: Mapping[int, float]) -> float:
    """Gustafson's ``s'`` from scaled speedups per number of workers: minimises
    ``sum_n (n - s'(n - 1) - S(n))^2``, so ``s' = sum (n - S)(n - 1) / sum (n-1)^2``."""
    ns = [n for n in sorted(scaled_speedups) if n != 1]
    if not ns:
        raise ValueError("need at least one scaled speedup with more than one worker")
    num = sum((n - scaled_speedups[n]) * (n - 1) for n in ns)
    return num / sum((n - 1) ** 2 for n in ns)


def speedups(times: Mapping[int, float]) -> dict[int, float]:
    """``T(1) / T(n)`` for every n measured."""
    if 1 not in times:
        raise ValueError(f"need the one-worker time; got workers {sorted(times)}")
    return {n: times[1] / t for n, t in sorted(times.items())}


def scaled_speedups(t_one: float, weak_times: Mapping[int, float]) -> dict[int, float]:
    """Gustafson's measured scaled speedup ``n T_1(W) / T_n(n W)``: n workers each
    doing the one-worker job ``W``, against one worker doing the n jobs in turn."""
    return {n: n * t_one / t for n, t in sorted(weak_times.items())}


def amdahl_curve(serial_fraction: float, workers: Sequence[float]) -> list[float]:
    """Modelled speedups at ``workers`` (for figures; ``s`` clipped to [0, 1])."""
    s = min(max(serial_fraction, 0.0), 1.0)
    return [amdahl_speedup(s, n) for n in workers]
