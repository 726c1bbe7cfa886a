"""Memory per rank, measured by category: the ``MemoryTracker`` ledger.

Introduced in chapter 0 ("Why one device is not enough"); every lab records its
timeline with it, and the ZeRO chapter compares it with the stages' formulas. The
analytic side lives in ``utils.memory_model`` (import the formulas from there).

Inside a rank::

    mem = MemoryTracker(device)
    mem.watch(model, optimizer)
    with mem:
        mem.mark("init")
        loss = model(x).sum(); mem.mark("forward", step=0)
        loss.backward(); mem.mark("backward", step=0)
        optimizer.step(); optimizer.zero_grad(); mem.mark("step", step=0)
    report.memory = mem.timeline()

How it counts. A ``TorchDispatchMode`` sees every tensor an aten op returns, keeps a
ledger of the live storages (each counted once, however many views share it; a
weak reference tells it when a storage is freed) and files each under one of
``CATEGORIES``:

=============== ==========================================================
params          storages of the watched modules' parameters (a DTensor counts
                its local shard, padding included; FSDP2's gathered copies too)
grads           their ``.grad`` (filed as soon as autograd accumulates it)
optimizer       the watched optimizers' state (inner optimizers too, e.g. a
                ZeroRedundancyOptimizer's), tensors an optimizer updates that
                no watched module owns (fp32 master copies), and anything an
                ``optimizer.step()`` creates that outlives the step
activations     what forward and backward create: saved activations, backward
                temporaries, the input batch of a watched module, the loss
other           module buffers, transient workspace of ``optimizer.step()``,
                tensors made before the first mark (setup: DDP's buckets, if
                DDP is built inside ``with``) or by a wrapper before it calls
                its ``.module`` (DDP rebuilding its buckets), what you
                ``assign`` there, and on CUDA what the allocator holds beyond
                the ledger
=============== ==========================================================

This is the mapping of torch's own ``torch.distributed._tools.mem_tracker.MemTracker``
(Parameter, Gradient, Optstate, Activation + Temp, Buffer + Other), whose ideas
it borrows (the dispatch mode, DTensor's local storages, the ``resize_`` patch that
FSDP2's freed parameters need). It does not use MemTracker itself: MemTracker
raises on the second forward of a module within one tracking context (gradient
accumulation, pipeline micro-batches), keeps per-module snapshots we do not show,
and cannot re-file a tensor whose role is only known later. Categories here are
settled at every :meth:`MemoryTracker.mark`, and the peak of a phase is broken
down with the categories known at its mark, so stacked bars always add up.

On CPU the ledger is the measurement (storage bytes, exactly what the formulas
predict). On CUDA the totals come from the caching allocator
(``memory_allocated`` and ``max_memory_allocated``, reset at each mark), the split
from the ledger (storage sizes rounded up to the allocator's 512-byte blocks), and
the allocator's excess over the ledger is added to "other"; each phase also keeps
the raw ``"ledger"`` and ``"allocator"`` figures so a chapter can show both.

What the ledger cannot see: tensors made before tracking that no ``watch``,
``assign`` or module input reaches (build DDP inside ``with`` to count buckets
that are not the grads themselves; with ``gradient_as_bucket_view=True`` they are
the grads, and outlive ``zero_grad()`` as DDP keeps them), memory a library
allocates without an aten op (gloo's scratch space), and tensors on devices
other than the tracker's and the host (another GPU).
An optimizer that does not subclass ``torch.optim.Optimizer`` has no step hooks:
``assign`` its state. A tracker sees the operations of its own thread only (a
dispatch mode is thread-local): work done in another thread (the offload
chapter's delayed host step) is counted at the next mark through ``watch`` and
``assign``, and its temporaries not at all.

Two pools: device and host (chapter 3, "CPU offloading"). Every tracked storage
is also filed in a *pool*, "device" or "host", by where the algorithm keeps it:

* on CUDA, by its real device: storages on the tracker's GPU are "device",
  storages in CPU memory "host" (pinned or not); a ``pool`` given below is
  ignored there, the device wins;
* on the CPU fallback both are CPU memory, so the placement is logical: a
  storage is "device" unless the code that made it said otherwise, with
  ``assign(category, tensors, pool="host")`` (the offload pieces' ``track``) or
  by creating it inside ``with placement("host"):`` (a thread-local setting that
  every tracker of the thread reads, for temporaries such as a host step's
  workspace). ``assign(..., pool="device")`` moves a storage back.

The top-level "current", "peak" and "peak_total" of a timeline entry (and
:meth:`MemoryTracker.current`) are the device pool: what they always were when
nothing is on the host, and on CUDA what the GPU holds. ``entry["pools"]`` has
both pools, each ``{"current", "peak", "peak_total"}`` by category; each pool's
peak is its own (the host may peak in the step while the device peaks in
backward). A tracker made with ``device_budget=BYTES`` refuses to let the device
pool grow past it: the allocation that would raises ``torch.OutOfMemoryError``
(the class CUDA raises; ``torch.cuda.OutOfMemoryError`` is the same class) with a
message in CUDA's form naming the pool, the bytes tried, the budget, what is in
use by category and what is free::

    mem = MemoryTracker("cpu", device_budget=8 * 2**20)
    with mem:
        ...  # torch.OutOfMemoryError: Device pool out of memory (logical budget,
             # utils.memory). Tried to allocate 1.0 MiB (1,048,576 bytes). The
             # device pool of cpu has a budget of 8.0 MiB (8,388,608 bytes) of
             # which 512.0 KiB is free; 7.5 MiB is in use (params 2.0 MiB, ...).

The budget is a ledger budget: on CUDA the allocator's own limit still applies
(``torch.cuda.set_per_process_memory_fraction`` sets that one).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, KeysView, ValuesView
from typing import Any

import torch
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from utils.report import CATEGORIES, format_bytes

__all__ = ["POOLS", "MemoryTracker", "current_placement", "placement", "tensor_bytes"]

_CUDA_BLOCK = 512  # the caching allocator's smallest block, in bytes


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a tensor, None, or any nesting of containers (sets, dict views
    and generators included)."""
    leaves, _ = tree_flatten(obj)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif isinstance(leaf, set | frozenset | ValuesView | KeysView | Iterator):
            out.extend(_tensors(list(leaf)))
    return out


