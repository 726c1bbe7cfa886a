"""ZeRO stage 3 from scratch: a module wrapper that shards the parameters too.

Introduced in chapter 2 ("ZeRO"); ``labs/zero.py`` is one client, the tests another.
Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (SC 2020, arXiv:1910.02054), section 5.3 (P_os+g+p) and 7.2.2: each rank
keeps 1/N of every parameter; a layer's full parameters are all-gathered just before
its forward and again before its backward, and freed right after each, so a rank
holds the whole of only one layer at a time. Communication per step: an all-gather
in forward, one in backward and a reduce-scatter of the gradients, 3 Psi (N-1)/N
elements per rank, 1.5 times data parallelism. PyTorch's FSDP (Zhao et al., "PyTorch
FSDP: Experiences on Scaling Fully Sharded Data Parallel", VLDB 2023) is this
design; ``torch.distributed.fsdp.fully_shard`` (FSDP2) is the version the lab
compares with. Inside a rank::

    model = FullyShardedModule(GPT(cfg))               # or compute_dtype=torch.bfloat16
    opt = torch.optim.AdamW(model.parameters())        # the shards: any optimizer
    loss_fn(model(x_local), y_local).backward()        # gathers, frees, reduce-scatters
    opt.step(); opt.zero_grad()
    weights = model.full_state_dict()                  # collective: every rank calls it

Units. The parameters are grouped into units, by default each element of every
``nn.ModuleList``/``nn.Sequential`` (the layers) plus the root for the rest. A
parameter shared by several modules (tied embeddings) goes to the smallest unit that
holds all of them, here the root: it is gathered once for the whole forward, as
FSDP does. Each unit's trainable parameters live in one flat buffer padded to divide
by N; the module's parameters stay views into it, and freeing is
``storage.resize_(0)``, so tensors autograd saved in forward (views of a weight)
see the data again once backward re-gathers it: FSDP's trick.

Hooks: a forward pre-hook gathers, a forward hook frees and puts a hook on the
outputs' gradients, which re-gathers before the unit's backward; a hook on each
parameter's gradient accumulation counts the unit's gradients and, once all are
there, reduce-scatters them into this rank's shard and frees the full parameters
and gradients. A callback at the end of backward reduces what never got a gradient.

``compute_dtype=torch.bfloat16``: shards, gathers, compute and gradients in bf16
(the paper's 2 + 2 bytes); keep the fp32 master weights in the optimizer with
:meth:`FullyShardedModule.optimizer`. Frozen parameters are cast to the compute
dtype and kept whole on every rank; floating inputs are cast too (as FSDP2 does).
Wrap the root module and use ``model.parameters()`` of the wrapper: the wrapped
module's own parameters are views with no storage outside forward and backward.
"""

from __future__ import annotations

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
from utils.flat import FlatLayout
from utils.zero.optim import FlatOptimizer

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


