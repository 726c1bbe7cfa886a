"""What the ZeRO lab needs to measure torch's own implementations like its own.

Part of chapter 2 ("ZeRO"). :class:`CollectiveCounter` counts the bytes of the
collectives that DDP, ZeroRedundancyOptimizer and FSDP2 issue inside torch, with
the same nccl-tests accounting as ``utils.comm`` (a ``CommMeter``);
:func:`full_state` gathers the unsharded weights of any of the lab's models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from utils.comm import CommMeter

__all__ = ["CollectiveCounter", "full_state"]

_C10D = {  # torch.ops.c10d op -> (collective, index of the argument with the buffer)
    "allreduce_": ("all_reduce", 0),
    "broadcast_": ("broadcast", 0),
    "_allgather_base_": ("all_gather", 0),  # (output, input): the full output
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input): full input
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
}


class CollectiveCounter(TorchDispatchMode):
    """Inside ``with CollectiveCounter(meter):`` every collective adds its bytes.

    Each ``torch.distributed`` collective reaches the dispatcher as a
    ``torch.ops.c10d`` op (what torch's ``CommDebugMode`` counts), so a dispatch
    mode sees those issued by DDP's reducer and by FSDP2 too. Sizes are those of
    the full buffer, as ``utils.comm`` records them; the default group's size
    is the ``n`` of the bus factor.
    """

    def __init__(self, meter: CommMeter):
        super().__init__()
        self.meter, self.world_size = meter, dist.get_world_size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "c10d" and name in _C10D:
            op, index = _C10D[name]
            buffers = args[index]
            if isinstance(buffers, torch.Tensor):
                buffers = [buffers]
            size = sum(t.numel() * t.element_size() for t in buffers)
            self.meter.add(op, size, self.world_size)
        return func(*args, **(kwargs or {}))


def full_state(model) -> dict[str, torch.Tensor]:
    """Unsharded weights by name, on every rank (a collective where sharded).

    ``model``: a ``utils.zero3.FullyShardedModule`` (its ``full_state_dict``), a
    DDP wrapper (its ``module``), an FSDP2 module (DTensors, gathered with
    ``full_tensor``) or a plain module.
    """
    if hasattr(model, "full_state_dict"):
        state = model.full_state_dict()
    else:
        state = getattr(model, "module", model).state_dict()
    return {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v.detach()
        for k, v in state.items()
    }
