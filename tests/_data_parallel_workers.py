"""Rank functions for tests/test_data_parallel.py (importable, so ranks find them).

``Toy`` is the awkward model the wrappers must handle: a GPT with tied embedding
and output weights, a frozen parameter, a buffer, a layer used only on some steps
(and on some ranks), and a layer never used at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from labs.data_parallel import worker
from utils.data_parallel.ddp import BucketedDDP, NaiveDDP
from utils.models import GPT, GPTConfig, gpt_batch, shard_batch

GPT_CFG = GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1, n_heads=2)
BATCH = 8
STEPS = 3


class Toy(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.gpt = GPT(GPT_CFG, seed=seed)  # tied: head.weight is tok.weight
        self.gpt.pos.weight.requires_grad_(False)  # frozen
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.extra = nn.Linear(GPT_CFG.vocab_size, GPT_CFG.vocab_size)
            self.never = nn.Linear(4, 4)  # no rank ever uses it
        self.register_buffer("scale", torch.ones(1))

    def forward(self, idx, use_extra: bool):
        logits = self.gpt(idx) * self.scale
        return logits + self.extra(logits) if use_extra else logits


def use_extra(step: int, rank: int) -> bool:
    """Step 0: every rank; step 1: no rank; step 2: rank 0 only."""
    return (True, False, rank == 0)[step % 3]


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    # eps above the default 1e-8: attention's key bias has an exactly-zero gradient
    # in exact arithmetic, so its computed gradient is round-off (~1e-9) that Adam
    # would rescale to a full step, making two correct summation orders differ.
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-6)


def _state(model: nn.Module) -> dict:
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {
        k: None if v.grad is None else v.grad.detach().clone()
        for k, v in model.named_parameters()
    }
    return {"params": params, "grads": grads}


def toy_reference(optimizer: str, world_size: int) -> dict:
    """One process, the full batch: the loss is the mean of the shards' losses."""
    model = Toy()
    opt = make_optimizer(optimizer, model.parameters())
    losses = []
    for step in range(STEPS):
        batch = gpt_batch(GPT_CFG, BATCH, step=step)
        opt.zero_grad()
        loss = 0.0
        for r in range(world_size):
            idx, tgt = shard_batch(batch, r, world_size)
            logits = model(idx, use_extra(step, r))
            loss = loss + F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        loss = loss / world_size
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, **_state(model)}


def train_toy(impl: str, optimizer: str, allreduce="builtin", find_unused=True):
    """Train Toy on this rank's shard with a wrapper; return losses and state."""
    rank, n = dist.get_rank(), dist.get_world_size()
    model = Toy()
    if rank:  # replicas start different: the wrapper must broadcast rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank)
            model.scale.fill_(1 + rank)
    if impl == "ddp":
        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
    else:
        cls = NaiveDDP if impl == "naive" else BucketedDDP
        kw = {"bucket_mb": 0.004} if impl == "bucketed" else {}  # ~1k floats each
        wrapped = cls(
            model, allreduce=allreduce, find_unused_parameters=find_unused, **kw
        )
    opt = make_optimizer(optimizer, wrapped.parameters())
    losses = []
    for step in range(STEPS):
        idx, tgt = shard_batch(gpt_batch(GPT_CFG, BATCH, step=step), rank, n)
        opt.zero_grad()
        logits = wrapped(idx, use_extra=use_extra(step, rank))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        loss.backward()
        if impl != "ddp":
            wrapped.finish_gradient_synchronization()
        opt.step()
        losses.append(loss.item())
    global_losses = torch.tensor(losses)
    dist.all_reduce(global_losses)
    state = _state(model)
    state["scale"] = model.scale.item()
    if impl != "ddp":
        state["buckets"] = len(getattr(wrapped, "buckets", []))
    return {"losses": (global_losses / n).tolist(), **state}


def _numpy(obj):
    """Tensors as numpy arrays: a torch tensor returned by a rank is shared through
    a file descriptor that dies with the rank, so results cross as plain arrays."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    return obj


def wrapper_cases(cases: list[dict]) -> list[dict]:
    """Several ``train_toy`` runs in one launch (a launch costs more than a run)."""
    return [_numpy(train_toy(**case)) for case in cases]


def lab_runs(cfgs: list) -> list:
    """Several lab runs (``labs.data_parallel.worker``) in one launch."""
    return [worker(cfg) for cfg in cfgs]


def double_backward():
    """A second backward before finish_gradient_synchronization must be refused."""
    model = BucketedDDP(nn.Linear(4, 4), bucket_mb=1)
    x = torch.ones(2, 4)
    model(x).sum().backward()
    model(x).sum().backward()
