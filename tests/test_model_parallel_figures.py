"""Chapter 4's row builders (``utils/model_parallel/figures.py``) on report dicts:
one filter (``runs_without_dp``) decides which runs each table and figure draws."""

from __future__ import annotations

import pytest

from utils.model_parallel import figures


def _run(n, *, mode="tensor", impl="scratch", dp=1, sp=False, states=100, acts=7):
    cfg = dict(mode=mode, impl=impl, dp_size=dp, world_size=n, tp_size=0,
               sequence_parallel=sp, n_layers=2)  # fmt: skip
    extra = dict(
        config=cfg,
        state_bytes={"params": states, "grads": states, "optimizer": 2 * states},
        predicted={
            "params": states,
            "grads": states,
            "optimizer": 2 * states,
            "activations": acts + 1,
        },  # fmt: skip
        activation_bytes=acts,
        calls_by_phase={"forward": {"all_reduce": 2}},
    )
    return [dict(rank=r, extra=extra) for r in reversed(range(n))]


RUNS = [
    _run(2),
    _run(2, impl="torch"),
    _run(4, dp=2),
    _run(2, mode="layers", states=50),
    _run(1, states=400),
]


def test_the_filter_keeps_scratch_runs_without_data_parallelism():
    kept = [(cfg["mode"], cfg["world_size"]) for cfg, *_ in
            figures.runs_without_dp(RUNS)]  # fmt: skip
    assert kept == [("tensor", 2), ("layers", 2), ("tensor", 1)]
    either = list(figures.runs_without_dp(RUNS, impl=None, mode="tensor"))
    assert [c["impl"] for c, *_ in either] == ["scratch", "torch", "scratch"]
    for _, ranks, extras in either:  # ranks come back in rank order
        assert [r["rank"] for r in ranks] == list(range(len(ranks)))
        assert extras == [r["extra"] for r in ranks]


def test_memory_rows_list_a_one_rank_run_under_both_modes():
    rows = figures.memory_rows(RUNS)
    assert [(r["mode"], r["ranks"]) for r in rows] == [
        ("layers", 1), ("layers", 2), ("tensor", 1), ("tensor", 2),
    ]  # fmt: skip
    one = rows[0]
    assert one["states"] == [1600] and one["states_predicted"] == [1600]
    assert rows[1]["activations"] == [7, 7]
    assert rows[1]["activations_predicted"] == [8, 8]


def test_calls_rows_skip_one_rank_runs_and_keep_both_impls():
    rows = figures.calls_rows(RUNS)
    assert [(r["impl"], r["tp"]) for r in rows] == [("scratch", 2), ("torch", 2)]
    assert rows[0]["calls"] == {"forward": {"all_reduce": 2}}


def test_a_run_missing_a_rank_is_refused():
    with pytest.raises(ValueError, match="one report per rank"):
        list(figures.runs_without_dp([_run(2)[:1] + [dict(rank=5, extra={})]]))
