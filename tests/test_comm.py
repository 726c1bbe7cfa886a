"""utils.comm: byte accounting (pure) and the collectives on real gloo ranks."""

import pytest

from tests import _comm_workers
from utils.comm import COLLECTIVES, bus_factor, bytes_sent
from utils.launch import launch


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_bus_factors_follow_nccl_tests(n):
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("reduce_scatter", "all_gather", "all_to_all"):
        assert bus_factor(op, n) == pytest.approx((n - 1) / n)
    assert bus_factor("broadcast", n) == bus_factor("reduce", n) == 1.0
    assert bytes_sent("all_reduce", 1000, n) == round(2 * (n - 1) / n * 1000)


def test_bad_collective_and_world_size_are_named():
    with pytest.raises(ValueError, match="'allreduce'.*all_reduce"):
        bus_factor("allreduce", 4)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        bus_factor("all_reduce", 0)
    assert set(COLLECTIVES) >= {"all_reduce", "reduce_scatter", "all_gather"}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_all_reduce_equals_builtin_and_sends_2_n_minus_1_over_n(world_size):
    sizes = [1, 7, 1000, 12 * 1024]
    results = launch(
        _comm_workers.ring_vs_builtin, sizes, world_size=world_size, backend="gloo"
    )
    for worst, sent in results:
        assert worst < 1e-5
        # 12288 floats divide by 2, 3 and 4: exactly 2(n-1)/n of the buffer is sent.
        assert sent[-1] == 2 * (world_size - 1) * 12 * 1024 * 4 // world_size


def test_counted_collectives_match_torch_semantics():
    n = 4
    results = launch(_comm_workers.counted_collectives, world_size=n, backend="gloo")
    for rank, (reduced, shard, gathered, by_op) in enumerate(results):
        assert reduced == [n * i + sum(range(n)) for i in range(4 * n)]
        assert shard == [n * i for i in range(4 * rank, 4 * rank + 4)]
        assert gathered == [float(r) for r in range(n) for _ in range(4)]
        assert by_op == {
            "all_reduce": bytes_sent("all_reduce", 16 * n, n),
            "reduce_scatter": bytes_sent("reduce_scatter", 16 * n, n),
            "all_gather": bytes_sent("all_gather", 16 * n, n),
        }


def test_bytes_use_the_size_of_the_group_the_collective_ran_on():
    """On a 2-rank subgroup of 4 ranks, an all-reduce of S bytes is 2(2-1)/2 S = S
    per rank, not the world's 2(4-1)/4 S = 1.5 S; the ring's real sends agree."""
    results = launch(_comm_workers.subgroup_bytes, world_size=4, backend="gloo")
    for ours, theirs, ring, sources, kind in results:
        assert ours == {"all_reduce": 1024}
        assert theirs == {"all_reduce": 1024, "all_gather": 1024}
        assert ring == {"ring_all_reduce": 1024}  # counted send by send
        assert sources == {"all_reduce": "modelled", "ring_all_reduce": "counted"}
        assert kind == "modelled"


def test_a_meter_keeps_counted_and_modelled_apart():
    from utils.comm import CommMeter

    meter = CommMeter()
    meter.add_modelled("all_reduce", 1000, 4)
    meter.count("send", 300)
    assert meter.kind == "counted+modelled"
    assert meter.total_of("modelled") == 1500 and meter.total_of("counted") == 300
    with pytest.raises(ValueError, match="recorded as modelled"):
        meter.count("all_reduce", 1)
    with pytest.raises(ValueError, match="source must be one of"):
        meter.total_of("measured")
