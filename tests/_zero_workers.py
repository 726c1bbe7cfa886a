"""Rank functions for tests/test_zero.py (importable, so the ranks find them)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from labs.zero import Config, build_model, worker
from utils.models import MLP, gpt_batch, mlp_batch, shard_batch
from utils.zero.fsdp import FullyShardedModule
from utils.zero.optim import ShardedGradOptimizer, ShardedOptimizer


def reference(cfg: Config) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the whole batch, plain torch AdamW (fp32): what ZeRO must match."""
    model = build_model(cfg, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Tied(nn.Module):
    """An MLP whose first and last weights are one tensor, with a frozen layer."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP((16, 24, 24, 16), seed=3)
        self.mlp[2].weight.requires_grad_(False)  # frozen: never sharded, never moved
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.head = nn.Linear(24, 16)  # its bias is never used: no gradient
        self.head.weight = self.mlp[0].weight  # tied: (24, 16) used twice

    def forward(self, x):
        h = torch.relu(self.mlp[0](x))
        return self.mlp[4](torch.relu(self.mlp[2](h))) + F.linear(
            h, self.head.weight.t()
        )


def _train(model, opt, n, rank, steps=4, sync=True, first=0, micro=1):
    """Adam/SGD steps on this rank's share; ``micro`` micro-batches accumulated."""
    losses = []
    for step in range(first, first + steps):
        x, y = mlp_batch((16, 16), 8, seed=1, step=step)
        if n > 1:
            x, y = shard_batch((x, y), rank, n)
        loss = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            part = F.mse_loss(model(xs).float(), ys) / micro
            part.backward()
            loss = loss + part.detach()
        opt.step()
        opt.zero_grad()
        if sync:
            dist.all_reduce(loss)
            loss /= n
        losses.append(loss.item())
    return losses


def pieces() -> dict:
    """The reusable pieces on a model with a tied and a frozen parameter, two
    parameter groups and several optimizer classes, against one process."""
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, cls, kw in (
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        ("adam", torch.optim.Adam, dict(lr=1e-2)),
    ):
        ref_model = _Tied()
        groups = [
            {"params": ref_model.mlp.parameters(), "lr": kw["lr"] / 2},
            {"params": [ref_model.head.bias]},
        ]
        ref_losses = _train(ref_model, cls(groups, **kw), 1, 0, sync=False)
        for stage, wrapper in ((1, ShardedOptimizer), (2, ShardedGradOptimizer)):
            model = _Tied()
            frozen = model.mlp[2].weight.detach().clone()
            groups = [
                {"params": model.mlp.parameters(), "lr": kw["lr"] / 2},
                {"params": [model.head.bias]},
            ]
            opt = wrapper(groups, cls, bucket_numel=400, **kw)
            losses = _train(model, opt, n, rank, steps=2, micro=stage)
            opt.load_state_dict(opt.state_dict())  # this rank's slice, round trip
            losses += _train(model, opt, n, rank, steps=2, first=2, micro=stage)
            out[f"{name}-stage{stage}"] = {
                "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "param": max(
                    (a - b).abs().max().item()
                    for a, b in zip(model.parameters(), ref_model.parameters())
                ),
                "tied": model.head.weight is model.mlp[0].weight,
                "frozen_moved": (model.mlp[2].weight - frozen).abs().max().item(),
                "grads_left": sum(p.grad is not None for p in model.parameters()),
                "buckets": len(opt.buckets),
                "padding_bytes": opt.padding_bytes,
                "padding_numel": sum(
                    b.layout.padded - b.layout.numel for b in opt.buckets
                ),
                "state_is_shared": opt.state is opt.optim.state,
            }
    # Stage 3 on the same model: any optimizer over the shards, full state dict.
    ref_model = _Tied()
    ref_losses = _train(
        ref_model, torch.optim.Adam(ref_model.parameters(), 1e-2), 1, 0, sync=False
    )
    model = FullyShardedModule(_Tied(), units=[])  # one unit: the root (tied inside)
    layered = FullyShardedModule(_Tied())  # Sequential layers as units, tie at root
    for key, m in (("stage3-root", model), ("stage3-layers", layered)):
        micro = 2 if key == "stage3-layers" else 1  # accumulate 2 micro-batches
        losses = _train(m, torch.optim.Adam(m.parameters(), 1e-2), n, rank, micro=micro)
        state = m.full_state_dict()
        out[key] = {
            "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "param": max(
                (state[k] - v).abs().max().item()
                for k, v in ref_model.state_dict().items()
            ),
            "keys": sorted(state) == sorted(ref_model.state_dict()),
            "units": [u.name for u in m.units],
            "shard_numel": sum(p.numel() for p in m.parameters()),
        }
    return out


def lab_and_pieces(cfgs: list[Config]) -> tuple[list, dict]:
    """Every lab configuration, then :func:`pieces`, in one launch."""
    return [worker(c) for c in cfgs], pieces()
