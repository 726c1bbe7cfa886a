"""Megatron-LM's tensor-parallel layers, each built by sharding a full torch layer.

Shoeybi et al. 2019, "Megatron-LM", sec. 3, fig. 3: ``Y = X A`` with ``A`` split by
columns (``ColumnParallelLinear``: each rank computes its slice of ``Y``), then
``Z = Y B`` with ``B`` split by rows (``RowParallelLinear``: each rank computes a
partial sum of ``Z`` from its slice of ``Y``). The elementwise GELU between them
needs nothing, so the pair costs ``f`` before and ``g`` after (``comm.py``). The
embedding and the output layer are split along the vocabulary (sec. 3, last
paragraphs), and the loss is computed from the vocabulary slices without ever
gathering the ``b * s * v`` logits (``vocab_parallel_cross_entropy``).

With ``sequence_parallel=True`` (Korthikanti et al. 2022, sec. 4.2.2) the input of
a column layer and the output of a row layer are split along the sequence
(dimension ``seq_dim``: 1 for the course's batch-first ``(b, s, h)``; Megatron-LM
is ``(s, b, h)``, dimension 0); the column layer all-gathers the sequence first
and the row layer reduce-scatters instead of all-reducing.

Every layer takes its group explicitly, holds the global sizes in ``in_features``
/ ``out_features`` (``num_embeddings``), and marks what it shards: a sharded
parameter carries ``tensor_parallel_dim`` (the dimension cut into ``tp`` equal
chunks, rank r holding chunk r), and a replicated one that only sees this rank's
tokens under sequence parallelism carries ``sequence_parallel = True`` (its
gradient is a partial sum: ``apply.sync_sequence_parallel_grads``). Megatron-LM
tags its parameters the same way (``tensor_model_parallel``, ``partition_dim``,
``sequence_parallel``).

Sources: picotron ``picotron/tensor_parallel/tensor_parallel.py``; Megatron-LM
``megatron/core/tensor_parallel/layers.py`` and ``cross_entropy.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from utils.comm import CommMeter, nbytes
from utils.model_parallel.comm import (
    CopyToTP,
    GatherFromSequence,
    ReduceFromTP,
    ScatterToSequence,
    all_gather_along,
    all_reduce_sum,
    record,
)


def _shard(full: torch.Tensor, dim: int, group) -> nn.Parameter:
    """This rank's chunk of ``full`` along ``dim``, as a parameter that says so."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    if full.shape[dim] % n:
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} does not divide into tp={n} "
            "equal shards"
        )
    param = nn.Parameter(full.detach().chunk(n, dim)[rank].clone())
    param.requires_grad_(full.requires_grad)
    param.tensor_parallel_dim = dim
    return param


class _Sharded(nn.Module):
    """What the parallel layers share: the group, the meter, the full weight."""

    weight: nn.Parameter

    def __init__(self, group, *, sequence_parallel: bool, seq_dim: int, meter):
        super().__init__()
        self.group = group
        self.tp_size = dist.get_world_size(group)
        self.sequence_parallel = bool(sequence_parallel)
        self.seq_dim = seq_dim
        self.meter: CommMeter | None = meter

    @torch.no_grad()
    def full_weight(self, *, grad: bool = False) -> torch.Tensor:
        """The whole weight (or, ``grad=True``, its gradient), gathered from the
        group: every rank of the group must call it."""
        t = self.weight.grad if grad else self.weight
        if t is None:
            raise ValueError("the weight has no gradient yet: run a backward first")
        return all_gather_along(t, self.weight.tensor_parallel_dim, self.group)


