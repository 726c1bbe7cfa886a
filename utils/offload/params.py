"""Parameter offload for ZeRO-3: the shards live on the host, fetched per unit.

Part of chapter 3 ("CPU offloading"). Rajbhandari, Ruwase, Rasley, Smith and He,
"ZeRO-Infinity: Breaking the GPU Memory Wall for Extreme Scale Deep Learning" (SC
2021, arXiv:2104.07857): with ZeRO-3 each rank's parameter shard, its
gradients and its optimizer states can live in CPU memory (or NVMe), and a layer's
shard is brought to the GPU just before the all-gather that needs it. PyTorch's
FSDP2 does the same with ``fully_shard(..., offload_policy=CPUOffloadPolicy())``,
whose docstring says: "Sharded parameters are copied host-to-device before
all-gather ... Sharded gradients are copied device-to-host in backward, and the
optimizer step runs on CPU with CPU optimizer states"
(``torch/distributed/fsdp/_fully_shard/_fsdp_api.py``).

:class:`ParamOffload` is that, as the ``offload=`` hook of the course's
:class:`utils.zero.fsdp.FullyShardedModule`::

    offload = ParamOffload(Transfers(device), track=mem.assign)
    model = FullyShardedModule(GPT(cfg), torch.bfloat16, offload=offload)
    opt = offload.optimizer(model, HostAdamW, lr=1e-3)   # steps on the host

What each of its three methods does (the module calls them):

* ``place(unit)``, once: the unit's fp32 master shard, its 16-bit copy (the
  all-gather input) and its 16-bit gradient buffer move to the host; the
  parameters the optimizer sees become views of the host master. The device keeps
  only the unit's full buffer, empty between uses;
* ``fetch(unit)``, before every all-gather (forward and backward, so twice a
  step): the 16-bit shard is copied up, and that copy is what is gathered. The
  host rounds fp32 to 16 bits and 2 bytes travel; FSDP2 copies the fp32 shard up
  and casts it on the device (``_fsdp_param.py``, ``all_gather_inputs``:
  ``sharded_param_data.to(self.device)`` then ``_to_dtype_if_needed``), 4 bytes;
* ``store(unit, reduced)``, after every reduce-scatter: this rank's averaged
  16-bit gradient is copied down into the host buffer and cast to fp32 there, for
  the host step (the fp32 copy is dropped after the step, as without offload).

Per rank and step, counted: 2 e ceil(Psi / N) bytes up and e ceil(Psi / N) down (e
= 2 in mixed precision, 4 in fp32), against ZeRO-Offload's e + e: the price of
keeping nothing of the model on the device between uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from utils.memory import placement
from utils.offload.transfer import Transfers

__all__ = ["ParamOffload", "host_step"]


def host_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` run in the host pool (``utils.memory.placement``):
    the state it creates and its workspace are host memory. Returns it."""
    step = optimizer.step

    @functools.wraps(step)
    def on_host(*args, **kwargs):
        with placement("host"):
            return step(*args, **kwargs)

    optimizer.step = on_host
    return optimizer


class ParamOffload:
    """The ``offload=`` hook of ``FullyShardedModule``; see the module docstring."""

    def __init__(
        self,
        transfers: Transfers,
        track: Callable[..., object] | None = None,
    ):
        self.transfers = transfers
        self._track = track or (lambda category, tensor, pool=None: None)

    # [param-offload-start]
    @torch.no_grad()
    def place(self, u) -> None:
        """Move a unit's shard, master and gradient buffer to the host."""
        t = self.transfers
        master = t.to_host(u.master)  # once, at construction
        t.synchronize()
        for s in u.params:
            s.param.data = s.shard_view(master)  # what the optimizer updates
        u.master = master
        self._track("optimizer" if u.mixed else "params", master, pool="host")
        if u.mixed:
            with placement("host"):
                u.shard = master.to(u.compute)  # the all-gather's 16-bit input
            self._track("params", u.shard, pool="host")
            u.grad16 = t.host_zeros(u.numel, u.compute)  # the 16-bit gradient
            self._track("grads", u.grad16, pool="host")
        else:
            u.shard = master

    def fetch(self, u) -> torch.Tensor:
        """The shard copied up for one all-gather (freed once it has been sent)."""
        up = self.transfers.to_device(u.shard)
        self._track("other", up)  # a communication buffer, on the device
        return up

    @torch.no_grad()
    def store(self, u, reduced: torch.Tensor) -> torch.Tensor:
        """This rank's averaged gradient, copied down; fp32 on the host."""
        t = self.transfers
        fresh = any(s.param.grad is None for s in u.params)
        if u.mixed:
            t.to_host(reduced, out=u.grad16)  # 16-bit gradients down
            t.synchronize()
            with placement("host"):
                grads = u.grad16.to(u.master.dtype)  # for the host step
        else:
            grads = t.to_host(reduced)
            t.synchronize()
        self._track("grads" if fresh else "other", grads, pool="host")
        return grads

    # [param-offload-end]

    def optimizer(self, model, optimizer_cls, **kwargs) -> torch.optim.Optimizer:
        """``model.optimizer(optimizer_cls, **kwargs)`` (the host shards), stepping
        in the host pool."""
        return host_step(model.optimizer(optimizer_cls, **kwargs))