def _storages(t: torch.Tensor) -> set[torch.UntypedStorage]:
    """Storages behind a tensor: its own, or a wrapper subclass's (a DTensor's)."""
    try:
        return get_untyped_storages(t)
    except Exception:  # sparse and other storage-less layouts: nothing to count
        return set()


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once).

    ``tensors``: a tensor, None, or any nesting of lists/tuples/dicts of them. A
    DTensor counts its local shard. Chapter 0 uses it to check the formulas.
    """
    seen: dict[int, int] = {}
    for t in _tensors(tensors):
        for st in _storages(t):
            seen[id(st)] = st.nbytes()
    return sum(seen.values())


POOLS = ("device", "host")
"""The two pools of the ledger: what the accelerator holds, and host memory."""

_PLACEMENT = threading.local()


@contextlib.contextmanager
def placement(pool: str) -> Iterator[None]:
    """File the storages this thread creates inside the block in ``pool``.

    The CPU fallback's logical placement (chapter 3): ``with placement("host"):``
    around a host-side step makes its temporaries and new state "host" in every
    tracker of this thread. Nested blocks: the innermost wins. On CUDA trackers
    the real device decides and this has no effect.
    """
    _check_pool(pool)
    previous = getattr(_PLACEMENT, "pool", None)
    _PLACEMENT.pool = pool
    try:
        yield
    finally:
        _PLACEMENT.pool = previous


def current_placement() -> str:
    """The pool new storages of this thread go to on the CPU fallback."""
    return getattr(_PLACEMENT, "pool", None) or "device"


def _check_pool(pool) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class _Record:
    """One live storage in the ledger."""

    __slots__ = (
        "nbytes",
        "category",
        "forced",
        "pool",
        "born",
        "alive",
        "ref",
    )

    def __init__(self, nbytes: int, category: str, born: str | None, pool: str):
        self.nbytes = nbytes
        self.category = category
        self.forced: str | None = None
        self.pool = pool
        self.born = born  # "setup", "step", "prologue" or None (forward/backward)
        self.alive = True
        self.ref: weakref.ref | None = None


class _Pool:
    """One pool's totals by category and the bookkeeping of its phase peak."""

    __slots__ = ("name", "totals", "peak_total", "at_peak", "peak_snap")

    def __init__(self, name: str):
        self.name = name
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.peak_total = 0
        self.at_peak = True  # the current state is the phase's (unsnapshotted) peak
        self.peak_snap: list[tuple[_Record, int]] = []

    def total(self) -> int:
        return sum(self.totals.values())


