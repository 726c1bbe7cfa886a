"""Data parallelism from scratch: two DDP wrappers that work on any ``nn.Module``.

Introduced in chapter 1 ("Data parallelism"); ``labs/data_parallel.py`` is one client.
Every rank holds a full replica, runs forward and backward on its share of the batch,
and the wrapper averages the gradients over the ranks before the optimizer step::

    model = BucketedDDP(MyModel(), bucket_mb=25)        # inside a rank
    opt = torch.optim.AdamW(model.parameters())
    loss_fn(model(x_local), y_local).backward()
    model.finish_gradient_synchronization()             # gradients are now averages
    opt.step()
    opt.zero_grad()

- ``NaiveDDP``: after backward, all-reduce every gradient, one by one, and divide by
  the world size. Communication starts only once the whole backward is done.
- ``BucketedDDP``: the bucketing of Li et al., "PyTorch Distributed: Experiences on
  Accelerating Data Parallel Training" (VLDB 2020). Parameters are packed, in reverse
  registration order (roughly the order backward produces their gradients), into
  flat buckets of ``bucket_mb`` MiB. A ``register_post_accumulate_grad_hook`` copies
  each gradient into its bucket; a full bucket starts an asynchronous all-reduce at
  once, so communication overlaps the rest of backward. Buckets are launched in
  index order on every rank, so all ranks issue the same collectives in the same
  order even when a parameter gets no gradient on some rank. Gradients then live as
  views into the buckets, as DDP's ``gradient_as_bucket_view=True`` makes them: no
  extra copy in memory. DDP's default is ``False`` (``torch/nn/parallel/
  distributed.py``): there the gradients and the buckets are two copies.

Both broadcast rank 0's parameters and buffers at construction, skip parameters that
do not require grad, count a tied (shared) parameter once, and offer two switches for
gradient accumulation (below). A parameter that gets no gradient on a rank
contributes zeros; with ``find_unused_parameters=True`` (as in DDP) one extra small
all-reduce of a "used" map also keeps the gradient of a parameter that no rank used at
``None``, so an optimizer skips it exactly as a single process would (a parameter
counts as used if any micro-batch of the step gave it a gradient: DDP's
``Reducer::autograd_hook``, torch/csrc/distributed/c10d/reducer.cpp, "as long as it
is used once during no_sync session, it is marked as used"). ``allreduce="ring"`` uses
``utils.comm.ring_all_reduce`` (run on a helper thread by ``BucketedDDP`` so it still
overlaps backward). Buffers are broadcast once, not every step (models with
BatchNorm running statistics drift apart per rank; DDP re-broadcasts them).

Every collective is recorded: bytes in ``meter`` (a ``utils.comm.CommMeter``) and a
``{"kind": "comm", "name", "start", "end"}`` interval (``time.perf_counter``) in
``comm_events``, so a lab can plot compute and communication from measured times.

Gradient accumulation: which backwards synchronise. Only the last backward of a step
should all-reduce (the sum of the micro-batches' gradients, once); the earlier ones
add into ``p.grad`` locally. Two switches say which, and a backward synchronises only
if both allow it (each can only turn synchronisation off; both are on by default):

- ``no_sync()``, decided at FORWARD time, as in torch's DDP (``no_sync`` sets
  ``require_backward_grad_sync``, read when a grad-enabled forward runs
  ``reducer.prepare_for_backward``; torch/nn/parallel/distributed.py). A forward
  inside the context records "do not sync"; the backward after it reads the record
  of the latest grad-enabled forward. That expresses ``F0 B0 F1 B1 F2 B2`` with
  ``F0 B0``, ``F1 B1`` inside ``no_sync()``, but not a pipeline schedule: in
  ``F0 F1 B0 F2 B1 B2`` (1F1B) or ``F0 F1 F2 B0 B1 B2`` the last forward runs
  before earlier backwards, which then read its "sync" record. ``BucketedDDP``
  refuses the resulting second synchronised backward ("a second gradient").
- ``set_requires_gradient_sync(requires)``, read at BACKWARD time, in the gradient
  hooks: FSDP2's method of that name (torch/distributed/fsdp/_fully_shard/
  _fully_shard.py sets ``reduce_grads``, which ``FSDPParamGroup.post_backward`` reads)
  and what picotron's pipeline schedules do with DP's flag just before each backward
  (huggingface/picotron, picotron/pipeline_parallel/pipeline_parallel.py,
  ``model.require_backward_grad_sync = is_last_iteration``). The value persists
  until changed. A pipeline step is then::

      for op, k in schedule:                       # e.g. F0 F1 B0 F2 B1 B2
          if op == "F":
              losses[k] = loss_fn(model(x[k]), y[k]) / len(x)
          else:
              model.set_requires_gradient_sync(k == last_backward)
              losses[k].backward()
      model.finish_gradient_synchronization()

``finish_gradient_synchronization()`` follows the decision of the last backward
(recorded by its gradient hooks), not the switches' values when it is called, so
the flag may already be reset for the next step. After a synchronised backward,
``BucketedDDP`` refuses another backward until ``finish_gradient_synchronization()``:
its gradient would land in buckets already being all-reduced.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from utils.comm import (
    CommMeter,
    all_reduce,
    broadcast_from_first_rank,
    nbytes,
    ring_all_reduce,
)

ALLREDUCE = ("builtin", "ring")


def _unique_trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that require grad, each once (tied ones too), in reverse order."""
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(reversed(seen.values()))


