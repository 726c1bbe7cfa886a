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
allocates without an aten op (gloo's scratch space), and, on a device tracker,
tensors on other devices (use a second tracker for host memory when offloading).
An optimizer that does not subclass ``torch.optim.Optimizer`` has no step hooks:
``assign`` its state.
"""

from __future__ import annotations

import collections
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

from utils.report import CATEGORIES

__all__ = ["MemoryTracker", "tensor_bytes"]

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


class _Record:
    """One live storage in the ledger."""

    __slots__ = ("nbytes", "category", "forced", "born", "alive", "ref")

    def __init__(self, nbytes: int, category: str, born: str | None):
        self.nbytes = nbytes
        self.category = category
        self.forced: str | None = None
        self.born = born  # "setup", "step", "prologue" or None (forward/backward)
        self.alive = True
        self.ref: weakref.ref | None = None


class MemoryTracker(TorchDispatchMode):
    """Per-rank memory timeline by category; see the module docstring.

    ``device``: the device whose memory is counted (tensors elsewhere, e.g. Adam's
    CPU ``step`` counters on a CUDA run, are ignored; use a second tracker for host
    memory when offloading).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._cuda = device.type == "cuda"
        self._by_storage = WeakIdKeyDictionary()  # storage -> _Record
        self._live: dict[int, _Record] = {}
        self._totals = dict.fromkeys(CATEGORIES, 0)
        self._pending: collections.deque[_Record] = collections.deque()
        self._peak_total = 0
        self._at_peak = True  # the current state is the phase's (unsnapshotted) peak
        self._peak_snap: list[tuple[_Record, int]] = []
        self._modules: list[nn.Module] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._assigned: list[tuple[str, Callable[[], Any]]] = []
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

    def assign(self, category: str, tensors) -> MemoryTracker:
        """File ``tensors`` under ``category`` whatever else they look like.

        ``tensors``: a tensor, an iterable of tensors, or a zero-argument callable
        returning them, called again at every mark (for buffers that are replaced).
        E.g. ``assign("optimizer", master_shard)``, ``assign("grads", lambda:
        opt.grad_shard)``, ``assign("other", bucket)``. The last assignment wins.
        """
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        if callable(tensors):
            self._assigned.append((category, tensors))
        else:  # pin the storages now: the caller may drop its references
            for rec in self._records_of(tensors, category):
                rec.forced = category
                self._set_category(rec, category)
        self._classify()
        self._check_peak()
        return self

    def mark(self, phase: str, step: int | None = None) -> dict:
        """End a phase: record current bytes by category and the phase's peak.

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
        current = dict(self._totals)
        peak = self._peak_breakdown()
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
        self._timeline.append(entry)
        self._marked = True
        self._reset_peak()
        return _copy_entry(entry)

    def timeline(self) -> list[dict]:
        """The phases so far: ``{"phase", "step", "current", "peak", "peak_total",
        "ledger", "allocator"}``; plain ints and dicts (JSON-able, picklable).

        "current"/"peak" have exactly the keys of ``CATEGORIES``; "allocator" is None
        on CPU, ``{"current", "peak", "reserved"}`` on CUDA.
        """
        return [_copy_entry(e) for e in self._timeline]

    def current(self) -> dict[str, int]:
        """Live bytes by category right now, as the ledger sees them (no mark)."""
        self._drain()
        self._classify()
        return dict(self._totals)

    # ----------------------------------------------------------- context manager
    def __enter__(self) -> MemoryTracker:
        if self._depth == 0:
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

    def _records_of(self, tensors, category: str | None) -> list[_Record]:
        """Ledger records for ``tensors`` (new ones created as ``category``, or as
        :meth:`_birth` says when None)."""
        out = []
        for t in _tensors(tensors):
            for st in _storages(t):
                if st.device != self.device:
                    continue
                rec = self._by_storage.get(st)
                if rec is None:
                    rec = self._add(st, category)
                elif rec.nbytes != self._nbytes(st):
                    self._resize(rec, self._nbytes(st))
                out.append(rec)
        return out

    def _nbytes(self, st: torch.UntypedStorage) -> int:
        n = st.nbytes()
        return -(-n // _CUDA_BLOCK) * _CUDA_BLOCK if self._cuda else n

    def _add(self, st: torch.UntypedStorage, category: str | None) -> _Record:
        born_as, born = self._birth()
        if category is None:
            category = born_as
        rec = _Record(self._nbytes(st), category, born)
        pending = self._pending
        rec.ref = weakref.ref(st, lambda _ref, rec=rec: pending.append(rec))
        self._by_storage[st] = rec
        self._live[id(rec)] = rec
        self._totals[category] += rec.nbytes
        if born == "step":
            self._step_born.append(rec)
        return rec

    def _drain(self) -> None:
        """Apply the frees the weak references reported."""
        while self._pending:
            rec = self._pending.popleft()
            if not rec.alive:
                continue
            self._before_decrease()
            rec.alive = False
            self._live.pop(id(rec), None)
            self._totals[rec.category] -= rec.nbytes

    def _resize(self, rec: _Record, nbytes: int) -> None:
        if nbytes < rec.nbytes:
            self._before_decrease()
        self._totals[rec.category] += nbytes - rec.nbytes
        rec.nbytes = nbytes

    def _set_category(self, rec: _Record, category: str) -> None:
        if rec.forced is not None:
            category = rec.forced
        if rec.alive and rec.category != category:
            self._totals[rec.category] -= rec.nbytes
            self._totals[category] += rec.nbytes
        rec.category = category

    def _before_decrease(self) -> None:
        # Memory is about to go down: if we stand at the phase's peak, remember which
        # storages made it up; they are filed by category only at the mark.
        if self._at_peak:
            self._peak_snap = [(r, r.nbytes) for r in list(self._live.values())]
            self._at_peak = False

    def _check_peak(self) -> None:
        total = sum(self._totals.values())
        if total > self._peak_total:
            self._peak_total = total
            self._at_peak = True

    def _reset_peak(self) -> None:
        self._peak_total = sum(self._totals.values())
        self._at_peak = True
        self._peak_snap = []

    def _peak_breakdown(self) -> dict[str, int]:
        if self._at_peak:
            return dict(self._totals)
        peak = dict.fromkeys(CATEGORIES, 0)
        for rec, nbytes in self._peak_snap:
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
        for category, fn in self._assigned:
            for rec in self._records_of(fn(), category):
                rec.forced = category
                self._set_category(rec, category)

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
        self._step_depth += 1

    def _on_step_post(self, optimizer, args, kwargs) -> None:
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
            if st.device == tracker.device:
                tracker._drain()
                rec = tracker._by_storage.get(st)
                if rec is None:
                    if size > 0:
                        tracker._add(st, None)
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
