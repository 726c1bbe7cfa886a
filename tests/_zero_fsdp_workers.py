"""Rank functions for tests/test_zero_fsdp.py (importable, so the ranks find them).

:func:`everything` runs, in one set of ranks, the course's GPT under the course's
``FullyShardedModule`` (prefetch on and off, fp32 and bf16) and under torch's
``fully_shard``, and two plain ``nn.Module``s, each next to a one-process
reference trained in the same rank on the whole batch. Results are tensors and
plain data (pickled back to the test process).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from labs.zero import TINY, apply_torch, build_model
from utils.models import MLP, gpt_batch, mlp_batch, shard_batch
from utils.zero.fsdp import FullyShardedModule
from utils.zero.optim import FlatOptimizer

GPT_STEPS = 3


def _chunk(full: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    """FSDP2's shard of ``full``: ``_chunk_with_empty(full, n, dim=0)[rank]``."""
    full = full.reshape(1) if full.dim() == 0 else full
    chunks = list(torch.chunk(full, n, dim=0))
    while len(chunks) < n:
        chunks.append(full.new_empty((0, *full.shape[1:])))
    return chunks[rank]


def _grads(model) -> dict:
    """Each trainable parameter of the wrapped module: its shard's ``.grad``."""
    out = {}
    module = getattr(model, "module", model)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if hasattr(g, "to_local"):  # FSDP2: a DTensor; its local shard
            g, data = g.to_local(), p.to_local()
        else:
            data = p.data
        out[name] = {
            "grad": None if g is None else g.detach().clone(),
            "shape": tuple(data.shape),
            "dtype": data.dtype,
        }
    return out


