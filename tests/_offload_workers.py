"""Rank functions for tests/test_offload.py (importable, so the ranks find them)."""

from __future__ import annotations

import copy
import threading

import torch
import torch.distributed as dist
from torch.nn import functional as F

from labs.offload import Config, build_model, worker
from utils.models import MLP, gpt_batch, mlp_batch, shard_batch
from utils.offload.adam import HostAdamW
from utils.offload.optim import OffloadOptimizer
from utils.offload.transfer import Transfers


def reference(cfg: Config, delayed: bool = False):
    """One process, the whole batch, torch AdamW in fp32: what every mode must
    match; ``delayed``: the one-step delayed parameter update (the forward of step
    k + 1 runs on the parameters updated with the gradients up to step k - 1)."""
    model = build_model(cfg, "cpu")
    master = copy.deepcopy(model)
    opt = torch.optim.AdamW((master if delayed else model).parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss.item())
        if delayed:
            with torch.no_grad():
                for p, m in zip(model.parameters(), master.parameters()):
                    m.grad = p.grad
                    p.copy_(m)  # what the last update gave, published now
                    p.grad = None
        opt.step()
        opt.zero_grad()
    if delayed:  # finish(): the last update
        model.load_state_dict(master.state_dict())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def pieces() -> dict:
    """OffloadOptimizer on its own: any optimizer (SGD with momentum), micro-batch
    accumulation, against one process; bytes moved per step counted."""
    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, cls, kw in (
        ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        ("adam", torch.optim.Adam, dict(lr=1e-2)),
    ):
        for offload_grads in (True, False):
            ref = MLP((16, 24, 24, 16), seed=3)
            mine = copy.deepcopy(ref)
            ref_opt = cls(ref.parameters(), **kw)
            transfers = Transfers("cpu")
            opt = OffloadOptimizer(
                mine.parameters(),
                cls,
                offload_grads=offload_grads,
                bucket_numel=500,
                transfers=transfers,
                **kw,
            )
            moved = []
            for step in range(3):
                x, y = mlp_batch((16, 16), 8, seed=1, step=step)
                F.mse_loss(ref(x), y).backward()
                ref_opt.step()
                ref_opt.zero_grad()
                transfers.reset()
                xs, ys = shard_batch((x, y), rank, n)
                for xm, ym in zip(xs.chunk(2), ys.chunk(2)):  # two micro-batches
                    (F.mse_loss(mine(xm), ym) * xm.shape[0] / xs.shape[0]).backward()
                opt.step()
                opt.zero_grad()
                moved.append(dict(transfers.bytes))
            diff = max(
                (a - b).abs().max().item()
                for a, b in zip(ref.parameters(), mine.parameters())
            )
            out[f"{name}-{offload_grads}"] = dict(
                diff=diff,
                moved=moved,
                shard_bytes=sum(b.layout.shard_numel * 4 for b in opt.buckets),
                buckets=len(opt.buckets),
            )
    return out


class _GatedAdamW(HostAdamW):
    """HostAdamW that notes the thread of each step and, while ``gate`` is shut,
    waits at the start of the step (so a test holds an update in flight)."""

    def __init__(self, params, *, gate, started, threads, **kwargs):
        super().__init__(params, **kwargs)
        self.gate, self.started, self.threads = gate, started, threads

    def step(self, closure=None):
        self.threads.append(threading.get_ident())
        self.started.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the gate of _GatedAdamW never opened")
        return super().step(closure)


def delayed_thread() -> dict:
    """OffloadOptimizer(delayed_update=True): which thread ran each host update,
    and whether the thread changed what the calling thread's memory ledger reads
    at a mark (the masters' ``.grad``, the wrapped optimizer's state tensors).
    Deterministic: the second update is held at a gate while we look."""
    gate, started, threads = threading.Event(), threading.Event(), []
    gate.set()
    model = MLP((16, 24, 16), seed=3)
    opt = OffloadOptimizer(
        model.parameters(), _GatedAdamW, delayed_update=True, bucket_numel=200,
        lr=1e-2, gate=gate, started=started, threads=threads,
    )  # fmt: skip
    masters = [b.master for b in opt.buckets]

    def backward(step):
        x, y = mlp_batch((16, 16), 8, seed=1, step=step)
        F.mse_loss(model(x), y).backward()

    def state_tensors():
        return {
            (id(p), k, id(v))
            for p, s in opt.state.items()
            for k, v in s.items()
            if isinstance(v, torch.Tensor)
        }

    out = {"main": threading.get_ident(), "buckets": len(masters)}
    backward(0)
    opt.step()  # the first update: it creates the state
    opt.zero_grad()
    out["first"] = dict(
        grads_none=[m.grad is None for m in masters], states=len(opt.state)
    )
    backward(1)
    gate.clear()
    started.clear()
    opt.step()  # the second: in flight, held at the gate
    out["held"] = started.wait(timeout=60)
    grads, state = [m.grad for m in masters], state_tensors()
    gate.set()
    if opt._worker is not None:  # wait for the update itself, not for step()
        opt._worker.join()
    out["in_flight"] = dict(
        grads_set=[g is not None for g in grads],
        same_grads=[m.grad is g for m, g in zip(masters, grads)],
        same_state=state_tensors() == state,
    )
    opt.finish()
    out["finished_grads_none"] = [m.grad is None for m in masters]
    out["threads"] = threads
    return out


def lab_and_pieces(cfgs: list[Config]) -> tuple[list, dict, dict]:
    """The lab for each configuration, then the pieces, then the delayed update's
    thread."""
    return [worker(c) for c in cfgs], pieces(), delayed_thread()
