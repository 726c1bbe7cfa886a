"""Which backward synchronises: ``no_sync()`` (forward time) and
``set_requires_gradient_sync`` (backward time) in ``utils.data_parallel.ddp``.

A pipeline schedule runs the last micro-batch's forward before earlier micro-batches'
backwards (1F1B: ``F0 F1 B0 F2 B1 B2``; GPipe's order: ``F0 F1 F2 B0 B1 B2``), so
"synchronise only the last micro-batch" cannot be said with DDP's ``no_sync()``
around forwards; FSDP2's ``set_requires_gradient_sync``, read when the gradient hooks
fire, can (torch/distributed/fsdp/_fully_shard/_fully_shard.py; picotron sets DP's
flag just before each backward, picotron/pipeline_parallel/pipeline_parallel.py).

Every run is compared with one process on the full global batch: the gradient of
``sum_k loss_k / M`` averaged over the ranks' shares (``torch.testing.assert_close``'s
fp32 defaults), after each of two steps, and the parameters after the SGD steps. The
collectives are counted: one synchronisation's worth per step, in bytes (nccl-tests'
2(N-1)/N per all-reduced byte) and in intervals recorded.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests import _data_parallel_sync_workers as W
from utils.comm import bus_factor, bytes_sent
from utils.launch import launch


def _case(impl: str, schedule: str, mode: str, **options) -> tuple[str, dict]:
    name = " ".join([impl, schedule, mode, *(f"{k}={v}" for k, v in options.items())])
    return name, {"impl": impl, "schedule": schedule, "mode": mode, **options}


CASES = dict(
    [
        # The backward-time flag in both pipeline orders, with and without the map.
        *(
            _case(impl, schedule, "flag", find_unused=unused)
            for impl in ("naive", "bucketed")
            for schedule in ("afab", "1f1b")
            for unused in (True, False)
        ),
        _case("bucketed", "1f1b", "flag", allreduce="ring"),
        _case("naive", "sequential", "flag"),
        _case("bucketed", "sequential", "flag"),
        # no_sync() as DDP has it: right for forward-backward pairs, and an
        # evaluation forward under no_grad does not change the pending decision.
        _case("naive", "sequential", "no_sync"),
        _case("bucketed", "sequential", "no_sync"),
        _case("bucketed", "sequential", "no_sync", eval_forward=True),
        _case("naive", "sequential", "no_sync", eval_forward=True, find_unused=False),
        # no_sync() around the forwards of a pipeline order.
        _case("bucketed", "1f1b", "no_sync"),
        _case("bucketed", "afab", "no_sync"),
        _case("naive", "1f1b", "no_sync"),
        # The flag reset for the next step before finishing.
        _case("bucketed", "afab", "flag", reset_flag=True),
        _case("naive", "1f1b", "flag", reset_flag=True),
        # B1 synchronised, then B2 not: refused by the bucketed wrapper.
        _case("bucketed", "1f1b", "flag_middle"),
    ]
)
FAILING = {
    "bucketed 1f1b no_sync",
    "bucketed afab no_sync",
    "bucketed 1f1b flag_middle",
}


def _run(names: list[str], world_size: int) -> dict:
    cases = [CASES[name] for name in names]
    per_rank = launch(W.sync_cases, cases, world_size=world_size, backend="gloo")
    return {
        "runs": {
            name: [rank["runs"][i] for rank in per_rank] for i, name in enumerate(names)
        },
        "bad_flag": [rank["bad_flag"] for rank in per_rank],
        "reference": W.reference(world_size),
        "world_size": world_size,
    }


@pytest.fixture(scope="module")
def two():
    """Every case at world size 2, in one launch."""
    return _run(list(CASES), world_size=2)


def _numel() -> dict[str, int]:
    return {k: v.numel() for k, v in W.Net().named_parameters()}


def check_matches_one_process(results: dict, name: str) -> None:
    """Gradients after each step, and parameters after them, on every rank."""
    case, ref = CASES[name], results["reference"]
    for rank, got in enumerate(results["runs"][name]):
        where = f"{name}, rank {rank}/{results['world_size']}"
        assert "error" not in got, f"{where}: {got.get('error')}"
        for step, (g, r) in enumerate(zip(got["steps"], ref["steps"])):
            for param, expected in r["grads"].items():
                actual, at = g["grads"][param], f"{where}, step {step}, {param}"
                if expected is None:  # never used: None, or zeros without the map
                    if case.get("find_unused", True):
                        assert actual is None, at
                    else:
                        assert actual is not None and not actual.any(), at
                    continue
                assert actual is not None, f"{at}: no gradient"
                assert_close(
                    torch.from_numpy(actual),
                    torch.from_numpy(expected),
                    msg=lambda m, a=at: f"{a}: {m}",
                )
        for param, expected in ref["params"].items():
            assert_close(
                torch.from_numpy(got["params"][param]),
                torch.from_numpy(expected),
                msg=lambda m, a=f"{where}, {param}": f"{a}: {m}",
            )


def check_one_synchronisation_per_step(results: dict, name: str) -> None:
    """Exactly one all-reduce per bucket (or per parameter) per step, nothing more."""
    case, n = CASES[name], results["world_size"]
    find_unused = case.get("find_unused", True)
    numel = _numel()
    for rank, got in enumerate(results["runs"][name]):
        for step, g in enumerate(got["steps"]):
            where = f"{name}, rank {rank}/{n}, step {step}"
            if case["impl"] == "naive":  # each parameter someone used, once
                reduced = [k for k in numel if not (find_unused and "never" in k)]
                assert g["events"] == len(reduced), where
            else:  # each bucket, once; the unused layer's zeros included
                reduced = list(numel)
                assert g["events"] == got["buckets"] >= 3, where
                # Buckets still launch inside the synchronised backward.
                assert g["launched_in_backward"] >= 1, where
            grad_bytes = 4 * sum(numel[k] for k in reduced)
            expected = {"all_reduce": bus_factor("all_reduce", n) * grad_bytes}
            if find_unused:  # plus one small all-reduce of the used map
                expected["used_map"] = bytes_sent("all_reduce", 4 * len(numel), n)
            if case.get("allreduce") != "ring":
                assert g["by_op"] == expected, where


SUCCEEDING = [name for name in CASES if name not in FAILING]


@pytest.mark.parametrize("name", SUCCEEDING)
def test_every_schedule_matches_one_process_with_one_sync_per_step(two, name):
    check_matches_one_process(two, name)
    check_one_synchronisation_per_step(two, name)


def test_1f1b_needs_the_backward_time_flag(two):
    """The forward-time rule cannot say "sync only the last micro-batch" in 1F1B:
    F2, outside no_sync(), runs before B1, so B1 synchronises and B2 is a second
    synchronised backward, which the bucketed wrapper refuses. Setting the flag
    before each backward gives the one-process gradients."""
    for got in two["runs"]["bucketed 1f1b no_sync"]:
        assert "second gradient" in got["error"]
        assert "set_requires_gradient_sync(False)" in got["error"]
    for got in two["runs"]["bucketed afab no_sync"]:  # F2 before B0: B0 syncs
        assert "second gradient" in got["error"]
    for unused in (True, False):
        check_matches_one_process(two, f"bucketed 1f1b flag find_unused={unused}")
    # Naive communicates only in finish, after the last backward, whose forward
    # (F2) was outside no_sync(): the forward-time rule happens to be right.
    check_matches_one_process(two, "naive 1f1b no_sync")


def test_finish_follows_the_last_backward_not_the_flag_at_finish(two):
    for name in (
        "bucketed afab flag reset_flag=True",
        "naive 1f1b flag reset_flag=True",
    ):
        check_matches_one_process(two, name)
        check_one_synchronisation_per_step(two, name)


def test_an_unsynchronised_backward_after_a_synchronised_one_is_refused(two):
    for got in two["runs"]["bucketed 1f1b flag_middle"]:
        assert "without gradient synchronisation ran after" in got["error"]


def test_the_flag_must_be_a_bool(two):
    assert two["bad_flag"] == ["requires must be a bool, got 1"] * 2


def test_world_size_4():
    names = ["bucketed 1f1b flag find_unused=True", "naive afab flag find_unused=True"]
    results = _run(names, world_size=4)
    for name in names:
        check_matches_one_process(results, name)
        check_one_synchronisation_per_step(results, name)
