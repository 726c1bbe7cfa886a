"""``apply_tensor_parallel``: the course GPT rewritten in place for tensor parallelism.

The rewrite is a table (picotron's ``apply_tensor_parallel``, torchtitan's
``apply_tp`` plan): each row names module paths (``fnmatch`` patterns over
``named_modules()``) and the style that replaces them. Megatron-LM (Shoeybi et al.
2019, sec. 3, fig. 3) cuts each block into two tensor-parallel regions, entered by
``f`` and left by ``g``:

attention   q, k, v column-parallel: rank r computes heads ``[r a/tp, (r+1) a/tp)``
            (the model's heads are contiguous ``h / a`` slices of the outputs), so
            ``attn.n_heads`` becomes ``a / tp`` and the attention itself is local;
            ``proj`` row-parallel. The three column layers read one input, so
            ``f`` is applied once at the attention's input (a forward pre-hook, as
            torch's ``PrepareModuleInput``), not once per layer: one all-reduce in
            backward rather than three.
MLP         ``fc`` column-parallel, ``proj`` row-parallel; GELU in between is local.
embedding   vocabulary-parallel, and the head column-parallel over the vocabulary,
and head    whether or not they are tied: tied (``tie_weights``, the default), the
            two share one ``(v / tp, h)`` shard, since the head's output rows are
            the embedding's rows. The head's output stays split: the loss is
            ``vocab_parallel_cross_entropy``, which never gathers the logits.

Replicated parameters (the layer norms, the row layers' biases, the position
embedding) are whole on every rank. Without sequence parallelism every rank
computes them on the same (whole) activations with the same (whole) gradients:
their gradients are equal on every rank and need no all-reduce. With
``sequence_parallel=True`` (Korthikanti et al. 2022, sec. 4.2.2) the activations
between the regions hold ``s / tp`` tokens per rank, so those gradients are partial
sums over this rank's tokens: they must be summed over the tensor-parallel group
after every backward (``sync_sequence_parallel_grads``); forgetting it is the
classic bug (the replicas then drift apart, each following its own tokens).

Data parallelism composes on top: average every gradient over the dp group as
usual (over ``ParallelMesh.group("dp")``; the tp shards differ between tp ranks,
never between dp ranks).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
from torch import nn

from utils.comm import CommMeter, nbytes
from utils.model_parallel.comm import (
    CopyToTP,
    GatherFromSequence,
    all_gather_along,
    record,
)
from utils.model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelEmbedding,
    VocabParallelEmbedding,
)
from utils.models import GPTConfig

# [tp-plan-start]
# (module path pattern, style). "input": f (with sequence parallelism, the
# sequence all-gather) once at the module's input; "column_shared_input": a column
# layer behind such an input, which skips its own.
TP_PLAN: tuple[tuple[str, str], ...] = (
    ("tok", "vocab_embedding"),
    ("blocks.*.attn", "input"),
    ("blocks.*.attn.[qkv]", "column_shared_input"),
    ("blocks.*.attn.proj", "row"),
    ("blocks.*.mlp.fc", "column"),
    ("blocks.*.mlp.proj", "row"),
    ("head", "vocab_head"),
)
_PARALLEL = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
# Only with sequence parallelism: the positions follow the residual's tokens.
SP_PLAN: tuple[tuple[str, str], ...] = (("pos", "sequence_embedding"),)
# [tp-plan-end]


def check_tensor_parallel(
    cfg: GPTConfig, tp_size: int, *, sequence_parallel: bool = False
) -> None:
    """Refuse (``ValueError`` naming every value) a ``tp_size`` that does not divide
    the heads, the hidden size, the MLP width and the vocabulary (and, with
    sequence parallelism, the sequence). Pure: no process needed."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp must be a positive int, got {tp_size!r}")
    sizes = {
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "MLP width 4*d_model": 4 * cfg.d_model,
        "vocab_size": cfg.vocab_size,
    }
    if sequence_parallel:
        sizes["seq_len (sequence parallel)"] = cfg.seq_len
    bad = [f"{name}={size}" for name, size in sizes.items() if size % tp_size]
    if bad:
        raise ValueError(
            f"tp={tp_size} does not divide {', '.join(bad)}: each rank must hold "
            "whole heads and equal shards"
        )


def tp_group_of(mesh_or_group):
    """The tensor-parallel group of a ``ParallelMesh``, a ``DeviceMesh`` (its "tp"
    dimension, or its only one), or a ``ProcessGroup`` (as is)."""
    if hasattr(mesh_or_group, "group") and hasattr(mesh_or_group, "dims"):
        return mesh_or_group.group("tp")  # utils.dims.ParallelMesh
    if hasattr(mesh_or_group, "get_group"):  # torch DeviceMesh
        names = mesh_or_group.mesh_dim_names or ()
        return mesh_or_group.get_group("tp" if "tp" in names else None)
    return mesh_or_group


