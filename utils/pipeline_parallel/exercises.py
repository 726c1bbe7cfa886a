"""Checks for the exercises of chapter 5, "Pipeline parallelism".

* :func:`check_one_f_one_b` (exercise 5.1): the learner's 1F1B action list for
  each rank of a ``(p, m)`` pipeline, run through ``check.validate`` (every F
  before its B, an order the ranks can run together, blocking send/recv without
  deadlock) and compared with the course's ``schedules.one_f_one_b``, with the
  warm-up and the activations in flight named when they differ.
* :func:`check_bubble` (exercise 5.2): the bubble of any schedule's action lists
  for given durations, against ``check.simulate``; the usual slips (the "of
  ideal" convention, the closed formula, no cross-rank dependencies) are named.
* :func:`check_micro_batches` (exercise 5.3): the fewest micro-batches that keep
  the bubble of the step under a target, for each schedule, against the papers'
  formulas (exact fractions) and confirmed by ``check.simulate`` at the answer.

Nothing here starts a process. A check prints one line when the answer is right
and raises ``AssertionError`` with what was expected when it is not.
"""

from __future__ import annotations

from fractions import Fraction

from utils.pipeline_parallel.check import (
    Deadlock,
    expected_bubble,
    peak_activations,
    simulate,
    validate,
)
from utils.pipeline_parallel.schedules import (
    SCHEDULES,
    Action,
    ScheduleError,
    all_ranks,
    one_f_one_b,
    parse,
)

__all__ = [
    "BUBBLE_CASES",
    "LAB_TIMES",
    "check_bubble",
    "check_micro_batches",
    "check_one_f_one_b",
    "micro_batches_for",
]

# ------------------------------------------------------------------ 5.1: 1F1B
ONE_F_ONE_B_SIZES = [
    (p, m)
    for p in (1, 2, 3, 4, 8)
    for m in sorted({1, 2, max(1, p - 1), p, p + 1, 2 * p, 4 * p})
]
"""Every (p, m) the check asks about: fewer micro-batches than stages too."""


def _actions(got, where: str) -> list[Action]:
    """The learner's list as Actions (an Action, or its text "0F1", per item)."""
    if isinstance(got, str):
        raise AssertionError(
            f"{where}: return a list of actions (Action('F', 0, 1) or '0F1'), "
            f"not one string {got[:40]!r}: try parse(...) or .split()"
        )
    try:
        items = list(got)
    except TypeError:
        raise AssertionError(f"{where}: returned {got!r}, not a list") from None
    out = []
    for item in items:
        if isinstance(item, Action):
            out.append(item)
        elif isinstance(item, str):
            try:
                out += parse(item)
            except ValueError as err:
                raise AssertionError(f"{where}: {err}") from None
        else:
            raise AssertionError(
                f"{where}: {item!r} is neither an Action nor text like '0F1'"
            )
    return out


def _warmup(actions: list[Action]) -> int:
    """Forwards before the first backward."""
    for i, a in enumerate(actions):
        if a.kind != "F":
            return i
    return len(actions)


