"""Communication helpers: collectives that count their bytes, and a ring all-reduce.

Introduced in chapter 0 ("Why one device is not enough", the collectives and their
alpha-beta cost) and chapter 1 ("Data parallelism", the ring all-reduce). ZeRO
(chapter 2) uses the reduce-scatter and all-gather helpers; tensor and pipeline
parallelism run them on subgroups (``group=``), so every figure takes ``n`` from the
group the collective ran on, never from the default group.

Two kinds of byte figure, and every figure in the course says which it is:

counted
    bytes really handed to the transport: the sends that the course's own
    point-to-point code makes (``ring_all_reduce``, pipeline send/recv), added up by
    :meth:`CommMeter.count`; or what the kernel's TCP counters saw leave a gloo
    rank's sockets (``utils.wire``).
modelled
    nccl-tests' accounting (PERFORMANCE.md): for an operation on a buffer of ``S``
    bytes over ``n`` ranks, each rank moves ``factor * S`` bytes through its link,
    with the factor 2(n-1)/n for all-reduce, (n-1)/n for reduce-scatter, all-gather
    and all-to-all (``S`` the full, unsharded buffer), and 1 for broadcast and
    reduce. It describes a bandwidth-optimal algorithm, whichever one the backend
    runs (NCCL picks ring, tree, NVLS or CollNet by size and topology; nccl-tests'
    point is that busbw = algbw x factor is comparable with the link speed whatever
    the algorithm). :meth:`CommMeter.add` records it; ``CollectiveCounter`` records it
    for the collectives torch's DDP, ZeroRedundancyOptimizer and FSDP2 issue.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from time import perf_counter

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup
from torch.utils._python_dispatch import TorchDispatchMode

from utils.checks import check_int
from utils.launch import p2p_device, synchronize

_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}
COLLECTIVES = tuple(_FACTORS)
SOURCES = ("counted", "modelled")


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' busbw/algbw factor for ``op`` over ``world_size`` ranks."""
    if op not in _FACTORS:
        raise ValueError(f"unknown collective {op!r}; expected one of {COLLECTIVES}")
    check_int("world_size", world_size)
    return _FACTORS[op](world_size)


def bytes_sent(op: str, nbytes: int, world_size: int) -> int:
    """Modelled bytes one rank sends for ``op`` on an ``nbytes`` buffer."""
    return round(bus_factor(op, world_size) * nbytes)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def group_size(group=None) -> int:
    """Ranks in ``group`` (None: the default group)."""
    return dist.get_world_size(group)


class CommMeter:
    """The bytes this rank sends, by operation, each counted or modelled.

    ``by_op[op]`` holds the bytes; ``source[op]`` says how they were obtained.
    Reset it every step.
    """

    def __init__(self):
        self.by_op: dict[str, int] = defaultdict(int)
        self.source: dict[str, str] = {}
        self.calls: dict[str, int] = defaultdict(int)

    def _add(self, op: str, nbytes: int, source: str) -> None:
        if self.source.setdefault(op, source) != source:
            raise ValueError(f"{op!r} is recorded as {self.source[op]}, not {source}")
        self.by_op[op] += int(nbytes)
        self.calls[op] += 1

    def add(self, op: str, buffer_bytes: int, group=None, *, label=None) -> None:
        """Record ``op`` on a buffer of ``buffer_bytes`` over ``group``: modelled.
        ``label`` files it under another name (DDP's "used_map" all-reduce)."""
        self.add_modelled(op, buffer_bytes, group_size(group), label=label)

    def add_modelled(self, op: str, buffer_bytes: int, n: int, *, label=None) -> None:
        """Record ``op`` over ``n`` ranks (the size of the group it ran on)."""
        self._add(label or op, bytes_sent(op, buffer_bytes, n), "modelled")

    def count(self, op: str, nbytes: int) -> None:
        """Record ``nbytes`` this rank really sent: counted."""
        self._add(op, nbytes, "counted")

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def total_of(self, source: str) -> int:
        """Bytes of one kind: "counted" or "modelled"."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        return sum(b for op, b in self.by_op.items() if self.source[op] == source)

    @property
    def kind(self) -> str:
        """ "counted", "modelled", "counted+modelled", or "none" when empty."""
        kinds = sorted(set(self.source.values()))
        return "+".join(kinds) if kinds else "none"

    def reset(self) -> None:
        self.by_op.clear()
        self.source.clear()
        self.calls.clear()


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
        meter.add("all_reduce", nbytes(tensor), group)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_reduce_mean(tensors, *, meter: CommMeter | None = None, group=None) -> None:
    """Average each tensor over the ranks in place: sum with all-reduce, divide by n.

    The gradient-averaging step of data parallelism (Li et al., "PyTorch
    Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020).
    """
    n = group_size(group)
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
        meter.add("reduce_scatter", nbytes(input), group)
    return dist.reduce_scatter_single(
        output, input, op=op, group=group, async_op=async_op
    )


def all_gather(
    output, input, *, meter: CommMeter | None = None, group=None, async_op: bool = False
):
    """Concatenate every rank's ``input`` into ``output`` (n times larger)."""
    if meter is not None:
        meter.add("all_gather", nbytes(output), group)
    return dist.all_gather_single(output, input, group=group, async_op=async_op)


