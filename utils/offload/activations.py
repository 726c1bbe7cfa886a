"""Activation policies for any module: keep, offload to the host, or recompute.

Part of chapter 3 ("CPU offloading"). What backward needs from forward (the saved
activations) is most of a transformer's memory at any real batch (Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models", 2022, section
4.1: sbh(34 + 5as/h) bytes per layer in 16-bit). Two ways to keep it off the device:

* **offload**: each saved tensor is copied to the host when forward saves it and
  back when backward needs it (``torch.autograd.graph.save_on_cpu``): device memory
  for PCIe traffic, twice the saved bytes per step;
* **recompute** (activation checkpointing, Chen et al., "Training Deep Nets with
  Sublinear Memory Cost", 2016; ``torch.utils.checkpoint``): a layer keeps only
  its input, and backward runs its forward again to get the rest: Korthikanti et
  al.'s "full activation recomputation", 2sbh bytes per layer (Table 2), for one
  more forward of the layer per step.

:func:`apply_activations` applies one to each *unit* of a model (by default each
layer: ``utils.zero.fsdp.default_units``), by wrapping the unit's ``forward`` (the
module, its parameters and their names stay as they are)::

    apply_activations(model, "offload", transfers=Transfers(device))
    apply_activations(model, "recompute")
    apply_activations(model, "recompute", impl="torch")   # torch.utils.checkpoint

The course's pieces (``impl="scratch"``):

* :class:`OffloadActivations`, saved-tensor hooks like ``save_on_cpu`` with two
  differences: a storage that several operations save (a layer norm's output,
  saved by q, k and v) is copied once, not once per save, and parameters are left
  where they are (``save_on_cpu`` copies the weights a matmul saves too). Its
  copies go through :class:`utils.offload.transfer.Transfers`, counted;
* :func:`recompute`, the classic form of checkpointing as an autograd Function:
  forward runs the layer without recording a graph and saves its inputs; backward
  runs it again with the graph on and back-propagates through it (what
  ``checkpoint(use_reentrant=True)`` does; the RNG state is replayed, so dropout
  draws the same mask).

``impl="torch"``: ``save_on_cpu`` (``pin_memory`` on a GPU) and
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. On the CPU fallback
``save_on_cpu`` copies nothing (``tensor.cpu()`` is the tensor itself), so there
the memory ledger files what it keeps in the host pool (``track``): the placement
it would have on a GPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from utils.checks import check_choice
from utils.offload.transfer import Transfers
from utils.zero.fsdp import default_units

__all__ = [
    "ACTIVATION_POLICIES",
    "ACTIVATION_IMPLS",
    "OffloadActivations",
    "apply_activations",
    "recompute",
]

ACTIVATION_POLICIES = ("none", "offload", "recompute")
ACTIVATION_IMPLS = ("scratch", "torch")


def _param_storages(module: nn.Module) -> set[int]:
    """Data pointers of the parameters' storages (a DTensor's local shard; a
    storage FSDP has freed, ``resize_(0)``, holds nothing to keep)."""
    out = set()
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        try:
            out.add(local.untyped_storage().data_ptr())
        except RuntimeError:
            continue
    return out


# [offload-activations-start]
class _Packed:
    """One device storage's bytes on the host, and its device copy in backward:
    held from the first unpack to the last (``saves`` counts them), then only
    weakly, so a storage saved by several operations comes up once."""

    __slots__ = ("host", "device", "saves", "left", "held", "on_device")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device
        self.saves = self.left = 0
        self.held: torch.UntypedStorage | None = None
        self.on_device: weakref.ref | None = None


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep what forward saves on the host (a context
    manager, entered around forward; backward needs nothing more)."""

    def __init__(self, transfers: Transfers, keep: Callable[[torch.Tensor], bool]):
        self.transfers, self.keep = transfers, keep
        self._packed = WeakIdKeyDictionary()  # device storage -> _Packed
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if self.keep(t):  # a parameter (or a view of one): it stays on the device
            return t.detach()
        st = t.untyped_storage()
        packed = self._packed.get(st)
        if packed is None:  # each storage goes down once, however many views saved
            whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
            packed = _Packed(self.transfers.to_host(whole), t.device)
            self._packed[st] = packed
        packed.saves += 1
        packed.left = packed.saves
        return packed, t.dtype, t.size(), t.stride(), t.storage_offset()

    def _unpack(self, saved) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        packed, dtype, size, stride, offset = saved
        st = packed.held
        if st is None and packed.on_device is not None:
            st = packed.on_device()
        if st is None:  # up again: once per backward for each storage
            self.transfers.synchronize()
            st = self.transfers.to_device(packed.host).untyped_storage()
            packed.on_device = weakref.ref(st)
        packed.left -= 1
        packed.held = st if packed.left > 0 else None  # until its last use
        return torch.empty(0, dtype=dtype, device=packed.device).set_(
            st, offset, size, stride
        )


