"""Rank functions for tests/test_model_parallel.py (importable: the ranks find them
by module path).

``suite(cfgs, checked)`` runs the lab's worker for every configuration in one set
of ranks, then, for each of ``checked``, one training step of the lab's own
``train_step`` counted twice: by the lab's counters (the scratch layers' meter,
or ``TPCollectiveCounter`` for torch) and by torch's ``CommDebugMode``.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn import functional as F

import labs.model_parallel as lab
from tests._model_parallel_workers import _kinds
from utils.comm import CommMeter
from utils.lab import PhaseClock
from utils.launch import rank_device
from utils.model_parallel.layer_split import LayerGroup
from utils.models import GPT, MLP, gpt_batch, mlp_batch, shard_batch, split_layers


def counted_twice(cfg: lab.Config) -> dict:
    """One ``train_step`` of ``cfg`` (tensor mode): our calls by kind, summed over
    the phases, and CommDebugMode's."""
    device = rank_device()
    pm = lab.layout(cfg).build(device.type)
    meter = CommMeter()
    phase = lab.Phases(PhaseClock(device), meter, wire=False)
    model = GPT(cfg.gpt(), seed=cfg.seed).to(device)
    model, loss_fn = lab.apply_tensor(model, cfg, pm, meter)
    opt = lab.make_optimizer(model.parameters(), cfg)
    x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=0)
    batch = shard_batch((x.to(device), y.to(device)), pm.coords["dp"], cfg.dp_size)
    counter = lab.TPCollectiveCounter(meter) if cfg.impl == "torch" else None
    with warnings.catch_warnings(), CommDebugMode() as mode:
        warnings.simplefilter("ignore")  # CommDebugMode's module-tracker warnings
        if counter is not None:
            with counter:
                lab.train_step(model, loss_fn, opt, batch, cfg, pm, phase, meter)
        else:
            lab.train_step(model, loss_fn, opt, batch, cfg, pm, phase, meter)
    ours: dict[str, int] = {}
    for calls in phase.by_phase()[1].values():
        for kind, k in calls.items():
            ours[kind] = ours.get(kind, 0) + k
    return {"ours": ours, "comm_debug_mode": _kinds(mode.get_comm_counts())}


def mlp_chain() -> dict:
    """``LayerGroup`` on a plain list of modules (the course MLP's Linear and ReLU
    layers, not the GPT) across all ranks, against the whole MLP: the last rank's
    loss, and every rank's gradients of its own layers."""
    rank, n = dist.get_rank(), dist.get_world_size()
    full = MLP((8, 16, 16, 16, 4), seed=3)
    ref = copy.deepcopy(full)
    x, y = mlp_batch(full.sizes, 6, seed=3)
    ref_loss = F.mse_loss(ref(x), y)
    ref_loss.backward()
    layers = list(full)
    cut = split_layers(len(layers), n)
    starts = [r.start for r in cut]
    shapes = [
        (6, next(m for m in layers[s:] if isinstance(m, nn.Linear)).in_features)
        for s in starts
    ]
    group = LayerGroup(
        [layers[i] for i in cut[rank]],
        rank,
        n,
        prev_rank=rank - 1 if rank > 0 else None,
        next_rank=rank + 1 if rank < n - 1 else None,
        recv_shape=shapes[rank] if rank > 0 else None,
        loss_fn=F.mse_loss,
    )
    loss = group(x if rank == 0 else None, y if rank == n - 1 else None)
    group.backward()
    mine = [i for i in cut[rank] if isinstance(layers[i], nn.Linear)]
    return {
        "loss": None if loss is None else (loss.detach(), ref_loss.detach()),
        "grads": [(layers[i].weight.grad, ref[i].weight.grad) for i in mine],
    }


def suite(cfgs: list, checked: list) -> dict:
    reports = [lab.worker(c) for c in cfgs]
    torch.manual_seed(0)
    return {
        "reports": reports,
        "counted": [counted_twice(c) for c in checked],
        "mlp_chain": mlp_chain(),
    }