def check_one_f_one_b(fn) -> None:
    """``fn(rank, p, m)`` must return rank ``rank``'s 1F1B actions (``Action`` or
    text like ``"0F1"``) for every (p, m) of :data:`ONE_F_ONE_B_SIZES`: a valid,
    deadlock-free schedule that is the course's ``one_f_one_b``."""
    for p, m in ONE_F_ONE_B_SIZES:
        rows = [_actions(fn(r, p, m), f"p={p}, m={m}, rank {r}") for r in range(p)]

        def learner(rank, p_, m_, v=1, rows=rows):
            return rows[rank]

        where = f"p={p}, m={m}"
        try:
            validate(learner, p, m)
        except (ScheduleError, Deadlock) as err:
            raise AssertionError(f"{where}: your lists cannot run: {err}") from None
        for rank, row in enumerate(rows):
            want = one_f_one_b(rank, p, m)
            if row == want:
                continue
            text = " ".join(map(str, row))
            hint = []
            if _warmup(row) != _warmup(want):
                hint.append(
                    f"its warm-up runs {_warmup(row)} forwards before the first "
                    f"backward; 1F1B's runs min(p - rank - 1, m) = {_warmup(want)}"
                )
            if peak_activations(row) != peak_activations(want):
                hint.append(
                    f"it holds up to {peak_activations(row)} micro-batches' "
                    f"activations; 1F1B holds at most {peak_activations(want)}"
                )
            raise AssertionError(
                f"{where}, rank {rank}: your list is valid but not 1F1B"
                + (": " + "; ".join(hint) if hint else "")
                + f".\n  yours: {text}\n  1F1B:  {' '.join(map(str, want))}"
            )
    print(
        f"correct: {len(ONE_F_ONE_B_SIZES)} pipelines (p up to 8, m from 1 to 4p) "
        "are valid, deadlock-free and 1F1B"
    )


# ------------------------------------------------------------------ 5.2: bubble
BUBBLE_CASES = [
    ("gpipe", 4, 4, 1, {"F": 1, "B": 2}),
    ("1f1b", 4, 8, 1, {"F": 1, "B": 2}),
    ("1f1b", 3, 2, 1, {"F": 1, "B": 2}),
    ("1f1b", 4, 6, 1, {"F": 1.5, "B": 2.5}),
    ("interleaved", 2, 4, 2, {"F": 0.5, "B": 1.0}),
    ("interleaved", 4, 8, 2, {"F": 0.5, "B": 1.0}),
    ("zb1p", 4, 8, 1, {"F": 1, "B": 1, "W": 1}),
    ("zb1p", 4, 8, 1, {"F": 1, "B": 1.5, "W": 0.5}),
    ("zb1p", 3, 2, 1, {"F": 1, "B": 1, "W": 1}),
    ("gpipe", 1, 3, 1, {"F": 1, "B": 2}),
]
"""(schedule, p, m, v, durations) the check times; simulated with no comm time."""


def _formula(name: str, p: int, m: int, v: int, times) -> float:
    """The GPipe formula for any schedule: a wrong answer for most of them."""
    return (p - 1) / (m + p - 1)


def check_bubble(fn) -> None:
    """``fn(ranks, times)`` must return the bubble of the step (idle time over p
    times the step's length) of the action lists ``ranks`` (rank 0's first) when
    each action of kind k lasts ``times[k]`` and starts as soon as its rank is
    free and what it needs has ended; for every case of :data:`BUBBLE_CASES`,
    against ``check.simulate`` to 1e-9."""
    for name, p, m, v, times in BUBBLE_CASES:
        sim = simulate(p, m, v, SCHEDULES[name], times)
        ranks = [list(row) for row in all_ranks(SCHEDULES[name], p, m, v)]
        where = f"{name}, p={p}, m={m}" + (f", v={v}" if v > 1 else "")
        where += f", times {times}"
        got = fn(ranks, dict(times))
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise AssertionError(f"{where}: return a number, got {got!r}")
        want = sim.bubble
        if abs(got - want) <= 1e-9:
            continue
        hint = ""
        if abs(got - sim.bubble_of_ideal) <= 1e-9:
            hint = (
                " That is idle / compute (the bubble 'of ideal'); the exercise "
                "asks for idle / (p x step time), 'of the step'."
            )
        elif abs(got - _formula(name, p, m, v, times)) <= 1e-9:
            hint = (
                " That is GPipe's (p-1)/(m+p-1), which holds for GPipe and 1F1B "
                "with any F and B times, not for this schedule: time the actions."
            )
        elif abs(got) <= 1e-9 and want > 0:
            hint = (
                " Zero: did every action wait for what it needs on other ranks "
                "(F of stage s for F of s-1, B of s for B of s+1)?"
            )
        raise AssertionError(
            f"{where}: you return {got:.6g}, the bubble is {want:.6g} (step "
            f"{sim.makespan:g}, idle per rank {[round(i, 6) for i in sim.idle]})."
            + hint
        )
    print(f"correct: {len(BUBBLE_CASES)} schedules and durations, as simulated")


