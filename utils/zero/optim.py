"""ZeRO stages 0, 1 and 2 from scratch: optimizers that shard their own state.

Introduced in chapter 2 ("ZeRO"); ``labs/zero.py`` is one client, the tests another.
Rajbhandari, Rasley, Ruwase and He, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models" (SC 2020, arXiv:1910.02054), section 5: with N data-parallel
ranks, P_os (stage 1) keeps on each rank the optimizer states of 1/N of the
parameters, P_os+g (stage 2) also only that 1/N of the gradients. Stage 3 (P_os+g+p)
is :class:`utils.zero.fsdp.FullyShardedModule`. Inside a rank, with no DDP wrapper::

    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    loss_fn(model(x_local), y_local).backward()
    opt.step()        # reduce-scatter grads, update my shard, all-gather params
    opt.zero_grad()

How it is laid out. The trainable parameters (each once: a tied parameter is one
tensor) are copied end to end into flat *buckets*, each padded with zeros until it
divides by N; the model's parameters become views into them. Rank r owns the r-th
1/N of every bucket: it holds the optimizer state (and, with ``master_dtype``, the
fp32 master weights) for that slice only, and the wrapped optimizer sees one tensor
per bucket, the slice. That is why the wrapped optimizer must be *elementwise*
(SGD, Adam, AdamW, Adagrad, RMSprop, ...): one that looks across a whole parameter
(LAMB's trust ratio, Adafactor's factored moments) would see only a slice of it.

The classes (each a ``torch.optim.Optimizer`` wrapping ``optimizer_cls``):

* :class:`FlatOptimizer`: the flat buckets and master weights, no communication
  (a single process, or stage 3's shards, whose gradients are already reduced);
* :class:`ReplicatedOptimizer`: stage 0, plain data parallelism: all-reduce the
  gradients, every rank updates everything (2 Psi (N-1)/N elements sent per step);
* :class:`ShardedOptimizer`: stage 1: reduce-scatter the gradients (each rank gets
  the sum of its slice), update the slice, all-gather the parameters: the same
  2 Psi (N-1)/N (section 7.2.1 of the paper: a reduce-scatter plus an all-gather
  is what an all-reduce costs);
* :class:`ShardedGradOptimizer`: stage 2: the same, but each bucket is
  reduce-scattered from a backward hook as soon as its gradients exist, and the
  full gradients are freed there; a rank keeps only its slice's gradients.

Mixed precision (``master_dtype=torch.float32`` on a bf16 model): parameters and
gradients are bf16 and communicated in bf16, the wrapped optimizer updates an fp32
master copy of this rank's slice, which is then rounded back into the bf16
parameters: the paper's 2 + 2 + 12 bytes per parameter. ``track(category,
tensor)`` (e.g. ``MemoryTracker.assign``) is told about every buffer made here.
Frozen parameters (``requires_grad=False``) are left alone: not flattened, not
sharded, never updated. Parameter groups (dicts) are supported. A trainable
parameter that got no gradient in a step is updated with a zero gradient (torch's
optimizers skip a ``None`` gradient instead: the two differ only where weight decay
or momentum moves a parameter whose gradient is zero).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from utils.comm import (
    CommMeter,
    all_gather,
    all_reduce,
    broadcast_from_first_rank,
    reduce_scatter,
)
from utils.flat import FlatBucket, FlatLayout, chunk_params, trainable_groups

__all__ = [
    "FlatLayout",
    "FlatOptimizer",
    "bucket_layouts",
    "ReplicatedOptimizer",
    "ShardedOptimizer",
    "ShardedGradOptimizer",
]


def bucket_layouts(params, bucket_numel: int | None, num_shards: int) -> list:
    """The :class:`FlatLayout` of each bucket :class:`FlatOptimizer` makes of
    ``params`` (one parameter group), in its order: consecutive runs of at most
    ``bucket_numel`` elements, in reverse registration order."""
    group = trainable_groups(params)[0]["params"]
    return [
        FlatLayout((p.numel() for p in chunk), num_shards)
        for chunk in chunk_params(reversed(group), bucket_numel)
    ]


class FlatOptimizer(torch.optim.Optimizer):
    """``optimizer_cls`` run on flat buckets of the parameters; no communication.

    ``master_dtype``: keep an fp32 (say) master copy that the wrapped optimizer
    updates, for 16-bit parameters. ``bucket_numel``: the most elements per bucket
    (None: one bucket per dtype and parameter group). Buckets follow the reverse
    registration order, roughly the order in which backward produces gradients.
    """

    def __init__(
        self,
        params,
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        master_dtype: torch.dtype | None = None,
        bucket_numel: int | None = None,
        group=None,
        meter: CommMeter | None = None,
        track: Callable[[str, torch.Tensor], object] | None = None,
        **kwargs,
    ):
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1 or None, got {bucket_numel}")
        self.group, self.meter = group, meter
        self._track = track or (lambda category, tensor: None)
        self.master_dtype = master_dtype
        num_shards, index = self._shards()
        self.buckets: list[FlatBucket] = []
        inner_groups = []
        for g in trainable_groups(params):
            mine = []
            for chunk in chunk_params(reversed(g.pop("params")), bucket_numel):
                bucket = FlatBucket(chunk, num_shards, index, master_dtype, self._track)
                self._init_bucket(bucket)
                self.buckets.append(bucket)
                mine.append(bucket.master)
            if mine:
                inner_groups.append({**g, "params": mine})
        if not inner_groups:
            raise ValueError("no parameter requires grad: nothing to optimize")
        self.optim = optimizer_cls(inner_groups, **kwargs)
        super().__init__([b.master for b in self.buckets], self.optim.defaults)
        # One set of groups and state, the wrapped optimizer's: LR schedulers that
        # edit param_groups and state_dict() (this rank's slice) both see it.
        self.param_groups = self.optim.param_groups
        self.state = self.optim.state

    # -- what the stages change ---------------------------------------------------
    def _shards(self) -> tuple[int, int]:
        """(number of shards, the one this rank owns)."""
        return 1, 0

    def _init_bucket(self, b: FlatBucket) -> None:
        b.grad = torch.zeros_like(b.flat)
        b.link_grads()
        b.grad_shard = b.grad[: b.layout.shard_numel]

    def _reduce(self, b: FlatBucket) -> None:
        """Turn this rank's gradients into the gradient of its slice."""

    def _publish(self, b: FlatBucket) -> None:
        """After the update: every rank gets the new parameters."""

    # -- the step ---------------------------------------------------------------------
    @property
    def padding_bytes(self) -> int:
        """Bytes of zero padding in this rank's parameter buckets."""
        return sum(b.layout.padding * b.flat.element_size() for b in self.buckets)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for b in self.buckets:
            if b.grad is not None:
                b.link_grads()  # in case someone set a .grad to None or replaced it
            self._reduce(b)
        for b in self.buckets:
            g = b.grad_shard
            b.master.grad = g if g.dtype == b.master.dtype else g.to(b.master.dtype)
        self.optim.step()
        for b in self.buckets:
            if b.master is not b.shard:
                b.shard.copy_(b.master)  # round the fp32 master into the 16-bit params
                b.master.grad = None  # the fp32 copy of the gradient was workspace
            self._publish(b)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's slice of the state (what ``state_dict()`` saved here)."""
        self.optim.load_state_dict(state_dict)
        self.param_groups, self.state = self.optim.param_groups, self.optim.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients in place (they stay views: no reallocation)."""
        for b in self.buckets:
            if b.grad is not None:
                b.grad.zero_()
                b.link_grads()
            elif b.grad_shard is not None:
                b.grad_shard.zero_()
            b.reduced = False


# [replicated-start]
class ReplicatedOptimizer(FlatOptimizer):
    """Stage 0 (plain data parallelism): all-reduce the gradients, update everything."""

    def __init__(self, params, optimizer_cls, **kwargs):
        super().__init__(params, optimizer_cls, **kwargs)
        # start from rank 0's weights (not counted per step)
        broadcast_from_first_rank([b.flat for b in self.buckets], group=self.group)
        for b in self.buckets:
            if b.master is not b.shard:
                b.master.copy_(b.shard)

    def _reduce(self, b: FlatBucket) -> None:
        all_reduce(b.grad, meter=self.meter, group=self.group)
        b.grad.div_(dist.get_world_size(self.group))


# [replicated-end]


# [sharded-start]
class ShardedOptimizer(ReplicatedOptimizer):
    """ZeRO stage 1 (P_os): optimizer state and master weights of my 1/N only."""

    def _shards(self) -> tuple[int, int]:
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def _init_bucket(self, b: FlatBucket) -> None:
        super()._init_bucket(b)
        start, end = b.layout.shard(dist.get_rank(self.group))
        b.grad_shard = b.grad[start:end]  # my slice of the full gradient buffer

    def _reduce(self, b: FlatBucket) -> None:
        # Rank r receives the sum over ranks of slice r only: (N-1)/N of the bucket.
        mine = torch.empty_like(b.grad_shard)
        self._track("other", mine)
        reduce_scatter(mine, b.grad, meter=self.meter, group=self.group)
        b.grad_shard.copy_(mine).div_(dist.get_world_size(self.group))

    def _publish(self, b: FlatBucket) -> None:
        # Every rank contributes its updated slice: (N-1)/N of the bucket again.
        mine = b.shard.clone()
        self._track("other", mine)
        all_gather(b.flat, mine, meter=self.meter, group=self.group)


# [sharded-end]


# [sharded-grad-start]
class ShardedGradOptimizer(ShardedOptimizer):
    """ZeRO stage 2 (P_os+g): also keep only my 1/N of the gradients.

    A hook on each parameter fires once backward has accumulated its gradient. It
    adds that gradient into its bucket's flat buffer (made at the bucket's first
    gradient) and frees it; when the bucket is complete, the buffer is
    reduce-scattered into my slice and freed. So the full gradients alive at once
    are one bucket's buffer plus what the backward operation just run produced (a
    linear layer's weight and bias gradients come out of one operation); a second
    buffer exists only while a bucket waits for a gradient that arrives after the
    next bucket's first. (Copying a bucket only once all its gradients exist, into
    a buffer made then, would hold two buckets' worth: the gradients and the copy.)
    ``on_event(event, bucket, phase)`` is called after each copy, before the
    gradient is freed ("grad"), and after each reduce-scatter ("reduce-scatter").
    """

    def __init__(self, params, optimizer_cls, *, on_event=None, **kwargs):
        self._on_event = on_event or (lambda event, bucket, phase: None)
        self._full: dict[int, torch.Tensor] = {}  # bucket index -> flat gradients
        super().__init__(params, optimizer_cls, **kwargs)

    def _init_bucket(self, b: FlatBucket) -> None:
        b.grad_shard = torch.zeros(
            b.layout.shard_numel, dtype=b.flat.dtype, device=b.flat.device
        )
        self._track("grads", b.grad_shard)
        index = len(self.buckets)  # this bucket's place in self.buckets
        for p, span in zip(b.params, b.layout.spans()):
            hook = partial(self._on_grad, b, index, span)
            p.register_post_accumulate_grad_hook(hook)

    @torch.no_grad()
    def _on_grad(self, b: FlatBucket, index: int, span, p: torch.Tensor) -> None:
        full = self._full.get(index)
        if full is None:  # the bucket's first gradient: make its flat buffer
            full = self._full[index] = torch.zeros_like(b.flat)
            self._track("grads", full)  # full gradients, flattened
        full[span[0] : span[1]].add_(p.grad.reshape(-1))  # add: micro-batches
        self._on_event("grad", f"bucket {index}", "backward")
        p.grad = None  # autograd's copy is freed at once
        b.ready += 1
        if b.ready == len(b.params):
            self._reduce_bucket(b, index)

    @torch.no_grad()
    def _reduce_bucket(self, b: FlatBucket, index: int) -> None:
        full = self._full.pop(index, None)
        if full is None:  # no gradient came at all
            full = torch.zeros_like(b.flat)
        for p, (start, end) in zip(b.params, b.layout.spans()):
            if p.grad is not None:  # only when called from step(): a late gradient
                full[start:end].add_(p.grad.reshape(-1))
                p.grad = None
        mine = torch.empty_like(b.grad_shard)
        self._track("other", mine)
        reduce_scatter(mine, full, meter=self.meter, group=self.group)
        del full  # the bucket's full gradients are gone
        b.grad_shard.add_(mine.div_(dist.get_world_size(self.group)))
        b.ready, b.reduced = 0, True
        self._on_event("reduce-scatter", f"bucket {index}", "backward")

    def _reduce(self, b: FlatBucket) -> None:
        if not b.reduced:  # some gradient never came (an unused parameter)
            self._reduce_bucket(b, self.buckets.index(b))
        b.reduced = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._full.clear()  # a backward that stopped half way leaves nothing behind
        for b in self.buckets:
            b.ready = 0


# [sharded-grad-end]
