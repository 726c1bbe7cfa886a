"""Rank functions for tests/test_comm.py (importable, so spawned ranks find them)."""

import torch
import torch.distributed as dist

from utils.comm import (
    CommMeter,
    all_gather,
    all_reduce,
    reduce_scatter,
    ring_all_reduce,
)


def ring_vs_builtin(sizes):
    """Ring all-reduce against gloo's on several sizes; returns (max error, bytes)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    worst, sent = 0.0, []
    for numel in sizes:
        x = torch.randn(
            numel, generator=torch.Generator().manual_seed(rank * 97 + numel)
        )
        ref = x.clone()
        dist.all_reduce(ref)
        meter = CommMeter()
        ring_all_reduce(x, meter=meter)
        worst = max(worst, (x - ref).abs().max().item())
        sent.append(meter.total)
    # A non-contiguous tensor is reduced too (through a contiguous copy).
    m = torch.full((4, 6), float(rank + 1)).t()
    ring_all_reduce(m)
    worst = max(worst, (m - n * (n + 1) / 2).abs().max().item())
    return worst, sent


def counted_collectives():
    """Counted collectives give torch's results and count the nccl-tests bytes."""
    rank, n = dist.get_rank(), dist.get_world_size()
    meter = CommMeter()
    x = torch.arange(4 * n, dtype=torch.float32) + rank
    all_reduce(x, meter=meter)
    shard = torch.empty(4)
    reduce_scatter(shard, torch.arange(4 * n, dtype=torch.float32), meter=meter)
    full = torch.empty(4 * n)
    all_gather(full, torch.full((4,), float(rank)), meter=meter)
    return x.tolist(), shard.tolist(), full.tolist(), dict(meter.by_op)


def subgroup_bytes():
    """An all-reduce and an all-gather on a 2-rank subgroup of a 4-rank world,
    recorded by our wrappers and by CollectiveCounter (torch's own call); also
    whether each figure says modelled or counted."""
    from utils.comm import CollectiveCounter

    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    ours, theirs = CommMeter(), CommMeter()
    x = torch.ones(256)  # 1 KiB
    all_reduce(x, meter=ours, group=group)
    with CollectiveCounter(theirs):
        dist.all_reduce(x, group=group)
        full = torch.empty(512)
        dist.all_gather_into_tensor(full, x, group=group)
    ring = CommMeter()
    ring_all_reduce(torch.ones(256), meter=ring, group=group)
    return (
        dict(ours.by_op),
        dict(theirs.by_op),
        dict(ring.by_op),
        {**ours.source, **ring.source},
        ours.kind,
    )
