"""Communication helpers: collectives that count their bytes, and a ring all-reduce.

Introduced in chapter 0 ("Why one device is not enough", the collectives and their
alpha-beta cost) and chapter 1 ("Data parallelism", the ring all-reduce). ZeRO
(chapter 2) uses the reduce-scatter and all-gather helpers.

Byte accounting follows nccl-tests (PERFORMANCE.md): for an operation on a buffer of
``S`` bytes over ``n`` ranks, each rank moves ``factor * S`` bytes through its link,
where the factor is 2(n-1)/n for all-reduce, (n-1)/n for reduce-scatter, all-gather
and all-to-all (``S`` the full, unsharded buffer), and 1 for broadcast and reduce.
The bus bandwidth ``busbw = algbw * factor`` is then comparable with the hardware's
link speed whatever ``n`` is. ``CommMeter`` adds up what our own code sends;
``CollectiveCounter`` counts, the same way, what torch's DDP, ZeroRedundancyOptimizer
and FSDP2 send from inside torch.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from time import perf_counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from utils.launch import synchronize

_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}
COLLECTIVES = tuple(_FACTORS)


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' busbw/algbw factor for ``op`` over ``world_size`` ranks."""
    if op not in _FACTORS:
        raise ValueError(f"unknown collective {op!r}; expected one of {COLLECTIVES}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return _FACTORS[op](world_size)


def bytes_sent(op: str, nbytes: int, world_size: int) -> int:
    """Bytes one rank sends for ``op`` on an ``nbytes`` buffer (ring algorithms)."""
    return round(bus_factor(op, world_size) * nbytes)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class CommMeter:
    """Counts the bytes this rank sends, by operation (reset it every step)."""

    def __init__(self):
        self.by_op: dict[str, int] = defaultdict(int)

    def add(self, op: str, buffer_bytes: int, world_size: int) -> None:
        self.by_op[op] += bytes_sent(op, buffer_bytes, world_size)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def reset(self) -> None:
        self.by_op.clear()


def _world(group) -> int:
    return dist.get_world_size(group)


def all_reduce(
    tensor,
    *,
    meter: CommMeter | None = None,
    group=None,
    op=dist.ReduceOp.SUM,
    async_op: bool = False,
):
    """``dist.all_reduce`` that records its bytes on ``meter``."""
    if meter is not None:
        meter.add("all_reduce", nbytes(tensor), _world(group))
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_reduce_mean(tensors, *, meter: CommMeter | None = None, group=None) -> None:
    """Average each tensor over the ranks in place: sum with all-reduce, divide by n.

    The gradient-averaging step of data parallelism (Li et al., "PyTorch
    Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020).
    """
    n = _world(group)
    for t in tensors:
        all_reduce(t, meter=meter, group=group)
        t.div_(n)


def reduce_scatter(
    output,
    input,
    *,
    meter: CommMeter | None = None,
    group=None,
    op=dist.ReduceOp.SUM,
    async_op: bool = False,
):
    """Sum ``input`` (n equal chunks) over ranks; rank r keeps chunk r in ``output``."""
    if meter is not None:
        meter.add("reduce_scatter", nbytes(input), _world(group))
    return dist.reduce_scatter_single(
        output, input, op=op, group=group, async_op=async_op
    )


def all_gather(
    output, input, *, meter: CommMeter | None = None, group=None, async_op: bool = False
):
    """Concatenate every rank's ``input`` into ``output`` (n times larger)."""
    if meter is not None:
        meter.add("all_gather", nbytes(output), _world(group))
    return dist.all_gather_single(output, input, group=group, async_op=async_op)


def broadcast(tensor, src: int = 0, *, meter: CommMeter | None = None, group=None):
    """Copy ``src``'s tensor to every rank."""
    if meter is not None:
        meter.add("broadcast", nbytes(tensor), _world(group))
    return dist.broadcast(tensor, src=src, group=group)


_C10D = {  # torch.ops.c10d op -> (collective, index of the argument with the buffer)
    "allreduce_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "_allgather_base_": ("all_gather", 0),  # (output, input): the full output
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input): full input
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
}