def broadcast(tensor, src: int = 0, *, meter: CommMeter | None = None, group=None):
    """Copy ``src``'s tensor (``src`` a global rank) to every rank of ``group``."""
    if meter is not None:
        meter.add("broadcast", nbytes(tensor), group)
    return dist.broadcast(tensor, src=src, group=group)


@torch.no_grad()
def broadcast_from_first_rank(tensors, *, group=None, meter=None) -> None:
    """Give every rank of ``group`` the first rank's values of ``tensors``, in place.

    How a data-parallel wrapper makes the replicas start equal (DDP broadcasts
    rank 0's parameters and buffers at construction). Shared tensors (tied
    weights) go once.
    """
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for t in {id(t): t for t in tensors}.values():
        broadcast(t.data, src, meter=meter, group=group)


_C10D = {  # torch.ops.c10d op -> (collective, index of the argument with the buffer)
    "allreduce_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "_allgather_base_": ("all_gather", 0),  # (output, input): the full output
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input): full input
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
}


def _group_of(func, args, kwargs) -> int:
    """The size of the process group a c10d op runs on (its ``process_group``)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "process_group":
            value = args[i] if i < len(args) else kwargs[arg.name]
            return ProcessGroup.unbox(value).size()
    raise ValueError(f"{func._schema.name} has no process_group argument")


class CollectiveCounter(TorchDispatchMode):
    """Inside ``with CollectiveCounter(meter):`` every collective adds its bytes.

    Each ``torch.distributed`` collective reaches the dispatcher as a
    ``torch.ops.c10d`` op (what torch's ``CommDebugMode`` counts), so a dispatch
    mode sees those issued by DDP's reducer and by FSDP2 too. Sizes are those of
    the full buffer, as ``utils.comm`` records them, and ``n`` in the bus factor is
    the size of the group the op ran on (read from its ``process_group``
    argument): the figures are modelled, like :meth:`CommMeter.add`'s.
    """

    def __init__(self, meter: CommMeter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "c10d" and name in _C10D:
            op, index = _C10D[name]
            buffers = args[index]
            if isinstance(buffers, torch.Tensor):
                buffers = [buffers]
            size = sum(t.numel() * t.element_size() for t in buffers)
            self.meter.add_modelled(op, size, _group_of(func, args, kwargs))
        return func(*args, **kwargs)


# [ring-all-reduce-start]
def ring_all_reduce(
    tensor: torch.Tensor, *, meter: CommMeter | None = None, group=None
) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place with a ring of point-to-point messages.

    The bandwidth-optimal algorithm of Patarasuk and Yuan, "Bandwidth optimal
    all-reduce algorithms for clusters of workstations" (JPDC 2009), one of the
    algorithms NCCL chooses from (with tree, NVLS and CollNet). The buffer is cut
    into n chunks. In the reduce-scatter
    phase (n-1 steps) every rank sends one chunk to its right neighbour and adds
    the chunk it receives from its left one; afterwards rank r owns the full sum of
    chunk (r+1) mod n. In the all-gather phase (n-1 more steps) the finished chunks
    travel once more around the ring. Each rank sends 2(n-1)/n of the buffer,
    counted send by send on ``meter`` (as "ring_all_reduce").
    """
    n = group_size(group)
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
    host = p2p_device(tensor.device, group)  # gloo's send/recv: host memory only

    def exchange(send_idx: int, into: torch.Tensor) -> None:
        out, inbox = chunks[send_idx], into
        if host != tensor.device:
            out, inbox = out.to(host), torch.empty_like(into, device=host)
        ops = [
            dist.P2POp(dist.isend, out, right, group),
            dist.P2POp(dist.irecv, inbox, left, group),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        if inbox is not into:
            into.copy_(inbox)
        if meter is not None:
            meter.count("ring_all_reduce", nbytes(chunks[send_idx]))

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
    sizes_bytes, impls=None, *, warmup: int = 5, iters: int = 20, device=None
) -> list[dict]:
    """Time all-reduce on float32 buffers of each size, inside every rank.

    Measured the way nccl-tests' ``all_reduce_perf`` does (its README: ``-n 20``
    timed iterations by default; ``-w`` untimed warm-up ones, 5 until 2025, now 1
    per size over the whole sweep): ``warmup`` untimed calls, then ``iters`` timed
    ones. By default nccl-tests times the ``iters`` calls back to back and reports
    their mean, averaged over ranks (``-I 1`` adds per-iteration timings; in MPI
    builds ``-a 3`` reports the slowest rank). Here every call is timed on its own,
    after a barrier, so the spread across iterations can be reported; and since an
    all-reduce is over when its slowest rank is, each iteration's time is the
    slowest rank's.

    ``impls`` maps a name to a function that sums a tensor over the ranks in place
    (default: the backend's ``dist.all_reduce``); they alternate, so a busy machine
    slows them alike. One row per (size, impl), the same on every rank:

    * ``time_s``: the median over iterations; ``algbw = S / t`` and
      ``busbw = algbw * 2(n-1)/n`` from it, as nccl-tests defines them;
    * ``time_p10_s``, ``time_p90_s``, ``time_min_s``, ``time_max_s``: the spread
      (10th and 90th percentiles, linear interpolation; min and max);
    * ``times_s``: every iteration's slowest-rank time; ``warmup``, ``iters``.
    """
    check_int("iters", iters)
    check_int("warmup", warmup, minimum=0)
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
        slowest = times.to(device)  # per iteration: the slowest rank's time
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        for j, name in enumerate(impls):
            ts = slowest[j].cpu().tolist()
            t = statistics.median(ts)
            p10, p90 = np.percentile(ts, [10, 90]).tolist()
            algbw = nbytes(buffer) / t
            rows.append(
                {
                    "impl": name,
                    "bytes": nbytes(buffer),
                    "time_s": t,
                    "algbw": algbw,
                    "busbw": algbw * bus_factor("all_reduce", n),
                    "time_p10_s": p10,
                    "time_p90_s": p90,
                    "time_min_s": min(ts),
                    "time_max_s": max(ts),
                    "times_s": ts,
                    "warmup": warmup,
                    "iters": iters,
                }
            )
    return rows


# [busbw-end]


def fit_alpha_beta(
    sizes: Sequence[float], times: Sequence[float], world_size: int
) -> tuple[float, float]:
    """Fit ring all-reduce's alpha-beta model to measured times (chapter 0).

    Model: t(S) = 2(N-1) alpha + 2(N-1)/N * S * beta, with alpha the latency of one
    message (s) and beta the time per byte (s/B), so 1/beta is the link bandwidth
    (Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication
    Operations in MPICH", IJHPCA 2005). Least squares on relative error (times span
    orders of magnitude). Returns (alpha, beta); a negative intercept or slope is
    clipped to zero.
    """
    check_int("world_size", world_size, minimum=2)
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(times, dtype=float)
    if s.shape != t.shape or s.size < 2:
        raise ValueError("need at least two (size, time) pairs of equal length")
    if np.any(t <= 0):
        raise ValueError("times must be positive")
    design = np.stack([np.ones_like(s), s], axis=1) / t[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    n = world_size
    return max(a, 0.0) / (2 * (n - 1)), max(b, 0.0) / (2 * (n - 1) / n)


def alpha_beta_time(size: float, world_size: int, alpha: float, beta: float) -> float:
    """Ring all-reduce time for ``size`` bytes in the alpha-beta model."""
    n = world_size
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * size * beta