# ------------------------------------------------------------------------- the GPT
def gpt_reference(precision: str, steps: int = GPT_STEPS) -> dict:
    """One process, the whole batch: AdamW in fp32; in mixed, a bf16 model with
    fp32 master weights (``FlatOptimizer``, no communication)."""
    cfg = replace(TINY, precision=precision)
    model = build_model(cfg, "cpu")
    if precision == "mixed":
        model = model.to(torch.bfloat16)
        opt = FlatOptimizer(
            model.parameters(),
            torch.optim.AdamW,
            master_dtype=torch.float32,
            lr=cfg.lr,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses, grads = [], []
    for step in range(steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        grads.append({k: p.grad.float().clone() for k, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    master = {}  # the fp32 masters (mixed), under the module's names
    for b in getattr(opt, "buckets", []):
        for p, (start, end) in zip(b.params, b.layout.spans()):
            master[id(p)] = b.master[start:end].view(p.shape)
    params = {
        k: master.get(id(v), v).detach().float().clone()
        for k, v in model.state_dict(keep_vars=True).items()
    }
    return {"losses": losses, "grads": grads, "params": params}


def gpt(
    precision: str,
    impl: str,
    *,
    prefetch: bool = True,
    micro: int = 1,
    steps: int = GPT_STEPS,
) -> dict:
    """The GPT trained for ``steps`` steps on this rank's share of each batch."""
    rank, n = dist.get_rank(), dist.get_world_size()
    cfg = replace(TINY, stage=3, precision=precision)
    model = build_model(cfg, "cpu")
    events = []
    if impl == "scratch":
        model = FullyShardedModule(
            model,
            torch.bfloat16 if precision == "mixed" else None,
            prefetch=prefetch,
            on_event=lambda e, u, ph: events.append(
                (time.perf_counter(), e, u or "root", ph)
            ),
        )
        opt = model.optimizer(torch.optim.AdamW, lr=cfg.lr)
    else:
        model, opt = apply_torch(model, cfg)
    losses, grads, marks = [], [], []
    for step in range(steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        x, y = shard_batch((x, y), rank, n)
        if impl == "scratch":
            model.reset_gathered_peak()
        marks.append(len(events))
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            logits = model(xs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ys.flatten()) / micro
            loss.backward()
            total += loss.detach()
        grads.append(_grads(model))  # at the end of backward
        if impl == "scratch":
            model.finish_gradient_synchronization()  # idempotent: changes nothing
            again = _grads(model)
            for name, g in grads[-1].items():
                assert again[name]["grad"] is not None
                assert torch.equal(again[name]["grad"], g["grad"]), name
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / n)
    if impl == "scratch":
        state = model.full_state_dict()
        peak, unit_bytes = dict(model.gathered_peak), model.unit_bytes()
    else:
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        peak, unit_bytes = None, None
    return {
        "losses": losses,
        "grads": grads,
        "params": {k: v.detach().clone() for k, v in state.items()},
        "events": events,
        "marks": marks,
        "peak": peak,
        "unit_bytes": unit_bytes,
    }


# ------------------------------------------------------------ any nn.Module
class Tied(nn.Module):
    """A tied weight used twice, a frozen one, one that gets no gradient, a 0-dim
    one, and shapes whose first dimension does not divide by 4 (3 < 4 rows too)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.layers = nn.Sequential(
                nn.Linear(6, 9), nn.Linear(9, 3), nn.Linear(3, 6)
            )
            self.frozen = nn.Linear(6, 6)
            self.frozen.requires_grad_(False)
            self.unused = nn.Parameter(torch.randn(5))
            self.scale = nn.Parameter(torch.tensor(0.7))
            self.out = nn.Linear(9, 6)
        self.out.weight = nn.Parameter(self.layers[0].weight.detach().t().clone())
        self.back = nn.Linear(6, 9, bias=False)
        self.back.weight = self.layers[0].weight  # tied: (9, 6) used twice

    def forward(self, x):
        h = torch.tanh(self.layers[0](x))
        z = self.layers[2](torch.tanh(self.layers[1](h))) + self.frozen(x)
        return self.scale * F.linear(h, self.back.weight.t()) + self.out(h) + z


def _module(kind: str) -> nn.Module:
    return MLP((6, 10, 7, 6), seed=2) if kind == "mlp" else Tied()


def module(kind: str, steps: int = 3) -> dict:
    """``kind`` ("mlp" or "tied") sharded, against one process; Adam, 2 micro-batches
    on the tied model. Returns both sides' losses, full parameters and gradients."""
    rank, n = dist.get_rank(), dist.get_world_size()
    micro = 2 if kind == "tied" else 1
    ref = _module(kind)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], 0.02)
    model = FullyShardedModule(_module(kind))
    opt = model.optimizer(torch.optim.Adam, lr=0.02)
    out = {"losses": [], "ref_losses": [], "grads": [], "ref_grads": []}
    for step in range(steps):
        x, y = mlp_batch((6, 6), 8, seed=3, step=step)
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        out["ref_losses"].append(loss.item())
        out["ref_grads"].append(
            {
                k: None if p.grad is None else _chunk(p.grad, n, rank)
                for k, p in ref.named_parameters()
                if p.requires_grad
            }
        )
        ref_opt.step()
        ref_opt.zero_grad()
        xs, ys = shard_batch((x, y), rank, n)
        total = torch.zeros(())
        for xm, ym in zip(xs.chunk(micro), ys.chunk(micro)):
            part = F.mse_loss(model(xm), ym) / micro
            part.backward()
            total += part.detach()
        out["grads"].append(_grads(model))
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        out["losses"].append(total.item() / n)
    out["params"] = model.full_state_dict()
    out["ref_params"] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    if kind == "tied":
        out["tied"] = model.module.back.weight is model.module.layers[0].weight
    out["units"] = [u.name for u in model.units]
    return out


def everything(gpt_runs: list[dict], modules: list[str]) -> dict:
    """All of the above in one launch: ``gpt_runs`` are keyword arguments of
    :func:`gpt`; the one-process references are computed here too."""
    out = {"gpt": [], "modules": {}, "references": {}}
    for kw in gpt_runs:
        out["gpt"].append(gpt(**kw))
    if dist.get_rank() == 0:
        for precision in sorted({kw["precision"] for kw in gpt_runs}):
            out["references"][precision] = gpt_reference(precision)
    for kind in modules:
        out["modules"][kind] = module(kind)
    return out
