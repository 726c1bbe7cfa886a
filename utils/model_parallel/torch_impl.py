"""torch's own tensor parallelism for the course GPT: a ``parallelize_module`` plan.

Chapter 4 ("Model parallelism"). The same cut as ``apply.TP_PLAN`` (Shoeybi et al.
2019, sec. 3), written with torch's styles (``torch.distributed.tensor.parallel``,
torch 2.13), in torchtitan's shape (``models/llama3/infra/parallelize.py``,
``apply_tp``): a dict from module path to style.

=====================  =====================================  =====================
module                 without sequence parallelism           with it
=====================  =====================================  =====================
``tok``                ``RowwiseParallel``: rows = vocabulary  output ``Shard(1)``
``pos``                (left alone: replicated)               ``SequenceParallel``
                                                               over dim 0 (this
                                                               rank's positions)
``blocks.i.ln1/ln2``   (left alone)                           ``SequenceParallel``
``blocks.i.attn``      ``PrepareModuleInput``: ``f`` once     all-gather once
``blocks.i.attn.q/k/v``  ``ColwiseParallel``                  the same
``blocks.i.attn.proj``   ``RowwiseParallel``                  output ``Shard(1)``
``blocks.i.mlp``       (``fc`` enters the region itself)      all-gather once
``blocks.i.mlp.fc``    ``ColwiseParallel``                    the same
``blocks.i.mlp.proj``  ``RowwiseParallel``                    output ``Shard(1)``
``ln_f``               (left alone)                           ``SequenceParallel``
``head``               ``ColwiseParallel``, output            input ``Shard(1)``
                       ``Shard(-1)`` kept as a DTensor
=====================  =====================================  =====================

The loss is ``F.cross_entropy`` under ``loss_parallel()`` on the head's
vocabulary-sharded DTensor logits, which never gathers them (``loss.py``: an
all-reduce of the max, one of the sum of exps, one of the target's logit).

Why ``attn`` gets a ``PrepareModuleInput``: q, k and v read one input. Each
``ColwiseParallel`` would make it a DTensor on its own, and in backward each would
all-reduce its share of the input's gradient (three all-reduces). Made a
replicated DTensor once at the attention's input, the three shares are added as
``Partial`` DTensors (no communication) and all-reduced once, where the input
became a DTensor: ``f`` once, as ``apply.py`` does with a pre-hook.

What each rank then holds: q/k/v and fc keep ``Shard(0)`` of their weights and
biases, the row layers ``Shard(1)`` of their weights and a ``Replicate`` bias, the
embedding and the head ``Shard(0)`` (their vocabulary rows). The attention module
reads its head count from ``attn.n_heads``, which is set to ``a / t`` here (the
model reads the local width off q's output, so it works with DTensor's shards).

With sequence parallelism the replicated parameters under ``SequenceParallel``
(layer norms, positions) get ``Partial`` gradients: torch sums each over the
group when the optimizer reads it (a ``Partial`` DTensor is reduced on use: one
all-reduce per such tensor and use, 4 L + 3 in an SGD step, measured in
``tests/test_model_parallel.py``), where ``apply.sync_sequence_parallel_grads``
sums them in one all-reduce after the backward. The row layers' biases come out
``Replicate`` (measured), with no collective of their own, where the scratch row
layer adds its bias after the reduce-scatter and sums its gradient with the
others. And the embedding's weight gradient comes out ``Replicate``: the whole
v x h matrix on every rank, (t-1)/t v h more gradient elements than its shard
(measured without sequence parallelism, the same test).

Tied weights are refused: ``parallelize_module`` gives each module a new DTensor
parameter of its own, so the tie is silently broken (measured: after it,
``head.weight is tok.weight`` is False, and the two copies would train apart).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._C._distributed_c10d import ProcessGroup, _resolve_process_group
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn import functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass_type

from utils.comm import CollectiveCounter, CommMeter

__all__ = [
    "TPCollectiveCounter",
    "TorchLayerGroup",
    "full_state",
    "parallel_cross_entropy",
    "torch_tp",
    "torch_tp_plan",
]


def torch_tp_plan(n_layers: int, *, sequence_parallel: bool = False) -> dict:
    """The ``parallelize_module`` plan for the course GPT (see the module table)."""
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()  # the residual stream's layout
    plan: dict = {
        "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "head": ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        ),
    }
    if sp:
        plan["ln_f"] = SequenceParallel()
    for i in range(n_layers):
        b = f"blocks.{i}"
        plan[f"{b}.attn"] = PrepareModuleInput(
            input_layouts=(seq,), desired_input_layouts=(Replicate(),)
        )
        for name in ("q", "k", "v"):
            plan[f"{b}.attn.{name}"] = ColwiseParallel()
        plan[f"{b}.attn.proj"] = RowwiseParallel(output_layouts=seq)
        plan[f"{b}.mlp.fc"] = ColwiseParallel()
        plan[f"{b}.mlp.proj"] = RowwiseParallel(output_layouts=seq)
        if sp:
            plan[f"{b}.ln1"] = SequenceParallel()
            plan[f"{b}.ln2"] = SequenceParallel()
            plan[f"{b}.mlp"] = PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            )
    return plan


def torch_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool = False):
    """The course GPT parallelized in place by torch over the 1-D ``tp_mesh``.

    Afterwards ``model(idx)`` returns the logits as a DTensor sharded along the
    vocabulary; take the loss with :func:`parallel_cross_entropy`. With
    ``sequence_parallel``, ``idx`` is whole and the embedding reduce-scatters its
    output along the sequence.
    """
    cfg = model.cfg
    if cfg.tie_weights:
        raise ValueError(
            "torch_tp needs an untied model: parallelize_module gives the "
            "embedding and the head a new parameter each, silently breaking the tie"
        )
    t = tp_mesh.size()
    parallelize_module(
        model, tp_mesh, torch_tp_plan(cfg.n_layers, sequence_parallel=sequence_parallel)
    )
    if sequence_parallel:
        # The positions follow the residual stream's tokens: made a replicated
        # DTensor first, then SequenceParallel(sequence_dim=0) keeps this rank's
        # slice (a local cut, no communication); the weight's gradient holds this
        # rank's positions only (Partial), like a layer norm's.
        parallelize_module(
            model.pos,
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Replicate(),),
                desired_input_layouts=(Replicate(),),
                use_local_output=False,
            ),
        )
        parallelize_module(
            model.pos, tp_mesh, SequenceParallel(sequence_dim=0, use_local_output=True)
        )
    for block in model.blocks:
        block.attn.n_heads = cfg.n_heads // t
    return model


def parallel_cross_entropy(logits, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` on vocabulary-sharded DTensor logits, under
    ``loss_parallel()``; a replicated scalar DTensor. Call ``backward`` inside
    ``loss_parallel()`` too (torch's docs: its backward ops are the parallel ones)."""
    with loss_parallel():
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def full_state(model: nn.Module, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) whole, by name: DTensors gathered
    (``full_tensor``: shards concatenated, ``Partial`` gradients summed), plain
    tensors as they are. Every rank of the mesh must call it."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    return out