class MemoryTracker(TorchDispatchMode):
    """Per-rank memory timeline by category and pool; see the module docstring.

    ``device``: the device whose memory is counted. On CUDA, CPU storages are
    counted too, in the host pool (tensors on other GPUs are ignored).
    ``device_budget``: bytes the device pool may hold (None: no limit); beyond it
    the allocation raises ``torch.OutOfMemoryError``.
    """

    def __init__(
        self, device: torch.device | str = "cpu", device_budget: int | None = None
    ):
        super().__init__()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device_budget is not None and (
            isinstance(device_budget, bool)
            or not isinstance(device_budget, int)
            or device_budget < 0
        ):
            raise ValueError(
                f"device_budget must be a number of bytes >= 0 or None, got "
                f"{device_budget!r}"
            )
        self.device = device
        self.device_budget = device_budget
        self._cuda = device.type == "cuda"
        self._by_storage = WeakIdKeyDictionary()  # storage -> _Record
        self._live: dict[int, _Record] = {}
        self._pools = {name: _Pool(name) for name in POOLS}
        self._totals = self._pools["device"].totals  # the device pool, as before
        self._pending: collections.deque[_Record] = collections.deque()
        self._modules: list[nn.Module] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._assigned: list[tuple[str, str | None, Callable[[], Any]]] = []
        self._timeline: list[dict] = []
        self._depth = 0
        self._step_depth = 0
        self._step_born: list[_Record] = []
        self._marked = False  # before the first mark, new tensors are setup
        self._prologue = 0  # inside a wrapper's forward, before its inner module's
        self._params = WeakIdKeyDictionary()  # every tensor seen as a module parameter
        self._handles: list[Any] = []
        self._hooked: set[int] = set()
        self._orig_resize = None
        self._thread = threading.get_ident()

    # ------------------------------------------------------------------ public
    def watch(
        self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> MemoryTracker:
        """Count ``module``'s parameters, grads and buffers, and ``optimizer``'s state.

        May be called several times, before or inside ``with``; tensors created
        before tracking started are picked up here.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"watch() needs an nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}"
            )
        if all(m is not module for m in self._modules):
            self._modules.append(module)
        if optimizer is not None and all(o is not optimizer for o in self._optimizers):
            self._optimizers.append(optimizer)
        if self._depth:
            self._install_module_hooks(module)
        self._classify()
        self._check_peak()
        return self

    def assign(self, category: str, tensors, pool: str | None = None) -> MemoryTracker:
        """File ``tensors`` under ``category`` whatever else they look like.

        ``tensors``: a tensor, an iterable of tensors, or a zero-argument callable
        returning them, called again at every mark (for buffers that are replaced).
        E.g. ``assign("optimizer", master_shard)``, ``assign("grads", lambda:
        opt.grad_shard)``, ``assign("other", bucket)``. The last assignment wins.
        ``pool``: "device" or "host" to place them there too (the CPU fallback's
        logical placement; on CUDA the real device wins); None leaves the pool.
        """
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        if pool is not None:
            _check_pool(pool)
        if callable(tensors):
            self._assigned.append((category, pool, tensors))
            self._classify()
        else:  # pin the storages now: the caller may drop its references
            self._drain()
            for rec in self._records_of(tensors, category, pool):
                self._force(rec, category, pool)
        self._check_peak()
        return self

    def mark(self, phase: str, step: int | None = None) -> dict:
        """End a phase: record current bytes by category and the phase's peak,
        for the device pool (top level) and for both pools (``"pools"``).

        Returns the timeline entry (also kept for :meth:`timeline`).
        """
        if not self._depth:
            raise RuntimeError("mark() needs tracking on: call it inside `with mem:`")
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase must be a non-empty string, got {phase!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise ValueError(f"step must be an int or None, got {step!r}")
        self._drain()
        self._prologue = 0
        self._classify()
        self._check_peak()
        pools = {}
        for name, pool in self._pools.items():
            current, peak = dict(pool.totals), self._peak_breakdown(pool)
            pools[name] = {"current": current, "peak": peak}
        device = pools["device"]
        current, peak = dict(device["current"]), dict(device["peak"])
        entry: dict[str, Any] = {"phase": phase, "step": step}
        entry["ledger"] = {"current": dict(current), "peak": dict(peak)}
        entry["allocator"] = None
        if self._cuda:
            alloc = {
                "current": int(torch.cuda.memory_allocated(self.device)),
                "peak": int(torch.cuda.max_memory_allocated(self.device)),
                "reserved": int(torch.cuda.memory_reserved(self.device)),
            }
            entry["allocator"] = alloc
            current["other"] += max(0, alloc["current"] - sum(current.values()))
            peak["other"] += max(0, alloc["peak"] - sum(peak.values()))
            torch.cuda.reset_peak_memory_stats(self.device)
        entry["current"] = current
        entry["peak"] = peak
        entry["peak_total"] = sum(peak.values())
        pools["device"] = {"current": dict(current), "peak": dict(peak)}
        for values in pools.values():
            values["peak_total"] = sum(values["peak"].values())
        entry["pools"] = pools
        self._timeline.append(entry)
        self._marked = True
        self._reset_peak()
        return _copy_entry(entry)

    def timeline(self) -> list[dict]:
        """The phases so far: ``{"phase", "step", "current", "peak", "peak_total",
        "ledger", "allocator", "pools"}``; plain ints and dicts (JSON-able,
        picklable).

        "current"/"peak" (the device pool) have exactly the keys of ``CATEGORIES``;
        "allocator" is None on CPU, ``{"current", "peak", "reserved"}`` on CUDA;
        "pools" is ``{"device": {...}, "host": {...}}``, each with "current",
        "peak" (by category) and "peak_total".
        """
        return [_copy_entry(e) for e in self._timeline]

    def current(self, pool: str = "device") -> dict[str, int]:
        """Live bytes by category right now in ``pool``, as the ledger sees them
        (no mark)."""
        _check_pool(pool)
        self._drain()
        self._classify()
        return dict(self._pools[pool].totals)

    # ----------------------------------------------------------- context manager
    def __enter__(self) -> MemoryTracker:
        if self._depth == 0:
            self._thread = threading.get_ident()  # the thread whose ops are seen
            self._handles.append(register_optimizer_step_pre_hook(self._on_step_pre))
            self._handles.append(register_optimizer_step_post_hook(self._on_step_post))
            for module in self._modules:
                self._install_module_hooks(module)
            self._patch_resize()
            self._drain()
            if self._cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self._reset_peak()
            super().__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            super().__exit__(*exc)
            self._restore_resize()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._hooked.clear()
            self._step_depth = 0
            self._step_born.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented  # a DTensor: let it run its local ops (seen here)
        out = func(*args, **(kwargs or {}))
        # DTensor's sharding propagation runs under a fake mode: nothing real there.
        if active_fake_mode() is None:
            self._drain()
            for t in _tensors(out):
                self._records_of(t, None)
            self._check_peak()
        return out

    # ---------------------------------------------------------------- the ledger
    def _birth(self) -> tuple[str, str | None]:
        """(category, birth tag) of a tensor created now."""
        if self._step_depth:
            return "other", "step"  # workspace, unless it outlives the step
        if self._prologue:
            return "other", "prologue"  # a wrapper's buffers (DDP's buckets)
        if not self._marked:
            return "other", "setup"
        return "activations", None

    def _pool_of(self, st: torch.UntypedStorage) -> str | None:
        """The pool a new storage goes to, or None if this tracker ignores it."""
        if st.device == self.device:
            return "device" if self._cuda else current_placement()
        if self._cuda and st.device.type == "cpu":
            return "host"
        return None

    def _records_of(
        self, tensors, category: str | None, pool: str | None = None
    ) -> list[_Record]:
        """Ledger records for ``tensors`` (new ones created as ``category``, or as
        :meth:`_birth` says when None; in ``pool``, or where they are placed)."""
        out = []
        for t in _tensors(tensors):
            for st in _storages(t):
                rec = self._by_storage.get(st)
                if rec is None:
                    where = self._pool_of(st)
                    if where is None:
                        continue
                    if pool is not None and not self._cuda:
                        where = pool
                    rec = self._add(st, category, where)
                elif rec.nbytes != self._nbytes(st):
                    self._resize(rec, self._nbytes(st))
                out.append(rec)
        return out

    def _nbytes(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        if self._cuda and st.device == self.device:
            return -(-n // _CUDA_BLOCK) * _CUDA_BLOCK
        return n

    def _add(
        self, st: torch.UntypedStorage, category: str | None, pool: str
    ) -> _Record:
        born_as, born = self._birth()
        if category is None:
            category = born_as
        nbytes = self._nbytes(st)
        self._check_budget(pool, nbytes)  # before the ledger changes: nothing to undo
        rec = _Record(nbytes, category, born, pool)
        pending = self._pending
        rec.ref = weakref.ref(st, lambda _ref, rec=rec: pending.append(rec))
        self._by_storage[st] = rec
        self._live[id(rec)] = rec
        self._pools[pool].totals[category] += rec.nbytes
        if born == "step":
            self._step_born.append(rec)
        return rec

    def _drain(self) -> None:
        """Apply the frees the weak references reported."""
        while self._pending:
            rec = self._pending.popleft()
            if not rec.alive:
                continue
            pool = self._pools[rec.pool]
            self._before_decrease(pool)
            rec.alive = False
            self._live.pop(id(rec), None)
            pool.totals[rec.category] -= rec.nbytes

    def _resize(self, rec: _Record, nbytes: int) -> None:
        pool = self._pools[rec.pool]
        grow = nbytes - rec.nbytes
        if grow > 0:
            self._check_budget(rec.pool, grow)
        else:
            self._before_decrease(pool)
        pool.totals[rec.category] += grow
        rec.nbytes = nbytes

    def _set_category(self, rec: _Record, category: str) -> None:
        if rec.forced is not None:
            category = rec.forced
        if rec.alive and rec.category != category:
            totals = self._pools[rec.pool].totals
            totals[rec.category] -= rec.nbytes
            totals[category] += rec.nbytes
        rec.category = category

    def _set_pool(self, rec: _Record, pool: str) -> None:
        """Move a record to ``pool`` (CPU fallback only: on CUDA the device wins)."""
        if self._cuda or rec.pool == pool:
            return
        if rec.alive:
            self._check_budget(pool, rec.nbytes)
            old = self._pools[rec.pool]
            self._before_decrease(old)
            old.totals[rec.category] -= rec.nbytes
            self._pools[pool].totals[rec.category] += rec.nbytes
        rec.pool = pool

    def _force(self, rec: _Record, category: str, pool: str | None) -> None:
        rec.forced = category
        self._set_category(rec, category)
        if pool is not None:
            self._set_pool(rec, pool)

    def _check_budget(self, pool: str, tried: int) -> None:
        """Before the device pool grows by ``tried`` bytes: raise CUDA's
        out-of-memory error if that would take it past the budget (the ledger is
        left as it was, as a failed allocation leaves the allocator)."""
        budget = self.device_budget
        if pool != "device" or budget is None:
            return
        totals = self._pools["device"].totals
        in_use = sum(totals.values())
        if in_use + tried <= budget:
            return
        split = ", ".join(f"{c} {format_bytes(totals[c])}" for c in CATEGORIES)
        raise torch.OutOfMemoryError(
            "Device pool out of memory (logical budget, utils.memory). Tried to "
            f"allocate {format_bytes(tried)} ({tried:,} bytes). The device pool of "
            f"{self.device} has a budget of {format_bytes(budget)} ({budget:,} "
            f"bytes) of which {format_bytes(max(0, budget - in_use))} is free; "
            f"{format_bytes(in_use)} is in use ({split})."
        )

    def _before_decrease(self, pool: _Pool) -> None:
        # Memory is about to go down: if we stand at the pool's phase peak,
        # remember which storages made it up; they are filed by category only at
        # the mark (in the pool they were in then).
        if pool.at_peak:
            live = self._live.values()
            pool.peak_snap = [(r, r.nbytes) for r in live if r.pool == pool.name]
            pool.at_peak = False

    def _check_peak(self) -> None:
        for pool in self._pools.values():
            total = pool.total()
            if total > pool.peak_total:
                pool.peak_total = total
                pool.at_peak = True

    def _reset_peak(self) -> None:
        for pool in self._pools.values():
            pool.peak_total = pool.total()
            pool.at_peak = True
            pool.peak_snap = []

    def _peak_breakdown(self, pool: _Pool) -> dict[str, int]:
        if pool.at_peak:
            return dict(pool.totals)
        peak = dict.fromkeys(CATEGORIES, 0)
        for rec, nbytes in pool.peak_snap:
            peak[rec.category] += nbytes
        return peak

    # ------------------------------------------------------------ classification
    def _classify(self) -> None:
        """Settle categories: optimizer state < params < grads < buffers < assigned."""
        # FSDP2 swaps sharded and unsharded parameters in and out of the module:
        # both are parameters, so remember every tensor ever seen as one.
        for m in self._modules:
            for p in m.parameters():
                self._params[p] = True
        module_params = list(self._params.keys())
        owned = {id(st) for p in module_params for st in _storages(p)}
        # Storages first seen here (made in another thread) go to their assigned
        # pool at once, so the device budget never counts a host tensor.
        for category, pool, fn in self._assigned:
            if pool is not None:
                self._records_of(fn(), category, pool)
        for opt in _optimizers_within(self._optimizers):
            for rec in self._records_of(list(opt.state.values()), "optimizer"):
                self._set_category(rec, "optimizer")
            for group in opt.param_groups:
                for p in group["params"]:
                    if not isinstance(p, torch.Tensor):
                        continue
                    if not any(id(st) in owned for st in _storages(p)):
                        for rec in self._records_of(p, "optimizer"):
                            self._set_category(rec, "optimizer")
                    for rec in self._records_of(p.grad, "grads"):
                        self._set_category(rec, "grads")
        for p in module_params:
            for rec in self._records_of(p, "params"):
                self._set_category(rec, "params")
        for p in module_params:
            for rec in self._records_of(p.grad, "grads"):
                self._set_category(rec, "grads")
        for m in self._modules:
            for rec in self._records_of(list(m.buffers()), "other"):
                self._set_category(rec, "other")
        for category, pool, fn in self._assigned:
            for rec in self._records_of(fn(), category, pool):
                self._force(rec, category, pool)

    # -------------------------------------------------------------------- hooks
    def _install_module_hooks(self, module: nn.Module) -> None:
        if id(module) not in self._hooked:
            self._hooked.add(id(module))
            self._handles.append(module.register_forward_pre_hook(self._on_input))
            inner = getattr(module, "module", None)
            if isinstance(inner, nn.Module):  # a wrapper: DDP, the course's DDP...
                self._handles.append(
                    module.register_forward_pre_hook(self._on_wrapper_forward)
                )
                self._handles.append(inner.register_forward_pre_hook(self._on_input))
        for p in module.parameters():
            if p.requires_grad and id(p) not in self._hooked:
                self._hooked.add(id(p))
                self._handles.append(
                    p.register_post_accumulate_grad_hook(self._on_grad)
                )

    def _on_wrapper_forward(self, module: nn.Module, args) -> None:
        # What a wrapper allocates before calling its module (DDP rebuilding its
        # gradient buckets in the second step) is a buffer, not an activation.
        self._prologue += 1

    def _on_input(self, module: nn.Module, args) -> None:
        # The input batch is an activation (Linear saves it), also when it was made
        # before `with mem:` or the first mark, or moved to the device by a wrapper.
        self._prologue = 0
        self._drain()
        for rec in self._records_of(args, "activations"):
            if rec.born in ("setup", "prologue") and rec.category == "other":
                self._set_category(rec, "activations")
        self._check_peak()

    def _on_grad(self, param: torch.Tensor) -> None:
        self._drain()
        for rec in self._records_of(param.grad, "grads"):
            self._set_category(rec, "grads")
        self._check_peak()

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread's step: its operations are not seen here either
        self._step_depth += 1

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        if threading.get_ident() != self._thread:
            return
        self._step_depth = max(0, self._step_depth - 1)
        self._drain()
        for rec in self._records_of(list(optimizer.state.values()), "optimizer"):
            self._set_category(rec, "optimizer")
        if self._step_depth == 0:
            # What a step created and kept is optimizer state; what it freed was
            # workspace and stays "other".
            for rec in self._step_born:
                if rec.alive and rec.category == "other" and rec.forced is None:
                    self._set_category(rec, "optimizer")
            self._step_born.clear()
        self._check_peak()

    def _patch_resize(self) -> None:
        # FSDP2 frees and re-allocates unsharded parameters with storage.resize_,
        # which no dispatch mode sees.
        self._orig_resize = orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            result = orig(st, size)
            pool = tracker._pool_of(st)
            if pool is not None:
                tracker._drain()
                rec = tracker._by_storage.get(st)
                if rec is None:
                    if size > 0:
                        tracker._add(st, None, pool)
                elif rec.nbytes != tracker._nbytes(st):
                    tracker._resize(rec, tracker._nbytes(st))
                tracker._check_peak()
            return result

        torch.UntypedStorage.resize_ = resize_

    def _restore_resize(self) -> None:
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize
            self._orig_resize = None


def _optimizers_within(optimizers) -> list[torch.optim.Optimizer]:
    """The optimizers and those they wrap (a ZeroRedundancyOptimizer's ``optim``)."""
    out: list[torch.optim.Optimizer] = []
    stack = list(optimizers)
    while stack:
        opt = stack.pop()
        if any(o is opt for o in out):
            continue
        out.append(opt)
        stack.extend(
            v for v in vars(opt).values() if isinstance(v, torch.optim.Optimizer)
        )
    return out


def _copy_entry(entry: dict) -> dict:
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out[key] = _copy_entry(value)
        else:
            out[key] = value
    return out
