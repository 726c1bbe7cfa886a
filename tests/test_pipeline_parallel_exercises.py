"""Chapter 5's exercise checks (``utils.pipeline_parallel.exercises``): each passes
on the solution the chapter prints and fails, with a message that says why, on
the plausible wrong answers. No processes."""

from __future__ import annotations

import math

import pytest

from utils.pipeline_parallel import exercises as ex
from utils.pipeline_parallel.check import simulate
from utils.pipeline_parallel.schedules import SCHEDULES, Action, gpipe


# ------------------------------------------------------------------ 5.1
def one_f_one_b(rank, p, m):
    """The chapter's solution of exercise 5.1."""
    warmup = min(p - rank - 1, m)
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
    actions += [Action("B", rank, i) for i in range(m - warmup, m)]
    return actions


def test_5_1_passes_on_the_solution(capsys):
    ex.check_one_f_one_b(one_f_one_b)
    assert "correct" in capsys.readouterr().out


def test_5_1_accepts_text_actions():
    ex.check_one_f_one_b(lambda r, p, m: [str(a) for a in one_f_one_b(r, p, m)])


def _warmup_one_more(rank, p, m):
    warmup = min(p - rank, m)  # off by one: one forward too many
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
    return actions + [Action("B", rank, i) for i in range(m - warmup, m)]


def _no_min(rank, p, m):
    warmup = p - rank - 1  # forgets that m may be smaller than the warm-up
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(max(0, m - warmup)):
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
    return actions + [Action("B", rank, i) for i in range(max(0, m - warmup), m)]


def _backward_first(rank, p, m):
    warmup = min(p - rank - 1, m)
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):  # B of i before F of i + warmup
        actions += [Action("B", rank, i), Action("F", rank, i + warmup)]
    return actions + [Action("B", rank, i) for i in range(m - warmup, m)]


def _warmup_by_rank(rank, p, m):
    warmup = min(rank, m)  # reversed: the last stage warms up longest
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
    return actions + [Action("B", rank, i) for i in range(m - warmup, m)]


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda r, p, m: gpipe(r, p, m), "valid but not 1F1B: its warm-up runs"),
        (_warmup_one_more, "valid but not 1F1B"),
        (_no_min, "cannot run"),
        (_backward_first, "cannot run"),
        (_warmup_by_rank, "cannot run"),
        (lambda r, p, m: " ".join(map(str, one_f_one_b(r, p, m))), "not one string"),
        (lambda r, p, m: [("F", r, 0)], "neither an Action"),
        (lambda r, p, m: one_f_one_b(r, p, m)[:-1], "cannot run"),
    ],
)
def test_5_1_fails_on_wrong_answers(wrong, words):
    with pytest.raises(AssertionError, match=words):
        ex.check_one_f_one_b(wrong)


def test_5_1_names_the_activations_of_gpipe():
    with pytest.raises(AssertionError, match="holds up to 2 micro-batches"):
        ex.check_one_f_one_b(lambda r, p, m: gpipe(r, p, m))


# ------------------------------------------------------------------ 5.2
def bubble(ranks, times):
    """The chapter's solution of exercise 5.2."""
    n_stages = 1 + max(a.stage for row in ranks for a in row)

    def needs(a):
        if a.kind == "F":
            return Action("F", a.stage - 1, a.micro) if a.stage > 0 else None
        if a.kind == "B" and a.stage < n_stages - 1:
            return Action("B", a.stage + 1, a.micro)
        return Action("F" if a.kind == "B" else "B", a.stage, a.micro)

    end, free, pos = {}, [0.0] * len(ranks), [0] * len(ranks)
    while any(pos[r] < len(row) for r, row in enumerate(ranks)):
        moved = False
        for r, row in enumerate(ranks):
            while pos[r] < len(row):
                a = row[pos[r]]
                dep = needs(a)
                if dep is not None and dep not in end:
                    break  # wait for another rank
                start = max(free[r], end[dep] if dep is not None else 0.0)
                end[a] = free[r] = start + times[a.kind]
                pos[r] += 1
                moved = True
        if not moved:
            raise ValueError("no rank can go on")
    busy = sum(times[a.kind] for row in ranks for a in row)
    return 1 - busy / (len(ranks) * max(free))