class CollectiveCounter(TorchDispatchMode):
    """Inside ``with CollectiveCounter(meter):`` every collective adds its bytes.

    Each ``torch.distributed`` collective reaches the dispatcher as a
    ``torch.ops.c10d`` op (what torch's ``CommDebugMode`` counts), so a dispatch
    mode sees those issued by DDP's reducer and by FSDP2 too. Sizes are those of
    the full buffer, as ``utils.comm`` records them; the default group's size
    is the ``n`` of the bus factor.
    """

    def __init__(self, meter: CommMeter):
        super().__init__()
        self.meter, self.world_size = meter, dist.get_world_size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "c10d" and name in _C10D:
            op, index = _C10D[name]
            buffers = args[index]
            if isinstance(buffers, torch.Tensor):
                buffers = [buffers]
            size = sum(t.numel() * t.element_size() for t in buffers)
            self.meter.add(op, size, self.world_size)
        return func(*args, **(kwargs or {}))


# [ring-all-reduce-start]
def ring_all_reduce(
    tensor: torch.Tensor, *, meter: CommMeter | None = None, group=None
) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place with a ring of point-to-point messages.

    The bandwidth-optimal algorithm of Patarasuk and Yuan, "Bandwidth optimal
    all-reduce algorithms for clusters of workstations" (JPDC 2009), the one NCCL
    uses for large messages. The buffer is cut into n chunks. In the reduce-scatter
    phase (n-1 steps) every rank sends one chunk to its right neighbour and adds
    the chunk it receives from its left one; afterwards rank r owns the full sum of
    chunk (r+1) mod n. In the all-gather phase (n-1 more steps) the finished chunks
    travel once more around the ring. Each rank sends 2(n-1)/n of the buffer.
    """
    n = _world(group)
    if n == 1:
        return tensor
    rank = dist.get_rank(group)
    right, left = (rank + 1) % n, (rank - 1) % n
    if group is not None:  # peers are named by their global rank
        right = dist.get_global_rank(group, right)
        left = dist.get_global_rank(group, left)
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
    chunks = list(flat.tensor_split(n))
    recv = torch.empty_like(chunks[0])

    def exchange(send_idx: int, into: torch.Tensor) -> None:
        ops = [
            dist.P2POp(dist.isend, chunks[send_idx], right, group),
            dist.P2POp(dist.irecv, into, left, group),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        if meter is not None:
            meter.by_op["ring_all_reduce"] += nbytes(chunks[send_idx])

    for step in range(n - 1):  # reduce-scatter: accumulate partial sums
        idx = (rank - step - 1) % n
        incoming = recv[: chunks[idx].numel()]
        exchange((rank - step) % n, incoming)
        chunks[idx].add_(incoming)
    for step in range(n - 1):  # all-gather: finished chunks land in place
        exchange((rank - step + 1) % n, chunks[(rank - step) % n])
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return tensor


# [ring-all-reduce-end]


# [busbw-start]
def time_all_reduce(
    sizes_bytes, impls=None, *, warmup: int = 3, iters: int = 5, device=None
) -> list[dict]:
    """Time all-reduce on float32 buffers of each size, inside every rank.

    ``impls`` maps a name to a function that sums a tensor over the ranks in place
    (default: the backend's ``dist.all_reduce``); they alternate, so a busy machine
    slows them alike. One row per (size, impl): ``time_s``, the median over
    ``iters`` (after ``warmup`` untimed calls) of the slowest rank's time, since an
    all-reduce is over when its slowest rank is; ``algbw = S / t`` and
    ``busbw = algbw * 2(n-1)/n``, as nccl-tests defines them.
    """
    n = dist.get_world_size()
    device = torch.device("cpu") if device is None else device
    impls = impls or {"builtin": dist.all_reduce}
    flag = torch.zeros(1, device=device)
    rows = []
    for size in sizes_bytes:
        buffer = torch.zeros(max(1, size // 4), device=device)
        times = torch.zeros(len(impls), iters, dtype=torch.float64)
        for i in range(warmup + iters):  # the first calls set up connections
            for j, op in enumerate(impls.values()):
                dist.all_reduce(flag)  # line the ranks up: timings start together
                synchronize(device)
                start = perf_counter()
                op(buffer)
                synchronize(device)
                if i >= warmup:
                    times[j, i - warmup] = perf_counter() - start
        slowest = times.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        for j, name in enumerate(impls):
            t = statistics.median(slowest[j].tolist())
            algbw = nbytes(buffer) / t
            rows.append(
                {
                    "impl": name,
                    "bytes": nbytes(buffer),
                    "time_s": t,
                    "algbw": algbw,
                    "busbw": algbw * bus_factor("all_reduce", n),
                }
            )
    return rows


# [busbw-end]