class _DataParallel(nn.Module):
    """What both wrappers share: replication, the two sync switches, the used map,
    the records, and a post-accumulate gradient hook on every trainable parameter
    (``_on_grad_ready``), which is where the backward-time decision is read."""

    def __init__(
        self,
        module: nn.Module,
        *,
        allreduce: str = "builtin",
        find_unused_parameters: bool = False,
        group=None,
        meter: CommMeter | None = None,
    ):
        super().__init__()
        if allreduce not in ALLREDUCE:
            raise ValueError(f"allreduce must be one of {ALLREDUCE}, got {allreduce!r}")
        if not dist.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} runs inside a rank: initialise the process "
                "group first (utils.launch.launch does it for you)"
            )
        self.module = module
        self.allreduce = allreduce
        self.find_unused_parameters = find_unused_parameters
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.meter = meter if meter is not None else CommMeter()
        self.comm_events: list[dict] = []
        self.require_sync = True  # no_sync()'s switch, read by forward
        self._sync_this_backward = True  # the latest grad-enabled forward's record
        self._requires_gradient_sync = True  # set_requires_gradient_sync's switch
        self._last_backward_sync: bool | None = None  # since the last finish
        self._params = _unique_trainable(module)
        self._broadcast_from_rank0()
        # Post-accumulate: p.grad already holds the sum over this step's backwards.
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
            for p in self._params
        ]

    @torch.no_grad()
    def _broadcast_from_rank0(self) -> None:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        broadcast_from_first_rank(tensors, group=self.group)

    def forward(self, *args, **kwargs):
        # As in DDP, no_sync() is recorded at forward time, and only by a forward
        # that builds a graph (DDP: ``torch.is_grad_enabled() and
        # self.require_backward_grad_sync``), so an evaluation forward under
        # torch.no_grad() does not change what the pending backward does.
        if torch.is_grad_enabled():
            self._sync_this_backward = self.require_sync
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Forward and backward inside accumulate gradients locally, unsynchronised.

        DDP's semantics: the decision is taken by the forward, so the backward of a
        forward run inside the context does not synchronise. For schedules that
        interleave forwards and backwards use ``set_requires_gradient_sync``.
        """
        old, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = old

    def set_requires_gradient_sync(self, requires: bool) -> None:
        """Whether the backwards that run from now on synchronise their gradients.

        FSDP2's ``FSDPModule.set_requires_gradient_sync``: read when the gradient
        hooks fire, i.e. at backward time, so a pipeline schedule (``F0 F1 B0 F2 B1
        B2``) sets it to ``k == last`` just before backward ``k``, as picotron's
        1F1B does with DP's flag (picotron/pipeline_parallel/pipeline_parallel.py).
        It persists until changed. A backward synchronises only if this is True
        and its forward was not inside ``no_sync()``.
        """
        if not isinstance(requires, bool):
            raise TypeError(f"requires must be a bool, got {requires!r}")
        self._requires_gradient_sync = requires

    def _backward_syncs(self) -> bool:
        """In a gradient hook: does this backward synchronise? Records the answer."""
        sync = self._sync_this_backward and self._requires_gradient_sync
        self._last_backward_sync = sync
        return sync

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        self._backward_syncs()

    def _last_backward_synced(self) -> bool:
        """For finish: the decision of the last backward, then forget it.

        The last hook to fire recorded it. If none fired since the last finish, the
        switches as they are now decide (every rank must reach the same answer, so
        every rank's last backward should reach a trainable parameter).
        """
        sync, self._last_backward_sync = self._last_backward_sync, None
        if sync is None:
            sync = self._sync_this_backward and self._requires_gradient_sync
        return sync

    def _used_everywhere(self, used_here: list[bool]) -> list[bool]:
        """Which parameters some rank used: DDP's ``local_used_map`` all-reduce."""
        flags = torch.tensor(used_here, dtype=torch.int32, device=self._device())
        dist.all_reduce(flags, group=self.group)
        self.meter.add("all_reduce", nbytes(flags), self.group, label="used_map")
        return [bool(f) for f in flags.tolist()]

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _record(self, name: str, start: float, end: float | None = None) -> dict:
        event = {"kind": "comm", "name": name, "start": start}
        if end is not None:
            event["end"] = end
        self.comm_events.append(event)
        return event

    def _reduce_now(self, tensor: torch.Tensor, name: str) -> None:
        """Sum ``tensor`` over the ranks, blocking, and record the interval."""
        start = time.perf_counter()
        if self.allreduce == "ring":
            ring_all_reduce(tensor, meter=self.meter, group=self.group)
        else:
            all_reduce(tensor, meter=self.meter, group=self.group)
        self._record(name, start, time.perf_counter())


# [naive-start]
class NaiveDDP(_DataParallel):
    """All-reduce each gradient after backward, then divide by the world size."""

    def finish_gradient_synchronization(self) -> None:
        """Average the gradients over the ranks; call after backward, before step."""
        if not self._last_backward_synced():
            return  # no_sync / set_requires_gradient_sync(False): keep accumulating
        used = [p.grad is not None for p in self._params]
        if self.find_unused_parameters:
            used = self._used_everywhere(used)
        for i, p in enumerate(self._params):
            if self.find_unused_parameters and not used[i]:
                continue  # no rank produced a gradient: leave it None, as DDP does
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # this rank's contribution is zero
            self._reduce_now(p.grad, f"param {i}")
            p.grad.div_(self.world_size)


# [naive-end]


class _Bucket:
    """A flat buffer holding the gradients of a few parameters, back to back."""

    def __init__(self, index: int, params: list[nn.Parameter]):
        self.index = index
        self.params = params
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += p.numel()
        self.numel = total
        self.buffer: torch.Tensor | None = None  # allocated at the first gradient
        self.ready: set[int] = set()  # ids of params whose gradient is in the buffer
        self.handle = None  # the in-flight all-reduce
        self.event: dict = {}  # its recorded interval

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        if self.buffer is None:
            self.buffer = torch.zeros(self.numel, dtype=p.dtype, device=p.device)
        return self.buffer[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)


def _same_storage(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape


class BucketedDDP(_DataParallel):
    """Gradients fill fixed-size buckets; a full bucket is all-reduced asynchronously.

    Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
    Training" (VLDB 2020), section 3.2: bucketing and overlapping with backward.
    """

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, **kwargs):
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        super().__init__(module, **kwargs)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))  # MiB, as DDP's cap
        self.buckets = self._make_buckets()
        self._slot = {
            id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)
        }
        self._next = 0  # buckets launch in index order on every rank
        self._filed = False  # a synchronised backward has filed gradients
        self._pool = ThreadPoolExecutor(1) if self.allreduce == "ring" else None

    def _make_buckets(self) -> list[_Bucket]:
        buckets, current, size = [], [], 0
        for p in self._params:  # reverse registration order ~ gradient order
            mixed = current and (p.dtype, p.device) != (
                current[0].dtype,
                current[0].device,
            )
            if current and (size + nbytes(p) > self.bucket_bytes or mixed):
                buckets.append(_Bucket(len(buckets), current))
                current, size = [], 0
            current.append(p)
            size += nbytes(p)
        if current:
            buckets.append(_Bucket(len(buckets), current))
        return buckets

    # [bucket-hook-start]
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Runs when p.grad is final for this backward: file it, launch full buckets.

        It fires after autograd has added this backward's gradient into p.grad, so
        in the synchronised backward p.grad is the sum over the step's micro-batches.
        """
        if not self._backward_syncs():  # decided now, at backward time
            if self._filed:
                raise RuntimeError(
                    "a backward without gradient synchronisation ran after a "
                    "synchronised one, before finish_gradient_synchronization(): "
                    "synchronise only the last backward of a step"
                )
            return  # accumulate locally: p.grad already holds the running sum
        bucket, i = self._slot[id(p)]
        if id(p) in bucket.ready:
            raise RuntimeError(
                "a parameter got a second gradient before "
                "finish_gradient_synchronization(); accumulate inside no_sync(), "
                "or, when forwards and backwards interleave (pipeline schedules), "
                "with set_requires_gradient_sync(False) before the earlier backwards"
            )
        view = bucket.view(i)
        if not _same_storage(p.grad, view):
            view.copy_(p.grad)
            p.grad = view  # the gradient now lives in the bucket
        bucket.ready.add(id(p))
        self._filed = True
        while (  # launch every full bucket whose predecessors are launched
            self._next < len(self.buckets)
            and len(self.buckets[self._next].ready)
            == len(self.buckets[self._next].params)
        ):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        event = self._record(f"bucket {bucket.index}", time.perf_counter())
        bucket.event = event
        if self._pool is not None:  # the ring is blocking: run it on a helper thread
            bucket.handle = self._pool.submit(self._ring, bucket.buffer, event)
            return
        work = all_reduce(
            bucket.buffer, meter=self.meter, group=self.group, async_op=True
        )
        work.get_future().add_done_callback(
            lambda _, e=event: e.setdefault("end", time.perf_counter())
        )
        bucket.handle = work

    # [bucket-hook-end]

    def _ring(self, buffer: torch.Tensor, event: dict) -> None:
        ring_all_reduce(buffer, meter=self.meter, group=self.group)
        event.setdefault("end", time.perf_counter())

    # [bucket-finish-start]
    def finish_gradient_synchronization(self) -> None:
        """Launch what backward did not, wait for every bucket, average, expose."""
        if not self._last_backward_synced():
            return  # no_sync / set_requires_gradient_sync(False): keep accumulating
        # Used: a gradient from this backward, or from an unsynchronised one before.
        used_here = [
            id(p) in self._slot[id(p)][0].ready or p.grad is not None
            for p in self._params
        ]
        for bucket in self.buckets[self._next :]:  # params that got no gradient
            for i, p in enumerate(bucket.params):
                if id(p) not in bucket.ready:
                    view = bucket.view(i)
                    if p.grad is None:
                        view.zero_()  # this rank contributes nothing
                    elif not _same_storage(p.grad, view):
                        view.copy_(p.grad)
            self._launch(bucket)
        for bucket in self.buckets:
            if self._pool is not None:
                bucket.handle.result()
            else:
                bucket.handle.wait()
            bucket.event.setdefault("end", time.perf_counter())
            bucket.buffer.div_(self.world_size)
        used = used_here
        if self.find_unused_parameters:
            used = self._used_everywhere(used_here)
        for p, was_used in zip(self._params, used):
            bucket, i = self._slot[id(p)]
            if was_used or not self.find_unused_parameters:
                p.grad = bucket.view(i)
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle = None
        self._next = 0
        self._filed = False

    # [bucket-finish-end]