class _Unit:
    """The parameters gathered and freed together, their shard and their full buffer."""

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]):
        self.name, self.module, self.params = name, module, params
        self.gathered = False
        self.ready = 0  # gradients accumulated in this backward
        self.reduced = False


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
    ):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("FullyShardedModule runs inside a rank: init the group")
        self.module = module
        self.compute_dtype = compute_dtype
        self.group, self.meter = group, meter
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._track = track or (lambda category, tensor: None)
        self._on_event = on_event or (lambda event, unit, phase: None)
        self._in_backward = False
        names = {id(m): n for n, m in module.named_modules()}
        chosen = [m for m in (default_units(module) if units is None else units)]
        chosen = [m for m in chosen if m is not module] + [module]
        # Innermost first, so a parameter goes to the smallest unit holding all uses.
        chosen.sort(key=lambda m: sum(1 for _ in m.modules()))
        owners: dict[int, list[nn.Module]] = {}
        params: dict[int, nn.Parameter] = {}
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(m)
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
                if all(id(o) in inside for o in owners[pid]):
                    assigned[id(m)].append(p)
                    break
        self.units = [
            self._shard(_Unit(names.get(id(m), "?"), m, assigned[id(m)]))
            for m in sorted(chosen, key=lambda m: list(names).index(id(m)))
            if assigned[id(m)]
        ]

    # -- construction -----------------------------------------------------------------
    @torch.no_grad()
    def _shard(self, u: _Unit) -> _Unit:
        dtypes = {p.dtype for p in u.params}
        if self.compute_dtype is None and len(dtypes) > 1:
            raise ValueError(
                f"unit {u.name!r} mixes dtypes {dtypes}: pass compute_dtype"
            )
        dtype = self.compute_dtype or dtypes.pop()
        u.layout = FlatLayout((p.numel() for p in u.params), self.world_size)
        full = torch.zeros(u.layout.padded, dtype=dtype, device=u.params[0].device)
        for p, (a, b) in zip(u.params, u.layout.spans()):
            full[a:b].copy_(p.detach().reshape(-1))
        broadcast_from_first_rank([full], group=self.group)  # rank 0's weights
        start, end = u.layout.shard(self.rank)
        u.shard = nn.Parameter(full[start:end].clone())
        for p, (a, b) in zip(u.params, u.layout.spans()):
            p.data = full[a:b].view_as(p)  # views forever; the storage comes and goes
        u.full, u.full_bytes = full, full.untyped_storage().nbytes()
        full.untyped_storage().resize_(0)
        self._track("params", full)
        for p in u.params:
            p.register_post_accumulate_grad_hook(partial(self._on_grad, u))
        u.module.register_forward_pre_hook(partial(self._pre_forward, u))
        u.module.register_forward_hook(partial(self._post_forward, u))
        return u

    # [zero3-gather-start]
    # -- gather, free, reduce ---------------------------------------------------------
    @torch.no_grad()
    def _gather(self, u: _Unit, phase: str, meter=None) -> None:
        if u.gathered:
            return
        u.full.untyped_storage().resize_(u.full_bytes)
        all_gather(u.full, u.shard.detach(), meter=meter, group=self.group)
        u.gathered = True
        self._on_event("gather", u.name, phase)

    def _free(self, u: _Unit, phase: str) -> None:
        if u.gathered:
            u.full.untyped_storage().resize_(0)
            u.gathered = False
            self._on_event("free", u.name, phase)

    @torch.no_grad()
    def _reduce(self, u: _Unit) -> None:
        grads = torch.zeros(u.layout.padded, dtype=u.full.dtype, device=u.full.device)
        self._track("other", grads)  # a communication buffer
        for p, (a, b) in zip(u.params, u.layout.spans()):
            if p.grad is not None:
                grads[a:b].copy_(p.grad.reshape(-1))
            p.grad = None  # the full gradient is freed as soon as it is reduced
        mine = torch.empty_like(u.shard)
        reduce_scatter(mine, grads, meter=self.meter, group=self.group)
        mine.div_(self.world_size)
        if u.shard.grad is None:
            u.shard.grad = mine
        else:
            u.shard.grad.add_(mine)  # accumulation, or an optimizer's gradient view
        u.ready, u.reduced = 0, True
        self._on_event("reduce-scatter", u.name, "backward")

    # [zero3-gather-end]

    # [zero3-hooks-start]
    # -- hooks ------------------------------------------------------------------------
    def _pre_forward(self, u: _Unit, module, args) -> None:
        self._gather(u, "forward", self.meter)

    def _post_forward(self, u: _Unit, module, args, output) -> None:
        if torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(partial(self._pre_backward, u))
        self._free(u, "forward")

    def _pre_backward(self, u: _Unit, grad) -> None:
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if not u.reduced:
            self._gather(u, "backward", self.meter)

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
            u.reduced = False
        self._in_backward = False

    # [zero3-hooks-end]

    # -- the public face --------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.compute_dtype is not None:
            cast = partial(_cast, dtype=self.compute_dtype)
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return self.module(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, **kwargs):
        """This rank's flat shards, one per unit: what an optimizer should update."""
        for u in self.units:
            yield f"{prefix}{'.' if prefix else ''}{u.name or 'root'}.shard", u.shard

    @property
    def padding_bytes(self) -> int:
        """Zero padding in the flat buffers (all of it in the last rank's shard)."""
        return sum(u.layout.padding * u.full.element_size() for u in self.units)

    def unit_bytes(self) -> dict[str, int]:
        """Bytes of each unit's full (gathered) parameters, by unit name."""
        return {u.name or "root": u.full_bytes for u in self.units}

    def optimizer(self, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
        """``optimizer_cls`` over the shards, with fp32 master weights if 16-bit."""
        if self.compute_dtype in (None, torch.float32):
            return optimizer_cls(self.parameters(), **kwargs)
        return FlatOptimizer(
            self.parameters(),
            optimizer_cls,
            master_dtype=torch.float32,
            track=self._track,
            **kwargs,
        )

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights under the wrapped module's names (a collective)."""
        for u in self.units:
            self._gather(u, "state_dict")  # not metered: not part of a training step
        out = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for u in self.units:
            self._free(u, "state_dict")
        return out

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