class _RegionInput:
    """Forward pre-hook: ``f`` (or the sequence all-gather) on a module's input."""

    def __init__(self, group, sequence_parallel: bool, meter: CommMeter | None):
        self.group, self.sequence_parallel, self.meter = group, sequence_parallel, meter

    def __call__(self, module, args):
        x, *rest = args
        if self.sequence_parallel:
            x = GatherFromSequence.apply(x, self.group, 1, self.meter)
        else:
            x = CopyToTP.apply(x, self.group, self.meter)
        return (x, *rest)


def apply_tensor_parallel(
    model: nn.Module,
    mesh_or_group,
    *,
    sequence_parallel: bool = False,
    meter: CommMeter | None = None,
) -> nn.Module:
    """Rewrite the course GPT (``utils.models.GPT``) in place by ``TP_PLAN``.

    Every rank of the group must start from the same full model (the same seed)
    and call this. Afterwards ``model(idx)`` returns this rank's vocabulary slice
    of the logits, ``(b, s, v / tp)``: take the loss with
    ``vocab_parallel_cross_entropy``. With ``sequence_parallel``, call
    ``sync_sequence_parallel_grads(model, group)`` after each backward. ``meter``
    records every collective's modelled bytes. Returns ``model``.
    """
    if any(isinstance(m, _PARALLEL) for m in model.modules()):
        raise ValueError("the model is already tensor-parallel: apply it once")
    group = tp_group_of(mesh_or_group)
    tp_size = dist.get_world_size(group)
    check_tensor_parallel(model.cfg, tp_size, sequence_parallel=sequence_parallel)
    sp = dict(sequence_parallel=sequence_parallel, meter=meter)
    # id(full weight) -> (full weight, its shard): a weight shared by two modules
    # (the tied embedding and head) is sharded once. The full weight is kept so
    # that its id cannot be reused while the table is walked.
    shared: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def build(style: str, module: nn.Module) -> nn.Module | None:
        if style == "input":
            module.tp_input = _RegionInput(group, sequence_parallel, meter)
            module.register_forward_pre_hook(module.tp_input)
            return None
        if style == "vocab_embedding":
            return VocabParallelEmbedding.from_embedding(module, group, **sp)
        if style == "sequence_embedding":
            return SequenceParallelEmbedding.from_embedding(module, group)
        if style == "row":
            return RowParallelLinear.from_linear(module, group, **sp)
        if style in ("column", "vocab_head", "column_shared_input"):
            # The head is a column layer over the vocabulary: its output rows.
            copy_input = style != "column_shared_input"
            return ColumnParallelLinear.from_linear(
                module, group, copy_input=copy_input, **sp
            )
        raise ValueError(f"unknown tensor-parallel style {style!r}")

    plan = TP_PLAN + (SP_PLAN if sequence_parallel else ())
    for pattern, style in plan:
        matches = [
            (name, m)
            for name, m in model.named_modules()
            if fnmatch.fnmatchcase(name, pattern)
        ]
        if not matches:
            raise ValueError(f"no module of the model matches {pattern!r}")
        for name, module in matches:
            new = build(style, module)
            if new is None:
                continue
            key = id(module.weight)
            if key in shared:
                first = shared[key][1]
                if first.tensor_parallel_dim != new.weight.tensor_parallel_dim:
                    raise ValueError(
                        f"{name}.weight is tied to a weight sharded along another "
                        "dimension: a tied pair must be cut the same way"
                    )
                new.weight = first
            shared[key] = (module.weight, new.weight)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    for block in model.blocks:
        block.attn.n_heads = model.cfg.n_heads // tp_size
    if sequence_parallel:
        # Everything left whole (layer norms, row biases, positions) now sees only
        # this rank's tokens.
        for p in model.parameters():
            if not hasattr(p, "tensor_parallel_dim"):
                p.sequence_parallel = True
    return model


# [sp-grads-start]
def sync_sequence_parallel_grads(
    model: nn.Module, group, *, meter: CommMeter | None = None
) -> None:
    """Sum over ``group`` the gradients of the parameters tagged
    ``sequence_parallel`` (Korthikanti et al. 2022, sec. 4.2.2): one all-reduce of
    them flattened together (Megatron-LM's ``_allreduce_layernorm_grads`` does the
    same), recorded as "all_reduce.sp_grads". Call after the backward, before the
    optimizer (and before, or after, the data-parallel average: they commute)."""
    grads = [
        p.grad
        for p in {id(p): p for p in model.parameters()}.values()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    record(meter, "all_reduce", "sp_grads", nbytes(flat), group)
    dist.all_reduce(flat, group=group)
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


# [sp-grads-end]


@torch.no_grad()
def full_parameters(
    model: nn.Module, group, *, grads: bool = False
) -> dict[str, torch.Tensor]:
    """Every parameter (or, ``grads=True``, its gradient) whole, by the names of the
    model before the rewrite: shards (``tensor_parallel_dim``) gathered over
    ``group``, replicated ones as they are. Every rank of the group must call it.
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        dim = getattr(p, "tensor_parallel_dim", None)
        out[name] = (t if dim is None else all_gather_along(t, dim, group)).clone()
    return out