def test_5_2_passes_on_the_solution(capsys):
    ex.check_bubble(bubble)
    assert "correct" in capsys.readouterr().out


def _of_ideal(ranks, times):
    b = bubble(ranks, times)
    return b / (1 - b)  # idle / busy


def _formula(ranks, times):
    p = len(ranks)
    m = len({a.micro for a in ranks[0]})
    return (p - 1) / (m + p - 1)


def _no_dependencies(ranks, times):
    busy = [sum(times[a.kind] for a in row) for row in ranks]
    return 1 - sum(busy) / (len(ranks) * max(busy))


def _unit_times(ranks, times):
    return bubble(ranks, {k: 1.0 for k in times})


@pytest.mark.parametrize(
    "wrong, words",
    [
        (_of_ideal, "of ideal"),
        (_formula, r"\(p-1\)/\(m\+p-1\)"),
        (_no_dependencies, "what it needs on other ranks"),
        (_unit_times, "the bubble is"),
        (lambda ranks, times: "10%", "return a number"),
    ],
)
def test_5_2_fails_on_wrong_answers(wrong, words):
    with pytest.raises(AssertionError, match=words):
        ex.check_bubble(wrong)


def test_5_2_cases_are_not_all_gpipe_shaped():
    """The formula answer must fail somewhere: some case differs from it."""
    differ = [
        c for c in ex.BUBBLE_CASES
        if abs(simulate(c[1], c[2], c[3], SCHEDULES[c[0]], c[4]).bubble
               - (c[1] - 1) / (c[2] + c[1] - 1)) > 1e-6
    ]  # fmt: skip
    assert len(differ) >= 3


# ------------------------------------------------------------------ 5.3
def micro_batches(schedule, p, target, v=1):
    """The chapter's solution of exercise 5.3 (closed form)."""
    if p == 1:
        return 1
    if schedule in ("gpipe", "1f1b"):  # (p-1)/(m+p-1) < t  <=>  m > (p-1)(1/t - 1)
        return math.floor((p - 1) * (1 / target - 1) + 1e-9) + 1
    if schedule == "zb1p":  # (p-1)/(3m+p-1) < t
        return math.floor((p - 1) * (1 / target - 1) / 3 + 1e-9) + 1
    least = math.floor((p - 1) * (1 / target - 1) / v + 1e-9) + 1  # (p-1)/(vm+p-1)
    return -(-least // p) * p  # the next multiple of p


def test_5_3_passes_on_the_solution(capsys):
    ex.check_micro_batches(micro_batches)
    assert "confirmed by simulation" in capsys.readouterr().out


def test_5_3_reference_values():
    assert ex.micro_batches_for("1f1b", 4, 0.1) == 28  # 3/30 = 10% is not under
    assert ex.micro_batches_for("gpipe", 8, 0.1) == 64
    assert ex.micro_batches_for("zb1p", 4, 0.1) == 10
    assert ex.micro_batches_for("interleaved", 4, 0.1, 2) == 16


def _of_ideal_m(schedule, p, target, v=1):
    return math.floor((p - 1) / target + 1e-9) + 1  # (p-1)/m < t


def _at_most(schedule, p, target, v=1):
    m = micro_batches(schedule, p, target, v)
    return max(1, m - (p if schedule == "interleaved" else 1))  # <= instead of <


def _ignores_multiple(schedule, p, target, v=1):
    if schedule == "interleaved":
        return math.floor((p - 1) * (1 / target - 1) / v + 1e-9) + 1
    return micro_batches(schedule, p, target, v)


def _ignores_v(schedule, p, target, v=1):
    return micro_batches(schedule, p, target, 1 if schedule == "interleaved" else v)


def _zb_as_1f1b(schedule, p, target, v=1):
    return micro_batches("1f1b" if schedule == "zb1p" else schedule, p, target, v)


@pytest.mark.parametrize(
    "wrong, words",
    [
        (_of_ideal_m, "not of ideal"),
        (_at_most, "not under"),
        (_ignores_multiple, "multiple of p"),
        (_ignores_v, "expected"),
        (_zb_as_1f1b, "zb1p"),
    ],
)
def test_5_3_fails_on_wrong_answers(wrong, words):
    with pytest.raises(AssertionError, match=words):
        ex.check_micro_batches(wrong)
