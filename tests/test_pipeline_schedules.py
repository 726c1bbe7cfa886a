"""Pipeline schedules as data (``utils.pipeline_parallel``): pure, no processes.

Every schedule is valid and deadlock-free for p in {1, 2, 4}, m in {p, 2p, 4p}
(v in {1, 2} for interleaved); its simulated bubble is the paper's formula; its
peak activations are as stated; interleaved and ZB-H1 give torch's own orders.
"""

from __future__ import annotations

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

from utils.pipeline_parallel.check import (
    Deadlock,
    expected_bubble,
    gantt,
    live_activations,
    peak_activations,
    programs,
    run_blocking,
    simulate,
    validate,
)
from utils.pipeline_parallel.schedules import (
    SCHEDULES,
    Action,
    P2POp,
    ScheduleError,
    comm_ops,
    gpipe,
    interleaved,
    one_f_one_b,
    parse,
    program,
    table,
    zb1p,
)

SIZES = [(p, m) for p in (1, 2, 4) for m in (p, 2 * p, 4 * p)]
CASES = [
    (name, p, m, v)
    for name in SCHEDULES
    for p, m in SIZES
    for v in ((1, 2) if name == "interleaved" else (1,))
]
UNSPLIT = {"F": 1, "B": 2}
"""GPipe, 1F1B and interleaved: B is the whole backward, twice a forward."""
SPLIT = {"F": 1, "B": 1, "W": 1}
"""ZB-H1: the same backward as B (input gradient) + W (weight gradient)."""


def _id(case):
    name, p, m, v = case
    return f"{name}-p{p}-m{m}-v{v}"


def _kinds(actions):
    return "".join(a.kind for a in actions)


# ------------------------------------------------------------------ notation
def test_notation_round_trips():
    actions = [Action("F", 0, 1), Action("B", 12, 3), Action("W", 2, 10)]
    assert [str(a) for a in actions] == ["0F1", "12B3", "2W10"]
    assert parse("0F1 12B3  2W10") == actions
    with pytest.raises(ValueError, match="'0X1'"):
        parse("0F1 0X1")


def test_table_is_one_line_per_rank():
    assert table(one_f_one_b, 2, 2) == "0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1"
    for row, rank in zip(table(interleaved, 2, 4, 2).splitlines(), range(2)):
        assert parse(row) == interleaved(rank, 2, 4, 2)


# ------------------------------------------------------------------ validity
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_schedule_is_valid_and_deadlock_free(case):
    name, p, m, v = case
    validate(SCHEDULES[name], p, m, v)
    passed = run_blocking(programs(SCHEDULES[name], p, m, v))
    # Every hand-off between adjacent chunks crosses ranks once p > 1.
    assert passed == (2 * m * (p * v - 1) if p > 1 else 0)


def test_gpipe_is_all_forwards_then_all_backwards():
    assert [str(a) for a in gpipe(1, 2, 3)] == "1F0 1F1 1F2 1B0 1B1 1B2".split()


@pytest.mark.parametrize("p, m", SIZES)
def test_1f1b_warms_up_with_p_minus_rank_minus_1_forwards(p, m):
    for rank in range(p):
        warmup = p - rank - 1  # then m - warmup (F, B) pairs, then warmup B's
        expected = "F" * warmup + "FB" * (m - warmup) + "B" * warmup
        assert _kinds(one_f_one_b(rank, p, m)) == expected


def test_1f1b_with_fewer_micro_batches_than_stages():
    validate(one_f_one_b, 4, 2)
    rows = [_kinds(one_f_one_b(r, 4, 2)) for r in range(4)]
    assert rows == ["FFBB", "FFBB", "FFBB", "FBFB"]  # warm-up min(p - rank - 1, m)


@pytest.mark.parametrize("p, m", SIZES)
def test_interleaved_warm_up_is_megatrons(p, m):
    for rank in range(p):
        for v in (1, 2, 3):
            warmup = min(2 * (p - rank - 1) + (v - 1) * p, m * v)
            steady = m * v - warmup
            expected = "F" * warmup + "FB" * steady + "B" * warmup
            assert _kinds(interleaved(rank, p, m, v)) == expected


def test_interleaved_visits_chunks_in_groups_of_p():
    forwards = [a for a in interleaved(0, 2, 4, 2) if a.kind == "F"]
    assert " ".join(map(str, forwards)) == "0F0 0F1 2F0 2F1 0F2 0F3 2F2 2F3"


def test_zb1p_holds_back_rank_w_passes():
    assert table(zb1p, 2, 2) == "0F0 0F1 0B0 0W0 0B1 0W1\n1F0 1B0 1F1 1B1 1W0 1W1"
    for rank in range(4):
        actions = zb1p(rank, 4, 8)
        first_w = next(i for i, a in enumerate(actions) if a.kind == "W")
        assert sum(a.kind == "B" for a in actions[:first_w]) == rank + 1


