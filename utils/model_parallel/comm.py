"""The conjugate operators of tensor parallelism: ``f`` and ``g``, and the pair that
sequence parallelism puts in their place.

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models
Using Model Parallelism", sec. 3 and fig. 3: a column-parallel layer is entered
through ``f`` (identity forward, all-reduce backward) and a row-parallel layer left
through ``g`` (all-reduce forward, identity backward). The two are conjugate: each
one's backward is the other's forward, so an MLP or an attention block costs one
all-reduce in forward and one in backward.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4.2.2 and fig. 5: with sequence parallelism the activations between
the tensor-parallel regions are split along the sequence, and ``f`` and ``g``
become ``g-bar`` (here ``GatherFromSequence``: all-gather forward, reduce-scatter
backward) and ``g``'s replacement (here ``ScatterToSequence``: reduce-scatter
forward, all-gather backward). An all-reduce is a reduce-scatter followed by an
all-gather, so the bytes are the same; what changes is that the layer norms and
residuals between the regions hold ``s / tp`` tokens per rank.

Every operator takes its process group explicitly (no global, unlike picotron's
``process_group_manager``) and an optional ``CommMeter``, on which it records
modelled bytes (``CommMeter.add``, with the size of ``group``) under the name
``"<collective>.fwd"`` or ``"<collective>.bwd"``. A group of one rank makes each
operator an identity that records nothing.

Sources: picotron ``picotron/tensor_parallel/tp_communications.py``
(``CopyToModelParallelRegion``, ``ReduceFromModelParallelRegion``); Megatron-LM
``megatron/core/tensor_parallel/mappings.py`` (``_CopyToModelParallelRegion``,
``_GatherFromSequenceParallelRegion``, ``_ReduceScatterToSequenceParallelRegion``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from utils.comm import CommMeter, nbytes


def record(meter: CommMeter | None, op: str, phase: str, size: int, group) -> None:
    """Add ``op`` on a buffer of ``size`` bytes over ``group`` to ``meter`` (if any),
    modelled, as ``"<op>.<phase>"``."""
    if meter is not None:
        meter.add(op, size, group, label=f"{op}.{phase}")


def all_reduce_sum(
    x: torch.Tensor, group, *, meter: CommMeter | None = None, phase: str = "fwd"
) -> torch.Tensor:
    """A new tensor holding the sum of ``x`` over ``group`` (``x`` is left alone).

    Why a copy: autograd may hand the same gradient tensor to several consumers (an
    addition passes its incoming gradient to both inputs), so summing it in place
    would change what the others see.
    """
    out = x.clone(memory_format=torch.contiguous_format)
    if dist.get_world_size(group) > 1:
        record(meter, "all_reduce", phase, nbytes(out), group)
        dist.all_reduce(out, group=group)
    return out


def all_gather_along(
    x: torch.Tensor,
    dim: int,
    group,
    *,
    meter: CommMeter | None = None,
    phase: str = "fwd",
) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``, in group-rank order, as a
    contiguous tensor.

    Why contiguous: gathered along dim 0 and moved back, the result is a strided
    view, and every layer reading it would copy it (``F.linear`` flattens its
    input); q, k and v read the same gathered input, so they would keep three
    copies for their backward instead of sharing one.
    """
    n = dist.get_world_size(group)
    if n == 1:
        return x
    moved = x.movedim(dim, 0).contiguous()  # gloo and NCCL gather along dim 0
    out = moved.new_empty((n * moved.shape[0], *moved.shape[1:]))
    record(meter, "all_gather", phase, nbytes(out), group)
    dist.all_gather_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter_along(
    x: torch.Tensor,
    dim: int,
    group,
    *,
    meter: CommMeter | None = None,
    phase: str = "fwd",
) -> torch.Tensor:
    """The sum of ``x`` over ``group``, cut in equal chunks along ``dim``; rank r of
    the group keeps chunk r."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(
            f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks: "
            "it must divide evenly"
        )
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // n, *moved.shape[1:]))
    record(meter, "reduce_scatter", phase, nbytes(moved), group)
    dist.reduce_scatter_single(out, moved, group=group)
    return out.movedim(0, dim)


# [f-g-start]
class CopyToTP(torch.autograd.Function):
    """Megatron-LM's ``f`` (Shoeybi et al. 2019, sec. 3, eq. 3): identity forward,
    all-reduce backward.

    Placed before a column-parallel layer, whose input every rank holds whole: each
    rank's backward yields only its output slice's share of the input gradient,
    and the all-reduce sums the shares. ``CopyToTP.apply(x, group, meter)``.
    """

    @staticmethod
    def forward(ctx, x, group, meter=None):
        ctx.group, ctx.meter = group, meter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group, meter=ctx.meter, phase="bwd"), None, None


class ReduceFromTP(torch.autograd.Function):
    """Megatron-LM's ``g`` (Shoeybi et al. 2019, sec. 3): all-reduce forward,
    identity backward.

    Placed after a row-parallel layer, whose ranks each hold a partial sum of the
    output: the all-reduce completes it, and since every rank then holds the same
    output, the gradient that comes back is already whole on each.
    ``ReduceFromTP.apply(x, group, meter)``.
    """

    @staticmethod
    def forward(ctx, x, group, meter=None):
        return all_reduce_sum(x, group, meter=meter, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


# [f-g-end]


# [sp-ops-start]
class GatherFromSequence(torch.autograd.Function):
    """Sequence parallelism's ``g-bar`` (Korthikanti et al. 2022, sec. 4.2.2):
    all-gather along the sequence forward, reduce-scatter backward.

    Replaces ``f`` before a column-parallel layer: the input arrives as this
    rank's ``s / tp`` tokens and the layer needs all ``s``. The backward sums the
    ranks' shares of the input gradient (what ``f``'s all-reduce did) and keeps
    only this rank's tokens. ``GatherFromSequence.apply(x, group, seq_dim, meter)``.
    """

    @staticmethod
    def forward(ctx, x, group, seq_dim=1, meter=None):
        ctx.group, ctx.seq_dim, ctx.meter = group, seq_dim, meter
        return all_gather_along(x, seq_dim, group, meter=meter, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        out = reduce_scatter_along(
            grad, ctx.seq_dim, ctx.group, meter=ctx.meter, phase="bwd"
        )
        return out, None, None, None


class ScatterToSequence(torch.autograd.Function):
    """Sequence parallelism's replacement of ``g`` (Korthikanti et al. 2022, sec.
    4.2.2): reduce-scatter along the sequence forward, all-gather backward.

    After a row-parallel layer (or a vocabulary-parallel embedding) every rank
    holds a partial sum of all ``s`` tokens; the reduce-scatter completes the sum
    and leaves each rank its ``s / tp`` tokens. The backward gathers the tokens'
    gradients back, since the partial sums used all of them.
    ``ScatterToSequence.apply(x, group, seq_dim, meter)``.
    """

    @staticmethod
    def forward(ctx, x, group, seq_dim=1, meter=None):
        ctx.group, ctx.seq_dim, ctx.meter = group, seq_dim, meter
        return reduce_scatter_along(x, seq_dim, group, meter=meter, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        out = all_gather_along(
            grad, ctx.seq_dim, ctx.group, meter=ctx.meter, phase="bwd"
        )
        return out, None, None, None


# [sp-ops-end]
