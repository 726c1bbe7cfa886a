"""ZeRO-Offload from scratch: the optimizer's states and step on the host.

Introduced in chapter 3 ("CPU offloading"); ``labs/offload.py`` is one client, the
tests another. Ren, Rajbhandari, Aminabadi, Ruwase, Yang, Zhang, Li and He,
"ZeRO-Offload: Democratizing Billion-Scale Model Training" (USENIX ATC 2021,
arXiv:2101.06840). Section 3 finds the one split of a mixed-precision Adam step
between GPU and CPU that keeps the CPU's work at O(parameters) (forward and
backward stay on the GPU), moves the least data (section 3.3: 4 bytes per parameter
per step, the 16-bit gradients down and the 16-bit parameters up) and saves the most
GPU memory: the 16-bit parameters (2 of the 16 bytes) stay on the GPU; the 16-bit
gradients, the fp32 master weights, momentum and variance (14 bytes) go to the
CPU, which runs the update. Section 4.2: on N GPUs it sits on ZeRO-2, each rank
offloading only its 1/N of the gradients and optimizer states. Inside a rank::

    opt = OffloadOptimizer(model.parameters(), HostAdamW, lr=1e-3,
                           master_dtype=torch.float32, transfers=Transfers(device))
    loss_fn(model(x_local), y_local).backward()   # buckets reduce-scattered, my
                                                  # slice of each copied down
    opt.step()         # host update, 16-bit slice up, all-gather on the device
    opt.zero_grad()

The layout is the course's ZeRO-2 (``utils.zero.optim.ShardedGradOptimizer``): the
trainable parameters in flat buckets, padded to divide by N, the parameters views
into them, reduce-scattered bucket by bucket from a hook as backward produces the
gradients. What changes is where this rank's slice lives:

* ``offload_grads=True`` ("optimizer+grads", the paper's design): as soon as a
  bucket is reduced, this rank's slice of its gradient is copied to a host buffer
  (the paper's 16-bit gradients on the CPU, sent as backward produces them, so
  the copies overlap the rest of backward: section 4.1) and the device keeps none;
* ``offload_grads=False`` ("optimizer"): the slice stays on the device until the
  step, which copies it down first;
* in both, the fp32 master weights and the wrapped optimizer's states exist only
  on the host; the step runs there (on ``optimizer_cls``, any elementwise torch
  optimizer; :class:`utils.offload.adam.HostAdamW` is the vectorised one), the
  host rounds the masters to 16 bits (the paper's float2half, on the CPU) and
  copies them up into this rank's slice, and an all-gather on the device gives every
  rank every slice.

Bytes per rank per step, counted by ``transfers``: e * ceil(Psi / N) down and the
same up (e = 2 in mixed precision, 4 in fp32, plus the buckets' padding), Psi for
the parameters. In fp32 the host also needs a master copy (4 bytes), so fp32
offload holds 4 + 12 (+ 4 grads) bytes on the host per parameter of the slice.

``delayed_update=True``: the one-step delayed parameter update (section 5.2,
"DPU"): the host step for the gradients of step i runs in a background thread
while the device computes forward and backward of step i + 1 with the parameters of
step i - 1; ``step()`` first waits for the previous update and publishes it, then
starts the next. The parameters therefore trail by one step; :meth:`finish` waits
for and applies the last update. The paper turns it on only after some warm-up
steps, once the gradients change slowly; ``warmup_steps`` does that here.

What the thread may touch. While it runs, the calling thread goes on with forward
and backward, and whoever watches the optimizer (the memory ledger, at every
``mark``) reads the masters, their ``.grad`` and the wrapped optimizer's state.
When the thread set and freed the masters' ``.grad`` itself (``master.grad =
None``, dropping the fp32 gradient the ledger tracks), a rank died by SIGSEGV in 3
of 50 delayed runs, its main thread inside the ledger's ``mark`` reading a master's
``.grad`` (the stack Python's ``faulthandler`` printed). Changed as below, 0 of 50
runs crashed (each run: ``python -m labs.offload --world-size 2 --offload
optimizer+grads --delayed-update --steps 8``, fp32 and mixed, on 2 cores).

So the thread writes tensor data only (the masters and the states, in place, and its
own 16-bit copies): the calling thread sets the masters' fp32 ``.grad`` before
starting it and drops them after joining it (so they live while the update that
reads them is in flight), and the first host update, which creates the wrapped
optimizer's state (new dict entries and tensors), runs in the calling thread; it is
still published one step late, so the arithmetic is the same. A wrapped optimizer
must, after its first step, only update its state in place (torch's elementwise
optimizers do).

``track(category, tensor, pool=...)`` (``MemoryTracker.assign``) is told about
every buffer made here, with ``pool="host"`` for the host ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from utils.comm import CommMeter, all_gather, broadcast_from_first_rank, reduce_scatter
from utils.flat import FlatLayout, chunk_params, trainable_groups
from utils.memory import placement
from utils.offload.adam import HostAdamW
from utils.offload.transfer import Transfers

__all__ = ["OffloadOptimizer"]


class _Bucket:
    """A run of parameters in one padded flat device buffer; my slice on the host."""

    def __init__(self, params, num_shards: int, rank: int):
        self.params = params
        self.layout = FlatLayout((p.numel() for p in params), num_shards)
        p0 = params[0]
        self.flat = torch.zeros(self.layout.padded, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, (a, b) in zip(params, self.layout.spans()):
                self.flat[a:b].copy_(p.detach().reshape(-1))
                p.data = self.flat[a:b].view_as(p)  # the model now reads the bucket
        self.start, self.end = self.layout.shard(rank)
        self.shard = self.flat[self.start : self.end]  # my slice, on the device
        self.master: torch.Tensor | None = None  # fp32 copy of my slice, on the host
        self.host_grad: torch.Tensor | None = None  # my slice's gradient, host
        self.grad_shard: torch.Tensor | None = None  # ... or on the device
        self.full: torch.Tensor | None = None  # the bucket's gradients, in backward
        self.has_grad = False  # my slice holds a gradient since zero_grad
        self.ready = 0
        self.reduced = False
        self.staged: torch.Tensor | None = None  # delayed: the update, 16-bit


class OffloadOptimizer(torch.optim.Optimizer):
    """ZeRO-Offload over ZeRO-2: states and step on the host; see the module."""

    def __init__(
        self,
        params,
        optimizer_cls: type[torch.optim.Optimizer] = HostAdamW,
        *,
        offload_grads: bool = True,
        master_dtype: torch.dtype = torch.float32,
        bucket_numel: int | None = None,
        delayed_update: bool = False,
        warmup_steps: int = 0,
        group=None,
        meter: CommMeter | None = None,
        transfers: Transfers | None = None,
        track: Callable[..., object] | None = None,
        on_event: Callable[[str, str, str], object] | None = None,
        **kwargs,
    ):
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1 or None, got {bucket_numel}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not dist.is_initialized():
            raise RuntimeError("OffloadOptimizer runs inside a rank: init the group")
        self.group, self.meter = group, meter
        self.offload_grads, self.master_dtype = offload_grads, master_dtype
        self.delayed_update, self.warmup_steps = delayed_update, warmup_steps
        self._track = track or (lambda category, tensor, pool=None: None)
        self._on_event = on_event or (lambda event, bucket, phase: None)
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        groups = trainable_groups(params)
        device = next(p.device for g in groups for p in g["params"])
        self.transfers = transfers or Transfers(device)
        self.buckets: list[_Bucket] = []
        inner_groups = []
        for g in groups:
            mine = []
            for chunk in chunk_params(reversed(g.pop("params")), bucket_numel):
                b = _Bucket(chunk, self.world_size, self.rank)
                self._init_bucket(b, len(self.buckets))
                self.buckets.append(b)
                mine.append(b.master)
            if mine:
                inner_groups.append({**g, "params": mine})
        if not inner_groups:
            raise ValueError("no parameter requires grad: nothing to optimize")
        with placement("host"):
            self.optim = optimizer_cls(inner_groups, **kwargs)
        self._track("optimizer", lambda: list(self.optim.state.values()), pool="host")
        super().__init__([b.master for b in self.buckets], self.optim.defaults)
        self.param_groups, self.state = self.optim.param_groups, self.optim.state
        self._steps = 0
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._host_updates = 0  # host updates so far (the first is not threaded)
        self.host_step_seconds = 0.0
        """Measured seconds of the last host update (in the worker when delayed)."""

    # -- construction -----------------------------------------------------------------
    def _init_bucket(self, b: _Bucket, index: int) -> None:
        broadcast_from_first_rank([b.flat], group=self.group)  # rank 0's weights
        # The fp32 master of my slice lives on the host only: copied down once.
        down = self.transfers.to_host(b.shard)
        self.transfers.synchronize()
        with placement("host"):
            b.master = (
                down if down.dtype == self.master_dtype else down.to(self.master_dtype)
            )
        self._track("optimizer", b.master, pool="host")
        numel = b.layout.shard_numel
        if self.offload_grads:
            b.host_grad = self.transfers.host_zeros(numel, b.flat.dtype)
            self._track("grads", b.host_grad, pool="host")
        else:
            b.grad_shard = torch.zeros(numel, dtype=b.flat.dtype, device=b.flat.device)
            self._track("grads", b.grad_shard)
        for p, span in zip(b.params, b.layout.spans()):
            p.register_post_accumulate_grad_hook(partial(self._on_grad, b, index, span))

    @property
    def padding_bytes(self) -> int:
        """Bytes of zero padding in this rank's flat parameter buckets."""
        return sum(b.layout.padding * b.flat.element_size() for b in self.buckets)

    # [offload-grads-start]
    # -- backward: reduce each bucket as it completes, my slice down to the host -----
    @torch.no_grad()
    def _on_grad(self, b: _Bucket, index: int, span, p: torch.Tensor) -> None:
        if b.full is None:  # the bucket's first gradient: its flat buffer
            b.full = torch.zeros_like(b.flat)
            self._track("grads", b.full)  # full gradients, flattened, on the device
        b.full[span[0] : span[1]].add_(p.grad.reshape(-1))
        p.grad = None  # autograd's copy is freed at once
        b.ready += 1
        if b.ready == len(b.params):
            self._reduce_bucket(b, index)

    @torch.no_grad()
    def _reduce_bucket(self, b: _Bucket, index: int) -> None:
        full, b.full = b.full, None
        if full is None:  # no gradient came at all
            full = torch.zeros_like(b.flat)
        for p, (start, end) in zip(b.params, b.layout.spans()):
            if p.grad is not None:  # only when called from step(): a late gradient
                full[start:end].add_(p.grad.reshape(-1))
                p.grad = None
        mine = torch.empty(b.layout.shard_numel, dtype=full.dtype, device=full.device)
        self._track("other", mine)
        reduce_scatter(mine, full, meter=self.meter, group=self.group)
        del full  # the bucket's full gradients are gone
        mine.div_(self.world_size)
        if not self.offload_grads:
            b.grad_shard.add_(mine)  # stays on the device until the step
        elif not b.has_grad:
            self.transfers.to_host(mine, out=b.host_grad)  # 16-bit grads down
        else:  # accumulating micro-batches: add on the host
            self.transfers.synchronize()
            b.host_grad.add_(self.transfers.to_host(mine))
        b.has_grad, b.ready, b.reduced = True, 0, True
        self._on_event("reduce-scatter", f"bucket {index}", "backward")

    # [offload-grads-end]

    # [offload-step-start]
    # -- the step: down (optimizer only), update on the host, up, all-gather ----------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, b in enumerate(self.buckets):
            if not b.reduced:  # some gradient never came (an unused parameter)
                self._reduce_bucket(b, i)
            b.reduced = False
        if not self.offload_grads:  # the gradient slice comes down only now
            for b in self.buckets:
                b.host_grad = self.transfers.to_host(b.grad_shard)
        self.transfers.synchronize()  # every gradient copy has landed
        self._steps += 1
        delay = self.delayed_update and self._steps > self.warmup_steps
        self._publish_pending()  # the update of the last step, computed meanwhile
        self._set_master_grads()
        if delay and self._host_updates:  # in a thread: touches tensor data only
            self._worker = threading.Thread(
                target=self._host_step, kwargs=dict(in_thread=True), daemon=True
            )
            self._worker.start()
        else:  # here; the first update creates the state (read by the ledger)
            self._host_step()
            self._join_update()  # raises what the update raised
            if not delay:
                self._publish_pending()
        if not self.offload_grads:
            for b in self.buckets:
                b.host_grad = None  # the host copy was the step's input only
        return loss

    def _set_master_grads(self) -> None:
        with placement("host"):  # the fp32 gradient the host update reads
            for b in self.buckets:
                g = b.host_grad
                b.master.grad = g.to(self.master_dtype, copy=True)

    def _host_step(self, in_thread: bool = False) -> None:
        """The update on the host, then the masters rounded to 16 bits there.
        ``in_thread``: it runs beside the calling thread, so it leaves the masters'
        ``.grad`` to :meth:`_join_update` (see the module docstring)."""
        start = time.perf_counter()
        try:
            with placement("host"):
                self.optim.step()
                if not in_thread:
                    self._drop_master_grads()  # before the 16-bit copies exist
                for b in self.buckets:
                    b.staged = b.master.to(b.flat.dtype)  # float2half, on the CPU
        except BaseException as err:  # a worker thread's error surfaces in step()
            self._worker_error = err
        self._host_updates += 1
        self.host_step_seconds = time.perf_counter() - start

    def _drop_master_grads(self) -> None:
        for b in self.buckets:
            b.master.grad = None  # the fp32 copy was workspace

    def _join_update(self) -> None:
        """Wait for an update in flight (in the calling thread, the only one that
        sets ``.grad``), drop the gradients it read, raise what it raised."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
            self._drop_master_grads()
        if self._worker_error is not None:
            err, self._worker_error = self._worker_error, None
            raise err

    def _publish_pending(self) -> None:
        """Wait for an update in flight; copy its 16-bit slices up and all-gather."""
        self._join_update()
        for b in self.buckets:
            if b.staged is None:
                continue
            self.transfers.to_device(b.staged, out=b.shard)  # 16-bit params up
            b.staged = None
            mine = b.shard.clone()
            self._track("other", mine)
            all_gather(b.flat, mine, meter=self.meter, group=self.group)

    # [offload-step-end]

    def finish(self) -> None:
        """Apply an update still in flight (delayed mode): call after the last step."""
        self._publish_pending()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget this step's gradients (the host and device buffers stay)."""
        for b in self.buckets:
            b.full, b.ready, b.reduced, b.has_grad = None, 0, False, False
            if b.grad_shard is not None:
                b.grad_shard.zero_()
            for p in b.params:
                p.grad = None

    def state_dict(self) -> dict:
        """This rank's slice of the state; waits for an update in flight (which
        writes the states in place) without publishing it."""
        self._join_update()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's slice of the state (what ``state_dict()`` saved here)."""
        self.finish()
        self.optim.load_state_dict(state_dict)
        self.param_groups, self.state = self.optim.param_groups, self.optim.state
