"""What the ZeRO lab needs to compare torch's own implementations with its own.

Part of chapter 2 ("ZeRO"): :func:`full_state` gathers the unsharded weights of
any of the lab's models. (The bytes torch's DDP, ZeroRedundancyOptimizer and FSDP2
send are counted by ``utils.comm.CollectiveCounter``.)
"""

from __future__ import annotations

import torch

__all__ = ["full_state"]


def full_state(model) -> dict[str, torch.Tensor]:
    """Unsharded weights by name, on every rank (a collective where sharded).

    ``model``: a ``utils.zero.fsdp.FullyShardedModule`` (its ``full_state_dict``), a
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