# [offload-activations-end]


# [recompute-start]
class _Recompute(torch.autograd.Function):
    """Forward without a graph, keeping the inputs; backward: forward again, with
    the graph, then back-propagate through it. The parameters' gradients are
    accumulated by that inner backward. A last, empty input that needs a gradient
    makes the output need one when the layer's inputs do not (a first layer)."""

    @staticmethod
    def forward(ctx, fn, rng, *inputs_and_anchor):
        inputs = inputs_and_anchor[:-1]
        ctx.fn, ctx.rng = fn, rng
        ctx.save_for_backward(*inputs)  # all the layer keeps: its input
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.random.fork_rng(devices=ctx.rng[1]), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for device, state in zip(ctx.rng[1], ctx.rng[2]):
                torch.cuda.set_rng_state(state, device)
            outputs = ctx.fn(*inputs)  # the layer's activations, made again
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads_in = [x.grad if x.requires_grad else None for x in inputs]
        return (None, None, *grads_in, None)


def recompute(fn: Callable, *inputs: torch.Tensor):
    """``fn(*inputs)`` keeping only ``inputs`` for backward (tensors only)."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("recompute() takes tensor inputs only")
    cuda = sorted({x.device.index or 0 for x in inputs if x.device.type == "cuda"})
    rng = (torch.get_rng_state(), cuda, [torch.cuda.get_rng_state(d) for d in cuda])
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    return _Recompute.apply(fn, rng, *inputs, anchor)


# [recompute-end]


class _TrackedSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's ``save_on_cpu``, telling the ledger what it keeps on the host; on
    the CPU fallback, where it makes no copy, that is the saved storage itself."""

    def __init__(self, pin_memory: bool, device_type: str, keep, track):
        super().__init__(pin_memory=pin_memory, device_type=device_type)
        pack = self.pack_hook

        def pack_hook(t):
            device, saved = pack(t)
            if saved.device.type == "cpu" and not keep(t):
                track("activations", saved, pool="host")
            return device, saved

        self.pack_hook = pack_hook


def apply_activations(
    model: nn.Module,
    policy: str,
    *,
    impl: str = "scratch",
    units: Iterable[nn.Module] | None = None,
    transfers: Transfers | None = None,
    track: Callable[..., object] | None = None,
) -> nn.Module:
    """Apply ``policy`` ("none", "offload", "recompute") to each unit's forward.

    ``units``: the modules to wrap (default: ``default_units(model)``, the layers;
    ``[model]`` for the whole forward). ``transfers`` counts the scratch offload's
    copies (required for it). ``track(category, tensor, pool=...)``
    (``MemoryTracker.assign``) files torch's ``save_on_cpu`` tensors in the host
    pool. Returns ``model``, changed in place.
    """
    check_choice("policy", policy, ACTIVATION_POLICIES)
    check_choice("impl", impl, ACTIVATION_IMPLS)
    units = list(default_units(model) if units is None else units)
    if not units:
        raise ValueError("no unit to apply the activation policy to")
    if policy == "none":
        return model
    keep = _Keep(model)
    if policy == "offload" and impl == "scratch":
        if transfers is None:
            raise ValueError("offload needs transfers=Transfers(device)")
        hooks = OffloadActivations(transfers, keep)
        context = lambda: hooks  # noqa: E731  (one set of hooks: shared storages)
    elif policy == "offload":
        device = next(model.parameters()).device
        track = track or (lambda category, tensor, pool=None: None)
        context = lambda: _TrackedSaveOnCpu(  # noqa: E731
            device.type == "cuda", "cuda", keep, track
        )
    for unit in units:
        inner = unit.forward
        if policy == "recompute" and impl == "scratch":
            unit.forward = _wrap(inner, recompute)
        elif policy == "recompute":
            unit.forward = _wrap(inner, _torch_checkpoint)
        else:
            unit.forward = _wrap(inner, _within(context, keep))
    return model


class _Keep:
    """Is a saved tensor a parameter (or a view of one)? Re-read at each forward,
    since ZeRO's flat buckets re-point parameters after the policy is applied."""

    def __init__(self, model: nn.Module):
        self.model, self.storages = model, set()

    def refresh(self) -> None:
        self.storages = _param_storages(self.model)

    def __call__(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.storages


def _within(context, keep: _Keep):
    def call(fn, *args, **kwargs):
        keep.refresh()
        with context():
            return fn(*args, **kwargs)

    return call


def _torch_checkpoint(fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _wrap(inner, policy):
    def forward(*args, **kwargs):
        return policy(inner, *args, **kwargs)

    forward.__wrapped__ = inner
    return forward