# ------------------------------------------------------------------ 5.3: choose m
LAB_TIMES = {"zb1p": {"F": 1, "B": 1, "W": 1}}
"""Durations of exercise 5.3 (the lab's ``--uniform-compute``): F = 1, B = 2 for
the unsplit schedules (per chunk for interleaved), F = B = W = 1 for ZB-H1."""
_DEFAULT_TIMES = {"F": 1, "B": 2}

MICRO_BATCH_CASES = [
    (name, p, v, target)
    for name in SCHEDULES
    for p in (1, 2, 4, 8, 16)
    for v in ((2, 4) if name == "interleaved" else (1,))
    for target in ("0.1", "0.05", "0.2", "0.25")
]
"""(schedule, p, v, target bubble) the check asks about (the target as text, kept
exact as a fraction)."""


def _exact_bubble(name: str, p: int, m: int, v: int) -> Fraction:
    times = {k: Fraction(t) for k, t in LAB_TIMES.get(name, _DEFAULT_TIMES).items()}
    times.setdefault("W", Fraction(0))
    return Fraction(expected_bubble(SCHEDULES[name], p, m, v, times))


def micro_batches_for(schedule: str, p: int, target: float, v: int = 1) -> int:
    """The reference answer: the fewest micro-batches m (a multiple of p for
    interleaved) whose bubble of the step is under ``target``, by the papers'
    formulas with the durations of :data:`LAB_TIMES`, in exact fractions."""
    target = Fraction(str(target))
    step = p if schedule == "interleaved" else 1
    m = step
    while _exact_bubble(schedule, p, m, v) >= target:
        m += step
    return m


def check_micro_batches(fn) -> None:
    """``fn(schedule, p, target, v)`` must return the fewest micro-batches whose
    bubble of the step is strictly under ``target`` (a fraction, 0.1 = 10%) for
    every case of :data:`MICRO_BATCH_CASES`; each answer is also simulated
    (``check.simulate``): under the target at m, not at the m before it."""
    confirmed = 0
    for name, p, v, target in MICRO_BATCH_CASES:
        want = micro_batches_for(name, p, float(target), v)
        step = p if name == "interleaved" else 1
        times = LAB_TIMES.get(name, _DEFAULT_TIMES)
        if p <= 4:  # the formula, confirmed by the simulation where it is quick
            sim = simulate(p, want, v, SCHEDULES[name], times).bubble
            assert sim < float(target) + 1e-12, (name, p, v, target, sim)
            if want > step:
                before = simulate(p, want - step, v, SCHEDULES[name], times).bubble
                assert before >= float(target) - 1e-12, (name, p, v, target, before)
            confirmed += 1
        where = f"{name}, p={p}" + (f", v={v}" if name == "interleaved" else "")
        where += f", bubble under {float(target):.0%}"
        got = fn(name, p, float(target), v)
        if got == want:
            continue
        hint = ""
        if isinstance(got, int) and got >= 1:
            if name == "interleaved" and got % p:
                hint = f" Interleaving needs m to be a multiple of p = {p}."
            else:
                b = float(_exact_bubble(name, p, got, v))
                if b >= float(target):
                    hint = f" At m={got} the bubble is {b:.2%} of the step: not under."
                else:
                    hint = (
                        f" m={got} works, but so does m={want} "
                        f"({float(_exact_bubble(name, p, want, v)):.2%} of the "
                        "step): the bubble is counted of the step, idle / (idle "
                        "+ busy), not of ideal."
                    )
        raise AssertionError(f"{where}: you return {got!r}, expected {want}.{hint}")
    print(
        f"correct: {len(MICRO_BATCH_CASES)} cases (4 schedules, p up to 16, "
        f"4 targets); {confirmed} of the answers confirmed by simulation"
    )