class ColumnParallelLinear(_Sharded):
    """``Y_i = X A_i + b_i``: this rank's slice of the outputs (Megatron-LM, sec. 3).

    The weight's rows (``out_features``, torch stores ``A^T``) and the bias are cut
    into ``tp`` chunks. The input is whole on every rank and enters through ``f``
    (or, ``sequence_parallel``, arrives as this rank's tokens and is all-gathered).
    ``copy_input=False`` skips that: the caller has applied it once for several
    layers reading the same input (q, k and v; ``apply.py``). The output stays
    split: ``(..., out_features / tp)``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group,
        *,
        sequence_parallel: bool = False,
        copy_input: bool = True,
        seq_dim: int = 1,
        meter: CommMeter | None = None,
    ):
        super().__init__(
            group, sequence_parallel=sequence_parallel, seq_dim=seq_dim, meter=meter
        )
        self.out_features, self.in_features = weight.shape
        self.copy_input = copy_input
        self.weight = _shard(weight, 0, group)
        self.bias = None if bias is None else _shard(bias, 0, group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> ColumnParallelLinear:
        """Shard a full ``nn.Linear`` (the same on every rank) by output rows."""
        return cls(linear.weight, linear.bias, group, **kwargs)

    # [column-forward-start]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input and self.sequence_parallel:
            x = GatherFromSequence.apply(x, self.group, self.seq_dim, self.meter)
        elif self.copy_input:
            x = CopyToTP.apply(x, self.group, self.meter)
        return F.linear(x, self.weight, self.bias)

    # [column-forward-end]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"({self.out_features // self.tp_size} here), tp={self.tp_size}, "
            f"sequence_parallel={self.sequence_parallel}, copy_input={self.copy_input}"
        )


class RowParallelLinear(_Sharded):
    """``Z = sum_i Y_i B_i + b``: partial sums completed by ``g`` (Megatron-LM, sec. 3).

    The weight's columns (``in_features``) are cut into ``tp`` chunks; the input is
    this rank's slice of the features, ``(..., in_features / tp)``, as a column
    layer leaves it. The bias is kept whole and added once, after the reduction
    (added before it, it would be summed ``tp`` times). With
    ``sequence_parallel`` the reduction is a reduce-scatter along the sequence,
    the bias is added to this rank's tokens only, and its gradient is therefore
    partial (tagged ``sequence_parallel``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group,
        *,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        meter: CommMeter | None = None,
    ):
        super().__init__(
            group, sequence_parallel=sequence_parallel, seq_dim=seq_dim, meter=meter
        )
        self.out_features, self.in_features = weight.shape
        self.weight = _shard(weight, 1, group)
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
            self.bias.requires_grad_(bias.requires_grad)
            self.bias.sequence_parallel = self.sequence_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> RowParallelLinear:
        """Shard a full ``nn.Linear`` (the same on every rank) by input columns."""
        return cls(linear.weight, linear.bias, group, **kwargs)

    # [row-forward-start]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = ScatterToSequence.apply(partial, self.group, self.seq_dim, self.meter)
        else:
            out = ReduceFromTP.apply(partial, self.group, self.meter)
        return out if self.bias is None else out + self.bias

    # [row-forward-end]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} ({self.in_features // self.tp_size} "
            f"here), out_features={self.out_features}, tp={self.tp_size}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


def _plain_embedding(emb: nn.Embedding) -> None:
    if (
        emb.padding_idx is not None
        or emb.max_norm is not None
        or emb.scale_grad_by_freq
        or emb.sparse
    ):
        raise ValueError(
            "only a plain nn.Embedding can be split here (no padding_idx, max_norm, "
            "scale_grad_by_freq or sparse)"
        )