def torch_order(cls, rank, p, m, v):
    """A torch schedule's compute order for one rank, without process groups.

    ``_calculate_single_rank_operations`` reads only these attributes (torch 2.13,
    torch/distributed/pipelining/schedules.py, ScheduleInterleaved1F1B.__init__).
    """
    sched = object.__new__(cls)
    sched.pp_group_size, sched.n_local_stages, sched._n_microbatches = p, v, m
    sched.number_of_rounds = max(1, m // p)
    sched.microbatches_per_round = m // sched.number_of_rounds
    kinds = {"F": "F", "B": "B", "I": "B", "W": "W"}
    return [
        Action(kinds[a.computation_type.value], a.stage_index, a.microbatch_index)
        for a in sched._calculate_single_rank_operations(rank)
        if a is not None
    ]


@pytest.mark.parametrize("p, m", SIZES)
def test_interleaved_and_zb1p_match_torch(p, m):
    for rank in range(p):
        for v in (1, 2, 3):
            theirs = torch_order(torch_schedules.ScheduleInterleaved1F1B, rank, p, m, v)
            assert interleaved(rank, p, m, v) == theirs
        theirs = torch_order(
            torch_schedules.ScheduleInterleavedZeroBubble, rank, p, m, 1
        )
        assert zb1p(rank, p, m) == theirs


def _broken(*rows):
    return lambda rank, p, m, v=1: parse(rows[rank])


@pytest.mark.parametrize(
    "rows, match",
    [
        (("0F0 0B0", "1F0"), "never runs 1B0"),
        (("0F0 0B0 0F0", "1F0 1B0"), "twice"),
        (("0F0 0B0", "1B0 1F0"), "1B0 before 1F0"),
        (("0F0 0B0", "0F0 1F0 1B0"), "holds stages"),
        (("0F0 0B0 0W0", "1F0 1B0"), "never runs 1W0"),
        (("0F0 0F1 0B1 0B0", "1F1 1B1 1F0 1B0"), None),  # fine: any micro order
        (("0F0 0F1 0B0 0B1", "1B1 1F0 1F1 1B0"), "1B1 before 1F1"),
        (
            ("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"),
            r"cycle\): rank 0 at 0B0; rank 1 at 1F1",
        ),
    ],
)
def test_validate_names_what_is_wrong(rows, match):
    m = 1 + max(a.micro for row in rows for a in parse(row))
    if match is None:
        validate(_broken(*rows), 2, m)
        return
    with pytest.raises(ScheduleError, match=match):
        validate(_broken(*rows), 2, m)


# ------------------------------------------------------------ communication
def test_ops_surround_their_actions():
    for rank in range(4):
        ops = program(rank, 4, 8, 2, interleaved)
        where = {op: i for i, op in enumerate(ops)}
        for i, op in enumerate(ops):
            if not isinstance(op, P2POp):
                continue
            made = Action("F" if op.what == "act" else "B", op.stage, op.micro)
            if op.op == "send":
                assert where[made] < i
            else:  # the action that consumes it runs after it
                step = 1 if op.what == "act" else -1
                assert where[Action(made.kind, op.stage + step, op.micro)] > i


def test_comm_ops_of_a_two_stage_1f1b():
    ops = [str(op) for op in comm_ops(0, 2, 2, 1, one_f_one_b)]
    assert ops == [
        "send act of 0F0 -> rank 1",
        "send act of 0F1 -> rank 1",
        "recv grad of 1B0 <- rank 1",
        "recv grad of 1B1 <- rank 1",
    ]


def test_the_naive_order_deadlocks_1f1b():
    """Recv just before, send just after: 1F1B's steady state sends meet head on."""
    with pytest.raises(Deadlock) as err:
        run_blocking(programs(one_f_one_b, 2, 2, naive=True))
    assert err.value.ranks == [0, 1]
    assert "rank 0 on send act of 0F1" in str(err.value)
    assert "rank 1 on send grad of 1B0" in str(err.value)
    run_blocking(programs(gpipe, 2, 2, naive=True))  # GPipe never crosses


def test_a_swapped_op_is_a_deadlock_naming_the_ranks():
    progs = programs(one_f_one_b, 4, 8)
    ops = [i for i, op in enumerate(progs[2]) if isinstance(op, P2POp)]
    i, j = ops[0], ops[1]  # its first two recvs of activations from rank 1
    progs[2][i], progs[2][j] = progs[2][j], progs[2][i]
    with pytest.raises(Deadlock) as err:
        run_blocking(progs)
    assert {1, 2} <= set(err.value.ranks)
    assert err.value.stuck[1] == P2POp("send", 2, "act", 1, 0, 2 * (8 + 0))
    assert err.value.stuck[2].op == "recv" and err.value.stuck[2].micro == 1
    assert "rank 1 on send act of 1F0 -> rank 2" in str(err.value)


def test_a_recv_never_sent_names_the_finished_rank():
    progs = programs(one_f_one_b, 2, 2)
    progs[0] = progs[0][:-1]  # rank 0 forgets its last recv
    progs[1] = progs[1] + [P2POp("recv", 0, "act", 0, 5, 99)]
    with pytest.raises(Deadlock, match="rank 0 finished") as err:
        run_blocking(progs)
    assert err.value.ranks == [0, 1]


# ------------------------------------------------------------------- bubbles
@pytest.mark.parametrize("p, m", SIZES)
@pytest.mark.parametrize("times", [{"F": 1, "B": 1}, UNSPLIT, {"F": 2, "B": 3}])
def test_gpipe_and_1f1b_bubble_is_exact(p, m, times):
    for schedule in (gpipe, one_f_one_b):
        sim = simulate(p, m, 1, schedule, times)
        assert sim.bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert sim.bubble_of_ideal == pytest.approx((p - 1) / m, abs=1e-12)
        assert sim.bubble == pytest.approx(expected_bubble(schedule, p, m, 1, times))


@pytest.mark.parametrize("p, m", SIZES)
@pytest.mark.parametrize("v", [1, 2, 3])
def test_interleaved_bubble_is_one_over_v_of_1f1bs(p, m, v):
    sim = simulate(p, m, v, interleaved, UNSPLIT)
    assert sim.bubble_of_ideal == pytest.approx((p - 1) / (v * m), abs=1e-9)
    assert sim.bubble == pytest.approx(expected_bubble(interleaved, p, m, v), abs=1e-9)


@pytest.mark.parametrize("p, m", SIZES)
def test_zb1p_bubble_is_a_third_of_1f1bs(p, m):
    zb = simulate(p, m, 1, zb1p, SPLIT)
    base = simulate(p, m, 1, one_f_one_b, UNSPLIT)
    assert zb.bubble_of_ideal == pytest.approx((p - 1) / (3 * m), abs=1e-12)
    assert zb.bubble == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    assert sum(zb.idle) == pytest.approx(sum(base.idle) / 3)
    assert zb.bubble == pytest.approx(expected_bubble(zb1p, p, m, 1, SPLIT))


def test_communication_time_lengthens_the_step():
    assert (
        simulate(4, 8, 1, one_f_one_b, comm=0.5).makespan
        > simulate(4, 8, 1, one_f_one_b).makespan
    )


def test_gantt_draws_the_bubble():
    text = gantt(simulate(2, 2, 1, one_f_one_b, UNSPLIT))
    assert text.splitlines() == [
        "0F0 0F1 ... ... 0B0 0B0 ... 0B1 0B1",
        "... 1F0 1B0 1B0 1F1 1B1 1B1 ... ...",
    ]


# --------------------------------------------------------------- activations
@pytest.mark.parametrize("p, m", SIZES)
def test_peak_activations(p, m):
    for rank in range(p):
        assert peak_activations(gpipe(rank, p, m)) == m
        assert peak_activations(one_f_one_b(rank, p, m)) == min(p - rank, m)
        zb = zb1p(rank, p, m)
        assert peak_activations(zb) == min(p, m)  # released at W
        assert peak_activations(zb, free_on="B") == min(p - rank, m)
        for v in (1, 2):
            warmup = 2 * (p - rank - 1) + (v - 1) * p
            got = peak_activations(interleaved(rank, p, m, v))  # chunk activations
            assert got == min(warmup + 1, m * v)


def test_live_activations_count_up_and_down():
    assert live_activations(parse("0F0 0F1 0B0 0F2 0B1 0B2")) == [1, 2, 1, 2, 1, 0]
    assert live_activations(parse("0F0 0B0 0W0"), free_on="B") == [1, 0, 0]
    with pytest.raises(ValueError, match="free_on"):
        live_activations([], free_on="F")


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 0, 4), "p .* >= 1"),
        ((0, 2, 0), "m .* >= 1"),
        ((0, 2, 2, 0), "v .* >= 1"),
        ((2, 2, 2), "rank .* <= 1"),
        ((-1, 2, 2), "rank .* >= 0"),
    ],
)
def test_sizes_are_checked(schedule, args, match):
    with pytest.raises(ValueError, match=match):
        schedule(*args)


def test_interleaved_needs_m_a_multiple_of_p():
    with pytest.raises(ValueError, match="multiple of p=4, got m=6"):
        interleaved(0, 4, 6, 2)


@pytest.mark.parametrize("schedule", [gpipe, one_f_one_b, zb1p])
def test_one_chunk_schedules_refuse_v(schedule):
    with pytest.raises(ValueError, match="v=1"):
        schedule(0, 2, 2, 2)


def test_simulate_checks_durations():
    with pytest.raises(ValueError, match=r"times\['B'\]"):
        simulate(2, 2, 1, one_f_one_b, {"B": 0})
    with pytest.raises(ValueError, match="comm"):
        simulate(2, 2, 1, one_f_one_b, comm=-1)
