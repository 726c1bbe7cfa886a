"""Three axes on one model: tensor, pipeline and (ZeRO) data parallelism composed.

Chapter 7 ("DP x TP x PP, and planning a run"). The composition follows
torchtitan's shape (``torchtitan/models/llama3/infra/parallelize.py``: ``apply_tp``,
then the pipeline split, then ``apply_fsdp`` / data parallelism), each step a plain
function of the model and the ``ParallelMesh``, each the piece an earlier chapter
built:

1. :func:`apply_tp`: every rank builds the whole course GPT from the same seed and
   rewrites it for its tensor-parallel group (chapter 4's
   ``apply_tensor_parallel``: column- and row-parallel layers, the vocabulary-
   parallel embedding and head);
2. :func:`apply_pp`: the rewritten model is cut into ``p x v`` consecutive chunks
   (chapter 4's ``gpt_groups``) and the rank keeps the ``v`` its pipeline position
   holds (chapter 5's ``stages_of``); the other chunks are dropped. The pipeline
   of tp rank ``t`` sends its activations to tp rank ``t`` of the next stage: the
   activation between stages is whole (``b/m x s x h``) on every tp rank;
3. :func:`apply_dp`: the rank's parameters (its tp shards of its chunks) go to
   chapter 2's ZeRO optimizer over the data-parallel group. Stage 0 all-reduces
   the gradients once per step, stage 1 reduce-scatters them and all-gathers the
   updated parameters, stage 2 reduce-scatters each bucket from a backward hook.

Why ZeRO-2 and ZeRO-3 sit badly with a pipeline: the pipeline runs ``m`` backward
passes per step, so a gradient that must be sharded as soon as it exists (stage
2) is reduce-scattered ``m`` times per step instead of once, and parameters that
must be gathered before each use (stage 3) are gathered for every micro-batch.
DeepSpeed's pipeline engine refuses both ("ZeRO-2 and ZeRO-3 are incompatible
with pipeline parallelism", an assert in ``deepspeed/runtime/pipe/engine.py``);
Megatron-LM's distributed optimizer is stage 1. The lab runs stage 2 to measure
that cost (``labs/combined.py`` reports the dp bytes), and refuses stage 3.

Same layout of ranks as every chapter (``utils.dims``: tp fastest, then dp, then
pp), so a tp group is consecutive ranks (inside a node, Narayanan et al. 2021,
takeaway #1) and the pipeline's stages are the farthest apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from utils.comm import CommMeter
from utils.model_parallel.apply import apply_tensor_parallel
from utils.model_parallel.comm import all_gather_along
from utils.model_parallel.layer_split import gpt_groups, named_parameters
from utils.model_parallel.layers import vocab_parallel_cross_entropy
from utils.pipeline_parallel.schedules import stages_of
from utils.zero.optim import ReplicatedOptimizer, ShardedGradOptimizer, ShardedOptimizer

ZERO_STAGES = (0, 1, 2)
"""The ZeRO stages the data axis supports under a pipeline (see above)."""

OPTIMIZERS = {0: ReplicatedOptimizer, 1: ShardedOptimizer, 2: ShardedGradOptimizer}

Chunks = dict[int, list[tuple[str, nn.Module]]]
"""A rank's model chunks: stage index -> the (name prefix, module) it runs."""


def apply_tp(gpt: nn.Module, mesh, *, meter: CommMeter | None = None) -> nn.Module:
    """Chapter 4's tensor parallelism over the mesh's "tp" group (a no-op at tp 1).
    Afterwards the model's head returns this rank's vocabulary slice of the logits:
    take the loss with :func:`loss_fn`."""
    if mesh.dims.tp > 1:
        apply_tensor_parallel(gpt, mesh.group("tp"), meter=meter)
    return gpt


def apply_pp(gpt: nn.Module, mesh, *, virtual_stages: int = 1) -> Chunks:
    """The GPT cut into ``pp x virtual_stages`` chunks; this rank's ones, by stage
    index (``pp_rank``, ``pp_rank + pp``, ...). Refuses a tied GPT (its embedding
    and head sit on two stages)."""
    p = mesh.dims.pp
    chunks = gpt_groups(gpt, p * virtual_stages)
    return {s: chunks[s] for s in stages_of(mesh.coords["pp"], p, virtual_stages)}


def parameters_of(chunks: Chunks) -> dict[str, nn.Parameter]:
    """{name in the single-process GPT: parameter} of this rank's chunks."""
    return {k: t for pieces in chunks.values() for k, t in named_parameters(pieces)}


def loss_fn(mesh, *, meter: CommMeter | None = None) -> Callable:
    """The last stage's loss of one micro-batch: the mean cross-entropy, over the
    vocabulary-parallel logits with tp > 1 (two all-reduces of ``b s`` numbers,
    never the logits), plain ``F.cross_entropy`` at tp 1."""
    if mesh.dims.tp == 1:
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    group = mesh.group("tp")

    def tp_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, y, group, meter=meter)

    return tp_loss


def apply_dp(
    params,
    mesh,
    *,
    zero_stage: int,
    lr: float,
    meter: CommMeter | None = None,
    track=None,
) -> torch.optim.Optimizer:
    """Chapter 2's ZeRO optimizer (AdamW) for this rank's parameters over the
    mesh's "dp" group: one flat bucket, so a shard is ``ceil(n / dp)`` elements,
    as the planner's ZeRO formula counts. Gradients are averaged over the group
    (each rank's loss is the mean over its share of the global batch)."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"zero_stage must be one of {ZERO_STAGES} under a pipeline, got "
            f"{zero_stage!r} (stage 3 gathers every parameter for every "
            "micro-batch; run it in labs/zero.py)"
        )
    return OPTIMIZERS[zero_stage](
        list(params),
        torch.optim.AdamW,
        lr=lr,
        group=mesh.group("dp"),
        meter=meter,
        track=track,
    )


@torch.no_grad()
def full_parameters(params: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """This rank's parameters whole: tensor-parallel shards (``tensor_parallel_dim``)
    gathered over the tp group, the rest as they are; by single-process name.
    Every rank of the tp group must call it."""
    out = {}
    for name, p in params.items():
        dim = getattr(p, "tensor_parallel_dim", None)
        whole = p if dim is None else all_gather_along(p, dim, mesh.group("tp"))
        out[name] = whole.detach().clone()
    return out