class VocabParallelEmbedding(_Sharded):
    """An embedding whose rank r holds rows ``[r v/tp, (r+1) v/tp)`` (Megatron-LM,
    sec. 3).

    Each rank looks up the ids in its slice and gives zeros for the others, so the
    ranks hold partial embeddings that one all-reduce (``g``) completes; with
    ``sequence_parallel`` a reduce-scatter completes them and leaves this rank
    its tokens (Korthikanti et al. 2022, sec. 4.2.2).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        group,
        *,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        meter: CommMeter | None = None,
    ):
        super().__init__(
            group, sequence_parallel=sequence_parallel, seq_dim=seq_dim, meter=meter
        )
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = _shard(weight, 0, group)
        per_rank = self.num_embeddings // self.tp_size
        self.vocab_start = dist.get_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, **kwargs):
        """Shard a full ``nn.Embedding`` (the same on every rank) by vocabulary."""
        _plain_embedding(emb)
        return cls(emb.weight, group, **kwargs)

    # [vocab-embedding-start]
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return ScatterToSequence.apply(
                partial, self.group, self.seq_dim, self.meter
            )
        return ReduceFromTP.apply(partial, self.group, self.meter)

    # [vocab-embedding-end]

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
            f"{self.vocab_end}) here, sequence_parallel={self.sequence_parallel}"
        )


class SequenceParallelEmbedding(nn.Embedding):
    """A replicated embedding (the positions) that looks up this rank's tokens only.

    Under sequence parallelism the residual stream holds ``s / tp`` tokens per
    rank, so the position embedding added to it must too: the ids (positions) are
    cut along their last dimension and rank r keeps chunk r. The weight is whole
    on every rank, and its gradient holds only this rank's positions: it is tagged
    ``sequence_parallel`` and summed over the group after the backward.
    """

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group) -> SequenceParallelEmbedding:
        _plain_embedding(emb)
        new = cls(*emb.weight.shape, _weight=emb.weight.detach().clone())
        new.weight.requires_grad_(emb.weight.requires_grad)
        new.weight.sequence_parallel = True
        new.group = group
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rank, n = dist.get_rank(self.group), dist.get_world_size(self.group)
        if ids.shape[-1] % n:
            raise ValueError(
                f"sequence of {ids.shape[-1]} tokens does not divide into tp={n} "
                "equal slices (sequence parallelism)"
            )
        return super().forward(ids.chunk(n, -1)[rank])


# [vocab-ce-start]
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy from vocabulary slices of the logits; per-token losses."""

    @staticmethod
    def forward(ctx, logits, targets, group, meter=None):
        n_local = logits.shape[-1]
        start = dist.get_rank(group) * n_local
        # 1. The largest logit of each token over the whole vocabulary (for a
        #    stable exp): a max all-reduce of b*s numbers.
        top = logits.detach().amax(-1)
        if dist.get_world_size(group) > 1:
            record(meter, "all_reduce", "fwd", nbytes(top), group)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top[..., None]
        # 2. The target's logit (held by one rank; the others contribute 0) and
        #    the sum of exps: one all-reduce of the two stacked, 2*b*s numbers.
        outside = (targets < start) | (targets >= start + n_local)
        local_t = (targets - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local_t[..., None])[..., 0].masked_fill(outside, 0)
        exp = shifted.exp()
        sums = all_reduce_sum(torch.stack([exp.sum(-1), picked]), group, meter=meter)
        # loss = log(sum_j e^{z_j - m}) - (z_t - m)
        ctx.save_for_backward(exp / sums[0][..., None], local_t, outside)
        return sums[0].log() - sums[1]

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss / d z_j = softmax_j - [j == t]: local, no communication.
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)[..., None]
        grad.scatter_add_(-1, local_t[..., None], -hit)
        return grad * grad_loss[..., None], None, None, None


# [vocab-ce-end]


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    group,
    *,
    reduction: str = "mean",
    meter: CommMeter | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits split along the vocabulary (Megatron-LM, sec. 3).

    ``local_logits`` is ``(..., v / tp)``: rank r's slice ``[r v/tp, (r+1) v/tp)``
    of the vocabulary, as ``ColumnParallelLinear`` (the head) leaves it;
    ``targets`` is ``(...)``, whole on every rank. Instead of gathering the
    ``b * s * v`` logits, two all-reduces: the max of each token's logits (for a
    stable exp, ``b * s`` numbers), then its sum of exps stacked with its
    target's logit (``2 * b * s``; Megatron-LM makes these two calls). The
    backward is local (``softmax - one_hot``). Every rank of ``group`` gets the
    same loss: ``reduction`` "mean" (``F.cross_entropy``'s default), "sum" or
    "none".
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        )
    losses = _VocabParallelCrossEntropy.apply(local_logits, targets, group, meter)
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()
