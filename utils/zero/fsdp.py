"""ZeRO stage 3 from scratch: a module wrapper that shards the parameters too.

Introduced in chapter 2 ("ZeRO"); ``labs/zero.py`` is one client, the tests another.
Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (SC 2020, arXiv:1910.02054), section 5.3 (P_os+g+p) and 7.2.2: each rank
keeps 1/N of every parameter; a layer's full parameters are all-gathered just before
its forward and again before its backward, and freed right after each, so a rank
holds the whole of only a layer or two at a time. Communication per step: an
all-gather in forward, one in backward and a reduce-scatter of the gradients,
3 Psi (N-1)/N elements per rank, 1.5 times data parallelism. PyTorch's FSDP (Zhao
et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB
2023) is this design; ``torch.distributed.fsdp.fully_shard`` (FSDP2) is the version
the lab compares with, and the one this module follows. Inside a rank::

    model = FullyShardedModule(GPT(cfg))               # or compute_dtype=torch.bfloat16
    opt = model.optimizer(torch.optim.AdamW, lr=1e-3)  # any optimizer, on the shards
    loss_fn(model(x_local), y_local).backward()        # gathers, frees, reduce-scatters
    model.module.head.weight.grad                      # this rank's rows, fp32
    opt.step(); opt.zero_grad()
    weights = model.full_state_dict()                  # collective: every rank calls it

Sharding: per parameter, as FSDP2 does it. Each trainable parameter is cut along dim
0 into N chunks the way ``fully_shard`` cuts it
(torch/distributed/fsdp/_fully_shard/_fsdp_param.py, ``_init_sharded_param``:
``_chunk_with_empty(param, N, dim=0)``): every chunk has ``ceil(d0 / N)`` rows, so
the last ranks' chunks are shorter or empty, and each rank stores its chunk padded
to the full ``ceil(d0 / N)`` rows (FSDP2's ``padded_sharded_param_size``). The
wrapped module's parameters *become* the shards: ``model.module.head.weight`` is the
same ``nn.Parameter`` as before, now of shape (rows this rank owns, ...), in the
master dtype, and after backward its ``.grad`` is this rank's rows of the averaged
gradient, same shape and dtype. A 0-dim parameter is treated as one row. Why per
parameter rather than one flat buffer per unit (FSDP1's ``FlatParameter``, this
module's first version): a shard is still a piece of *that* parameter, so an
optimizer, a clipping norm or a checkpoint sees parameters by name, and a second
sharding composes with it: a tensor-parallel shard of a weight can be sharded again
along dim 0, FSDP2's 2-D, which the combining chapter needs. Communication stays per
unit: the padded shards of a unit's parameters lie end to end in one flat buffer per
rank (the parameters are views into it), so one all-gather fetches the whole unit
(FSDP2's ``foreach_all_gather``). Its output is rank-major (rank 0's shards, then
rank 1's); a copy-out (``torch.split_with_sizes_copy``, FSDP2's
``foreach_all_gather_copy_out``) puts each parameter's rows in order in the unit's
full buffer, and the gradients travel back the other way, laid out rank-major by
``torch._chunk_cat`` (FSDP2's ``foreach_reduce_scatter_copy_in``) for one
reduce-scatter. The accounting stays exact: a rank holds ``sum ceil(d0/N) * row``
elements per unit, ``ceil(Psi / N)`` plus padding (none for the course's GPT at N =
2 or 4; :attr:`FullyShardedModule.padding_bytes` counts it).

Units. The parameters are grouped into units, by default each element of every
``nn.ModuleList``/``nn.Sequential`` (the layers) plus the root for the rest. A
parameter shared by several modules (tied embeddings) goes to the smallest unit that
holds all of them, here the root: it is gathered for the whole forward, as FSDP's
root is. Each parameter has a full twin, an ``nn.Parameter`` viewing the unit's full
buffer; a forward pre-hook gathers the unit and swaps the twins into the modules,
a forward hook swaps the shards back, frees the full buffer with
``storage.resize_(0)`` and hooks the outputs' gradients, which re-gather before the
unit's backward, into the same storage: the tensors autograd saved in forward (the
twins) see the weights again. FSDP's trick. A hook on each twin's gradient
accumulation counts the unit's gradients and, once all are there, reduce-scatters
them and frees the full parameters and gradients. A callback at the end of backward
reduces what never got a gradient and waits for the last reduce-scatters:
:meth:`FullyShardedModule.finish_gradient_synchronization` (idempotent; the step
of :meth:`FullyShardedModule.optimizer` calls it too).

Prefetch and overlap (``prefetch=True``, the default). The forward records the order
in which units run; in the next forward, while unit k computes, the all-gather of
unit k+1 is already in flight (``async_op=True``, started in k's pre-hook). Backward
runs the units in the reverse order of their forward hooks, and in the pre-backward
of each, the all-gather of the next one starts. A unit's reduce-scatter is
asynchronous too: it runs while the next unit's backward computes, and is waited
when the next one is issued (so at most two are in flight) or at the end of
backward, always before the optimizer step. The prefetched data waits in the
all-gather's own buffer, and is copied into the unit's full buffer only when the
unit is used, after the previous one was freed: so, besides the root (gathered
through the whole forward, and through the whole backward since the tied embedding's
gradient comes last), at most two units hold gathered parameters at once, the one
computing and the one in flight, and without prefetch one. ``gathered_peak`` records
both the number of such units and their bytes (full buffers plus all-gather
buffers): the bytes are the same either way, root plus two layers, because the
copy-out already needs the all-gather buffer next to the full one; prefetch holds
those two layers for the whole of each layer's compute instead of only during its
copy-out. In the ledger, "params" still peaks at the shards, the root and one layer:
the prefetched layer is in its all-gather buffer ("other"). ``prefetch=False``:
every collective blocks (the first version's behaviour). Events, through
``on_event(event, unit, phase)``, let a timeline show the overlap: "prefetch" (an
all-gather started ahead of use), "gather" (a unit's full parameters in place),
"free", "reduce-scatter" (started), "reduced" (waited: the shards' ``.grad`` are
set).

``compute_dtype=torch.bfloat16``: gathers, compute and gradients in bf16, fp32
master weights: the paper's 2 + 2 + 12 bytes per parameter, and what the ledger
files. The sharded parameters (what ``model.parameters()`` and
:meth:`full_state_dict` hold) are the fp32 master weights, filed under optimizer
state as the paper counts them; a bf16 copy of this rank's shard is the all-gather
input ("params", re-cast whenever a master changed); the reduce-scatter writes this
rank's bf16 gradient into a buffer of its own ("grads", the paper's 16-bit
gradient), and it is cast into (or accumulated onto) the masters' fp32 ``.grad``
when it is waited, as FSDP2 accumulates into fp32 sharded gradients. The optimizer
from :meth:`FullyShardedModule.optimizer` releases that fp32 copy after its step
(the paper counts it as step workspace): the ledger shows 2 + 2 + 12 after the
step, plus the 4-byte fp32 copy between the end of backward and the step (the
"mixed-20" convention of ``utils.memory_model``). Frozen parameters are cast to the
compute dtype and kept whole on every rank; floating inputs are cast too (as FSDP2
does). ``track(category, tensor)`` (e.g. ``MemoryTracker.assign``) is told about
every buffer made here. Use ``model.parameters()`` of the wrapper (the shards); the
wrapped module holds its full twins only inside a unit's forward.

Parameter offload (chapter 3, ``offload=``): an object with three methods keeps
the shards on the host, ZeRO-Infinity's and FSDP2's ``CPUOffloadPolicy`` layout
(``utils.offload.params.ParamOffload`` is the course's): ``place(unit)`` is called
once a unit is sharded and may move its ``master``, ``shard`` and ``grad16`` to the
host (re-pointing the parameters at the new master); ``fetch(unit)`` returns the
device tensor each all-gather sends, copied up from the host shard; ``store(unit,
reduced)`` takes this rank's averaged gradient from the reduce-scatter (on the
device) and returns it on the host in the master dtype, where the parameters'
``.grad`` then point. Without it (None) nothing changes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from utils.comm import (
    CommMeter,
    all_gather,
    broadcast_from_first_rank,
    reduce_scatter,
)

__all__ = ["FullyShardedModule", "default_units"]


def default_units(module: nn.Module) -> list[nn.Module]:
    """Each element of every ModuleList/Sequential in ``module`` (its layers)."""
    units = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList | nn.Sequential):
            units.extend(
                c for c in m.children() if next(c.parameters(), None) is not None
            )
    return units


class _Param:
    """One trainable parameter: its shard (registered in the modules) and full twin.

    FSDP2's chunking along dim 0: ``chunk`` rows per rank (``ceil(rows / N)``), of
    which this rank owns ``mine``; its shard takes ``numel`` elements (``chunk``
    rows) at ``offset`` in the unit's flat shard, and ``N * numel`` at ``N *
    offset`` in the unit's full buffer, whose first ``rows`` rows are the twin.
    """

    def __init__(self, param, owners, world_size: int, rank: int, offset: int):
        self.param, self.owners = param, owners  # owners: [(module, attribute)]
        self.shape = param.shape
        self.rows = param.shape[0] if param.dim() else 1
        self.row_numel = math.prod(param.shape[1:]) if param.dim() else 1
        self.chunk = -(-self.rows // world_size)
        self.mine = max(0, min(self.chunk, self.rows - rank * self.chunk))
        self.start = rank * self.chunk  # first row of mine
        self.numel = self.chunk * self.row_numel
        self.offset = offset
        self.shard_shape = (self.mine, *param.shape[1:])
        self.full: nn.Parameter | None = None

    def shard_view(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's rows in a flat shard buffer, shaped like the shard."""
        return flat[self.offset : self.offset + self.mine * self.row_numel].view(
            self.shard_shape
        )