# _c10d_functional op -> (collective, the full buffer's bytes from (args, group size))
_FUNCTIONAL = {
    "all_reduce": ("all_reduce", lambda a, n: _bytes(a[0])),
    "all_reduce_coalesced": ("all_reduce", lambda a, n: _bytes(a[0])),
    "all_gather_into_tensor": ("all_gather", lambda a, n: n * _bytes(a[0])),
    "all_gather_into_tensor_coalesced": ("all_gather", lambda a, n: n * _bytes(a[0])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, n: _bytes(a[0])),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", lambda a, n: _bytes(a[0])),
    "all_to_all_single": ("all_to_all", lambda a, n: _bytes(a[0])),
    "broadcast": ("broadcast", lambda a, n: _bytes(a[0])),
}


def _bytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


class TPCollectiveCounter(CollectiveCounter):
    """``utils.comm.CollectiveCounter`` that also sees DTensor's collectives.

    DTensor redistributes through the functional collectives
    (``torch.ops._c10d_functional.all_reduce``, ``all_gather_into_tensor``,
    ``reduce_scatter_tensor``...; ``torch/distributed/_functional_collectives.py``),
    which do not pass through the ``torch.ops.c10d`` ops the base class counts.
    Each is recorded the same way: the full buffer's bytes, modelled with the size
    of the group it ran on (its ``group_name`` argument, resolved to the group).
    ``wait_tensor`` moves nothing and is not counted. A DTensor op is handed back
    to DTensor (``NotImplemented``) so that its own handlers, which issue
    collectives, run with the counter active (as ``utils.memory.MemoryTracker``
    does).
    """

    def __init__(self, meter: CommMeter):
        super().__init__(meter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            # A DTensor op: let DTensor run it with this mode still active, so the
            # collectives its handlers issue (loss_parallel's) reach it too.
            return NotImplemented
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "_c10d_functional" and name in _FUNCTIONAL:
            op, size_of = _FUNCTIONAL[name]
            group = args[-1] if args else (kwargs or {})["group_name"]
            if not isinstance(group, ProcessGroup):
                group = _resolve_process_group(group)
            n = group.size()
            self.meter.add_modelled(op, size_of(args, n), n)
        return super().__torch_dispatch__(func, types, args, kwargs)


# ------------------------------------------------------------ across layers
class TorchLayerGroup(nn.Module):
    """torch's own split across layers, the counterpart of
    ``layer_split.LayerGroup``: ``torch.distributed.pipelining``'s
    ``PipelineStage`` run by ``ScheduleGPipe`` with one micro-batch, which is the
    same computation (forward down the chain, then the backward back up).

    ``group`` is the chain's process group (rank ``index`` of it holds this
    group of layers). ``meter`` counts each send, from the point-to-point ops
    the stage hands to the schedule (``get_fwd_send_ops`` / ``get_bwd_send_ops``,
    "send.fwd" / "send.bwd"); ``clock`` (``utils.lab.PhaseClock``'s protocol)
    times its compute, by wrapping the stage's ``forward_one_chunk`` and
    ``backward_one_chunk``. The schedule's waits are not timed apart: they are
    the rest of the step.
    """

    def __init__(
        self,
        modules,
        index: int,
        n_groups: int,
        group,
        *,
        loss_fn,
        meter=None,
        clock=None,
    ):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        super().__init__()
        self.layers = nn.Sequential(*modules)
        self.is_first, self.is_last = index == 0, index == n_groups - 1
        device = next(self.layers.parameters()).device
        stage = PipelineStage(self.layers, index, n_groups, device, group=group)
        if clock is not None:
            for name, label in (
                ("forward_one_chunk", "forward"),
                ("backward_one_chunk", "backward"),
            ):
                setattr(stage, name, _timed(getattr(stage, name), clock, label))
        if meter is not None:
            for name, label in (
                ("get_fwd_send_ops", "send.fwd"),
                ("get_bwd_send_ops", "send.bwd"),
            ):
                setattr(stage, name, _counted(getattr(stage, name), meter, label))
        self.schedule = ScheduleGPipe(stage, 1, loss_fn=loss_fn)

    def run(self, x=None, target=None):
        """One step's forward and backward; returns the loss on the last group
        (``x`` is needed on the first, ``target`` on the last)."""
        losses: list = []
        args = (x,) if self.is_first else ()
        if self.is_last:
            self.schedule.step(*args, target=target, losses=losses)
            return losses[0]
        self.schedule.step(*args)
        return None


def _timed(fn, clock, name):
    def timed(*args, **kwargs):
        with clock(name):
            return fn(*args, **kwargs)

    return timed


def _counted(fn, meter, label):
    def counted(*args, **kwargs):
        ops = fn(*args, **kwargs)
        for op in ops:
            meter.count(label, _bytes(op.tensor))
        return ops

    return counted