class _Unit:
    """The parameters gathered and freed together: shards, full buffer, state."""

    def __init__(self, name: str, module: nn.Module, params: list[_Param]):
        self.name, self.module, self.params = name, module, params
        self.gathered = False  # the full buffer holds the parameters
        self.all_gather = None  # (work, buffer) of an all-gather in flight
        self.ready = 0  # gradients accumulated in this backward
        self.reduced = False  # its reduce-scatter started in this backward
        self.cast_versions = None  # master versions the 16-bit shard was cast from


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class FullyShardedModule(nn.Module):
    """ZeRO stage 3 (P_os+g+p) around any module; see the module docstring."""

    def __init__(
        self,
        module: nn.Module,
        compute_dtype: torch.dtype | None = None,
        *,
        units: Iterable[nn.Module] | None = None,
        group=None,
        meter: CommMeter | None = None,
        track: Callable[[str, torch.Tensor], object] | None = None,
        on_event: Callable[[str, str, str], object] | None = None,
        prefetch: bool = True,
        offload=None,
    ):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("FullyShardedModule runs inside a rank: init the group")
        self.module = module
        self.compute_dtype = compute_dtype
        # 16-bit compute keeps fp32 masters; otherwise the parameters are the masters
        self.master_dtype = (
            torch.float32
            if compute_dtype is not None and compute_dtype.itemsize < 4
            else compute_dtype
        )
        self.group, self.meter, self.prefetch = group, meter, prefetch
        self.offload = offload  # a parameter-offload hook (chapter 3), or None
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._track = track or (lambda category, tensor: None)
        self._on_event = on_event or (lambda event, unit, phase: None)
        self._in_backward = self._in_forward = False
        self._pending: list[list] = []  # reduce-scatters in flight, oldest first
        self._forward_order: list[_Unit] = []  # pre-forward order, last forward
        self._forward_seen: list[_Unit] = []
        self._post_order: list[_Unit] = []  # post-forward order, this forward
        self._backward_order: list[_Unit] = []
        self._backward_next = 0
        self.gathered_peak = {"units": 0, "bytes": 0}
        """Most units other than the root holding gathered parameters at once, and
        most bytes of gathered parameters (full and all-gather buffers, all units);
        :meth:`reset_gathered_peak` starts again."""

        names = {id(m): n for n, m in module.named_modules()}
        chosen = [m for m in (default_units(module) if units is None else units)]
        chosen = [m for m in chosen if m is not module] + [module]
        # Innermost first, so a parameter goes to the smallest unit holding all uses.
        chosen.sort(key=lambda m: sum(1 for _ in m.modules()))
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        params: dict[int, nn.Parameter] = {}
        for m in module.modules():
            for attr, p in m._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append((m, attr))
                    params[id(p)] = p
        assigned: dict[int, list[nn.Parameter]] = {id(m): [] for m in chosen}
        for pid, p in params.items():
            if not p.requires_grad:  # frozen: whole, in the compute dtype, everywhere
                if compute_dtype is not None:
                    p.data = p.data.to(compute_dtype)
                self._track("params", p)
                continue
            for m in chosen:
                inside = {id(x) for x in m.modules()}
                if all(id(o) in inside for o, _ in owners[pid]):
                    assigned[id(m)].append(p)
                    break
        self.units = [
            self._shard(names.get(id(m), "?"), m, assigned[id(m)], owners)
            for m in sorted(chosen, key=lambda m: list(names).index(id(m)))
            if assigned[id(m)]
        ]

    # -- construction -----------------------------------------------------------------
    @torch.no_grad()
    def _shard(self, name, module, params, owners) -> _Unit:
        dtypes = {p.dtype for p in params}
        if self.compute_dtype is None and len(dtypes) > 1:
            raise ValueError(f"unit {name!r} mixes dtypes {dtypes}: pass compute_dtype")
        compute = self.compute_dtype or dtypes.pop()
        master = self.master_dtype or compute
        n, device = self.world_size, params[0].device
        specs, offset = [], 0
        for p in params:
            specs.append(_Param(p, owners[id(p)], n, self.rank, offset))
            offset += specs[-1].numel
        u = _Unit(name, module, specs)
        u.numel, u.compute, u.mixed = offset, compute, master != compute
        # Rank 0's weights, then this rank's rows of each, padded to `chunk` rows.
        whole = torch.cat([p.detach().reshape(-1).to(master) for p in params])
        broadcast_from_first_rank([whole], group=self.group)
        u.master = torch.zeros(offset, dtype=master, device=device)
        begin = 0
        for s in specs:
            rows = whole[begin : begin + s.rows * s.row_numel].view(s.rows, s.row_numel)
            begin += s.rows * s.row_numel
            s.shard_view(u.master).view(s.mine, s.row_numel).copy_(
                rows[s.start : s.start + s.mine]
            )
            s.param.grad = None
            s.param.data = s.shard_view(u.master)  # the module's parameter: a shard
        u.shard = u.master.to(compute) if u.mixed else u.master  # all-gather input
        u.cast_versions = self._versions(u)
        self._track("optimizer" if u.mixed else "params", u.master)
        if u.mixed:
            self._track("params", u.shard)
            u.grad16 = torch.zeros(offset, dtype=compute, device=device)
            self._track("grads", u.grad16)  # the reduce-scatter's output
        if self.offload is not None:
            self.offload.place(u)  # master, shard and grad16 to the host
        # The full buffer: each parameter's padded rows in order; twins view it.
        u.full = torch.zeros(n * offset, dtype=compute, device=device)
        storage = u.full.untyped_storage()
        for s in specs:
            twin = torch.empty(0, dtype=compute, device=device).set_(
                storage, n * s.offset, s.shape, _contiguous_strides(s.shape)
            )
            s.full = nn.Parameter(twin)  # a leaf: autograd accumulates into it
            s.full.register_post_accumulate_grad_hook(partial(self._on_grad, u))
        u.split = [s.numel for s in specs]
        u.copy_out = [
            u.full[n * s.offset : n * (s.offset + s.numel)].view(n, -1) for s in specs
        ]
        u.full_bytes = storage.nbytes()
        storage.resize_(0)
        self._track("params", u.full)
        module.register_forward_pre_hook(partial(self._pre_forward, u))
        module.register_forward_hook(partial(self._post_forward, u))
        return u

    @staticmethod
    def _versions(u: _Unit) -> tuple[int, ...]:
        return tuple(s.param._version for s in u.params)

    @torch.no_grad()
    def _cast_shard(self, u: _Unit) -> None:
        """Mixed precision: refresh the 16-bit shard if a master weight changed."""
        versions = self._versions(u)
        if u.mixed and versions != u.cast_versions:
            u.shard.copy_(u.master)
            u.cast_versions = versions

    def _swap(self, u: _Unit, full: bool) -> None:
        """Put the full twins (or the shards) into the modules that own them."""
        for s in u.params:
            for module, attr in s.owners:
                module._parameters[attr] = s.full if full else s.param

    def _note(self) -> None:
        """Update :attr:`gathered_peak` (units other than the root, and bytes)."""
        units = nbytes = 0
        for u in self.units:
            held = u.full_bytes * (u.gathered + (u.all_gather is not None))
            nbytes += held
            units += bool(held) and u.module is not self.module
        peak = self.gathered_peak
        peak["units"], peak["bytes"] = (
            max(peak["units"], units),
            max(peak["bytes"], nbytes),
        )

    def reset_gathered_peak(self) -> None:
        self.gathered_peak = {"units": 0, "bytes": 0}

    # [zero3-gather-start]
    # -- gather: one all-gather per unit, then each parameter's rows in place ---------
    @torch.no_grad()
    def _start_gather(self, u: _Unit) -> None:
        self._cast_shard(u)
        buffer = torch.empty(
            self.world_size * u.numel, dtype=u.compute, device=u.full.device
        )
        self._track("other", buffer)  # a communication buffer
        # The all-gather's input: the shard, or its copy fetched up from the host
        # (the collective's work object keeps it alive until it is waited).
        src = u.shard if self.offload is None else self.offload.fetch(u)
        work = all_gather(
            buffer, src, meter=self.meter, group=self.group, async_op=True
        )
        u.all_gather = (work, buffer)
        self._note()

    @torch.no_grad()
    def _gather(self, u: _Unit, phase: str) -> None:
        if u.gathered:
            return
        if u.all_gather is None:  # not prefetched: start it now
            self._start_gather(u)
        work, buffer = u.all_gather
        work.wait()
        u.full.untyped_storage().resize_(u.full_bytes)
        # rank-major [rank 0: p0 p1 ..., rank 1: p0 p1 ...] -> [p0 of all ranks, ...]
        n = self.world_size
        torch.split_with_sizes_copy(buffer.view(n, -1), u.split, dim=1, out=u.copy_out)
        u.gathered = True
        self._note()
        u.all_gather = None
        self._on_event("gather", u.name, phase)

    # [zero3-gather-end]

    # [zero3-prefetch-start]
    def _prefetch(self, u: _Unit | None, phase: str) -> None:
        """Start ``u``'s all-gather now, to be waited when ``u`` runs."""
        if u is None or u.gathered or u.all_gather is not None:
            return
        if phase == "backward" and u.reduced:
            return
        self._start_gather(u)
        self._on_event("prefetch", u.name, phase)

    def _next_forward(self, u: _Unit) -> _Unit | None:
        """The unit after ``u`` in the last forward's order, if this one follows it."""
        if not self._in_forward:
            return None
        i = len(self._forward_seen)
        self._forward_seen.append(u)
        order = self._forward_order
        if i + 1 < len(order) and order[i] is u:
            return order[i + 1]
        return None

    def _next_backward(self, u: _Unit) -> _Unit | None:
        """The unit after ``u`` in backward: the reverse of the forward hooks' order."""
        order, j = self._backward_order, self._backward_next
        while j < len(order) and order[j] is not u:
            j += 1
        if j >= len(order):
            return None
        self._backward_next = j + 1
        return order[j + 1] if j + 1 < len(order) else None

    def _drop_prefetch(self, u: _Unit) -> None:
        """Wait for (and discard) an all-gather nobody used."""
        if u.all_gather is not None:
            u.all_gather[0].wait()
            u.all_gather = None

    # [zero3-prefetch-end]

    # [zero3-free-start]
    def _free(self, u: _Unit, phase: str) -> None:
        if u.gathered:
            u.full.untyped_storage().resize_(0)
            u.gathered = False
            self._on_event("free", u.name, phase)

    # [zero3-free-end]

    # [zero3-reduce-start]
    # -- reduce: each rank's rows of every gradient, summed over the ranks ------------
    @torch.no_grad()
    def _reduce(self, u: _Unit) -> None:
        n = self.world_size
        grads = []
        for s in u.params:
            g = s.full.grad
            if g is None:  # no gradient in this backward: a zero one
                g = torch.zeros(s.shape, dtype=u.compute, device=u.full.device)
            grads.append(g.reshape(s.rows, s.row_numel))
            s.full.grad = None  # the full gradient is freed as soon as it is copied
        flat = torch.empty(n * u.numel, dtype=u.compute, device=u.full.device)
        self._track("other", flat)  # a communication buffer
        # [rank 0's rows of g0 g1 ..., rank 1's rows ...], zero-padded per parameter
        torch._chunk_cat(grads, dim=0, num_chunks=n, out=flat.view(n, -1))
        del grads
        if u.mixed and self.offload is None:
            out = u.grad16
        elif self.offload is not None:  # a device buffer; store() takes it to the host
            out = torch.empty(u.numel, dtype=u.compute, device=u.full.device)
            self._track("other", out)
        else:
            out = torch.empty(u.numel, dtype=u.compute, device=u.full.device)
            fresh = any(s.param.grad is None for s in u.params)
            self._track("grads" if fresh else "other", out)
        work = reduce_scatter(
            out, flat, meter=self.meter, group=self.group, async_op=True
        )
        self._pending.append([u, work, flat, out])
        del work, flat, out  # the entry holds them until waited
        u.ready, u.reduced = 0, True
        self._on_event("reduce-scatter", u.name, "backward")
        if not self.prefetch or all(v.reduced for v in self.units):
            self.finish_gradient_synchronization()  # nothing left to overlap with
        while len(self._pending) > 1:  # at most two in flight
            self._finish_reduce(self._pending.pop(0))

    @torch.no_grad()
    def _finish_reduce(self, entry: list) -> None:
        u, work, _, out = entry
        work.wait()
        entry.clear()  # drops the reduce-scatter's input buffer
        del work
        out.div_(self.world_size)
        if self.offload is not None:
            grads = self.offload.store(u, out)  # on the host, in the master dtype
        else:
            grads = out if not u.mixed else out.to(u.master.dtype)  # fp32 gradient
        if grads is not out and self.offload is None:
            fresh = any(s.param.grad is None for s in u.params)
            self._track("grads" if fresh else "other", grads)
        for s in u.params:
            mine = s.shard_view(grads)
            if s.param.grad is None:
                s.param.grad = mine
            else:
                s.param.grad.add_(mine)  # accumulation over micro-batches
        self._on_event("reduced", u.name, "backward")

    def finish_gradient_synchronization(self) -> None:
        """Wait for the reduce-scatters in flight; then every shard has its ``.grad``.

        The end of backward calls it, and so does the step of :meth:`optimizer`;
        calling it again does nothing.
        """
        while self._pending:
            self._finish_reduce(self._pending.pop(0))

    # [zero3-reduce-end]

    # [zero3-hooks-start]
    # -- hooks ------------------------------------------------------------------------
    def _pre_forward(self, u: _Unit, module, args) -> None:
        self._gather(u, "forward")
        self._swap(u, full=True)
        nxt = self._next_forward(u)
        if self.prefetch:
            self._prefetch(nxt, "forward")  # in flight while u computes

    def _post_forward(self, u: _Unit, module, args, output) -> None:
        self._swap(u, full=False)
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(partial(self._pre_backward, u))
        if self._in_forward:
            self._post_order.append(u)
        self._free(u, "forward")

    def _pre_backward(self, u: _Unit, grad) -> None:
        if not self._in_backward:
            self._in_backward = True
            self._backward_order = self._post_order[::-1]
            self._backward_next = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if not u.reduced and not u.gathered:
            self._gather(u, "backward")  # waits for its prefetch, if one started
            if self.prefetch:
                self._prefetch(self._next_backward(u), "backward")

    def _on_grad(self, u: _Unit, param) -> None:
        self._track("grads", param.grad)
        u.ready += 1
        if u.ready == len(u.params):
            self._reduce(u)
            self._free(u, "backward")

    def _end_backward(self) -> None:
        for u in self.units:  # same order on every rank
            if not u.reduced:  # some parameter got no gradient in this backward
                self._reduce(u)
                self._free(u, "backward")
        self.finish_gradient_synchronization()
        for u in self.units:
            self._drop_prefetch(u)
            self._free(u, "backward")
            u.reduced, u.ready = False, 0
        self._in_backward = False

    # [zero3-hooks-end]

    # -- the public face --------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.compute_dtype is not None:
            cast = partial(_cast, dtype=self.compute_dtype)
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        self._in_forward = True
        self._forward_seen, self._post_order = [], []
        try:
            return self.module(*args, **kwargs)
        finally:
            self._in_forward = False
            self._forward_order = self._forward_seen
            for u in self.units:
                self._drop_prefetch(u)  # a prefetch this forward did not use

    @property
    def padding_bytes(self) -> int:
        """Zero padding in the gathered parameters (all ranks' rows beyond ``d0``)."""
        return sum(
            (self.world_size * s.chunk - s.rows) * s.row_numel * u.full.element_size()
            for u in self.units
            for s in u.params
        )

    def unit_bytes(self) -> dict[str, int]:
        """Bytes of each unit's full (gathered) parameters, by unit name."""
        return {u.name or "root": u.full_bytes for u in self.units}

    def optimizer(self, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
        """``optimizer_cls`` over the shards (the fp32 masters when 16-bit).

        Its step first waits for the gradients; in mixed precision it then drops
        the fp32 gradient copies (workspace, in the paper's count) and re-casts the
        16-bit shards.
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = optimizer_cls(params, **kwargs)
        opt.register_step_pre_hook(lambda *_: self.finish_gradient_synchronization())
        if any(u.mixed for u in self.units):
            opt.register_step_post_hook(lambda *_: self._after_step())
        return opt

    def _after_step(self) -> None:
        for u in self.units:
            if u.mixed:
                for s in u.params:
                    s.param.grad = None
                self._cast_shard(u)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights under the wrapped module's names (a collective):
        the master weights, fp32 in mixed precision (frozen ones as kept)."""
        n, whole = self.world_size, {}
        for u in self.units:
            buffer = torch.empty(
                n * u.numel, dtype=u.master.dtype, device=u.full.device
            )
            master = u.master.to(buffer.device)  # from the host when offloaded
            all_gather(buffer, master, group=self.group)  # not part of a step
            ranks = buffer.view(n, -1)
            for s in u.params:
                rows = ranks[:, s.offset : s.offset + s.numel].reshape(
                    n * s.chunk, s.row_numel
                )
                whole[id(s.param)] = rows[: s.rows].reshape(s.shape).clone()
        return {
            k: whole[id(v)] if id(v) in whole else v.detach().clone()
            for k, v in self.module.state_dict(keep_vars=True).items()
        }

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Same as :meth:`full_state_dict` (every rank must call it)."""
        destination = OrderedDict() if destination is None else destination
        for key, value in self.full_state_dict().items():
            destination[prefix + key] = value
        return destination


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, list | tuple):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def _cast(x, dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x
