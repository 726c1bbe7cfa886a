"""Rank functions for tests/test_data_parallel_sync.py (importable, so ranks find them).

Each rank runs ``M`` micro-batches per step in a schedule written as a string of
forwards and backwards, ``"F0 F1 B0 F2 B1 B2"`` (1F1B-like) or ``"F0 F1 F2 B0 B1
B2"`` (all forwards, then all backwards, GPipe's order), and chooses which backward
synchronises with one of the two switches of ``utils.data_parallel.ddp``:

- ``mode="flag"``: ``set_requires_gradient_sync(k == last)`` just before backward k,
  as picotron's pipeline schedules set DP's flag (huggingface/picotron,
  picotron/pipeline_parallel/pipeline_parallel.py);
- ``mode="no_sync"``: the forwards of all micro-batches but the last inside
  ``no_sync()``, torch DDP's forward-time rule.

``Net`` has a branch (``side``) used only by micro-batch 0, which never synchronises,
and a layer (``never``) no micro-batch uses: the used map must count a gradient from
an unsynchronised backward as "used". Results cross as numpy arrays and plain data.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from utils.data_parallel.ddp import BucketedDDP, NaiveDDP

IN, HIDDEN, OUT = 6, 8, 3
M = 3  # micro-batches per rank and step
ROWS = 2  # rows per micro-batch
STEPS = 2  # step 0 zeroes grads with set_to_none=True, step 1 with False
BUCKET_MB = 0.0002  # ~52 floats: several buckets for Net's 176 parameters
SCHEDULES = {
    "sequential": "F0 B0 F1 B1 F2 B2",
    "afab": "F0 F1 F2 B0 B1 B2",
    "1f1b": "F0 F1 B0 F2 B1 B2",
}


class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Registered first, so in reverse order they come last: the body's
            # buckets fill, and launch, during the synchronised backward.
            self.never = nn.Linear(2, 2)  # no micro-batch uses it
            self.side = nn.Linear(IN, OUT)  # only micro-batch 0 uses it
            self.body = nn.Sequential(
                nn.Linear(IN, HIDDEN),
                nn.Tanh(),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Tanh(),
                nn.Linear(HIDDEN, OUT),
            )

    def forward(self, x, use_side: bool):
        out = self.body(x)
        return out + self.side(x) if use_side else out


def parse(schedule: str) -> list[tuple[str, int]]:
    """``"F0 B0"`` -> ``[("F", 0), ("B", 0)]``."""
    return [(op[0], int(op[1:])) for op in SCHEDULES.get(schedule, schedule).split()]


def micro_batches(step: int, rank: int, world_size: int) -> list[tuple]:
    """Rank ``rank``'s ``M`` micro-batches of the step's global batch."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = world_size * M * ROWS
    x, y = torch.randn(rows, IN, generator=g), torch.randn(rows, OUT, generator=g)
    x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    return list(zip(x.chunk(M), y.chunk(M)))


def _grads(model: nn.Module) -> dict:
    return {
        k: None if v.grad is None else v.grad.detach().clone().numpy()
        for k, v in model.named_parameters()
    }


def _params(model: nn.Module) -> dict:
    return {k: v.detach().clone().numpy() for k, v in model.named_parameters()}


def reference(world_size: int) -> dict:
    """One process, the full global batch: the gradient of sum_k loss_k / M,
    averaged over the ranks' shares, then an SGD step; as plain data."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = 0.0
        for r in range(world_size):
            for k, (x, y) in enumerate(micro_batches(step, r, world_size)):
                loss = loss + F.mse_loss(model(x, use_side=k == 0), y) / M
        (loss / world_size).backward()
        steps.append({"grads": _grads(model)})
        opt.step()
    return {"steps": steps, "params": _params(model)}


def _drain(wrapped) -> None:
    """After a refused backward: let launched all-reduces finish on every rank."""
    for bucket in getattr(wrapped, "buckets", []):
        if isinstance(bucket.handle, Future):  # the ring, on a helper thread
            bucket.handle.result()
        elif bucket.handle is not None:
            bucket.handle.wait()
    dist.barrier()


def run_case(
    impl: str,
    schedule: str,
    mode: str,
    find_unused: bool = True,
    allreduce: str = "builtin",
    reset_flag: bool = False,
    eval_forward: bool = False,
) -> dict:
    """Train ``Net`` for ``STEPS`` steps on this rank's micro-batches in ``schedule``.

    ``mode`` ``"flag_middle"`` synchronises the second-to-last backward instead of
    the last (a mistake the bucketed wrapper must refuse). ``reset_flag`` sets the
    flag to False after the last backward, before finishing. ``eval_forward`` runs a
    ``torch.no_grad()`` forward inside ``no_sync()`` just before the last backward.
    Returns per-step gradients, collective counts and bytes, or ``{"error": ...}``.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    model = Net()
    if rank:  # replicas start different: the wrapper must broadcast rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank)
    if impl == "naive":
        wrapped = NaiveDDP(
            model, allreduce=allreduce, find_unused_parameters=find_unused
        )
    else:
        wrapped = BucketedDDP(
            model, BUCKET_MB, allreduce=allreduce, find_unused_parameters=find_unused
        )
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    ops = parse(schedule)
    backwards = [k for op, k in ops if op == "B"]
    sync_at = backwards[-2] if mode == "flag_middle" else backwards[-1]
    steps = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=step == 0)
        wrapped.meter.reset()
        wrapped.comm_events.clear()
        batches, losses = micro_batches(step, rank, n), {}
        try:
            for op, k in ops:
                if op == "F":
                    x, y = batches[k]
                    last = k == M - 1
                    quiet = mode == "no_sync" and not last
                    with wrapped.no_sync() if quiet else nullcontext():
                        losses[k] = F.mse_loss(wrapped(x, use_side=k == 0), y) / M
                    continue
                if mode in ("flag", "flag_middle"):
                    wrapped.set_requires_gradient_sync(k == sync_at)
                if eval_forward and k == backwards[-1]:
                    with torch.no_grad(), wrapped.no_sync():
                        wrapped(batches[0][0], use_side=False)
                losses[k].backward()
        except RuntimeError as e:
            _drain(wrapped)
            return {"error": str(e)}
        launched = getattr(wrapped, "_next", None)  # buckets launched in backward
        if reset_flag:
            wrapped.set_requires_gradient_sync(False)
        wrapped.finish_gradient_synchronization()
        steps.append(
            {
                "grads": _grads(model),
                "events": len(wrapped.comm_events),
                "by_op": dict(wrapped.meter.by_op),
                "launched_in_backward": launched,
            }
        )
        opt.step()
    return {
        "steps": steps,
        "params": _params(model),
        "buckets": len(getattr(wrapped, "buckets", [])),
    }


def flag_must_be_a_bool() -> str:
    """``set_requires_gradient_sync(1)`` is refused; returns the message."""
    wrapped = NaiveDDP(Net())
    try:
        wrapped.set_requires_gradient_sync(1)
    except TypeError as e:
        return str(e)
    return "accepted"


def sync_cases(cases: list[dict]) -> dict:
    """Several ``run_case`` runs, and the bool check, in one launch (a launch
    costs more than a run)."""
    return {
        "runs": [run_case(**case) for case in cases],
        "bad_flag": flag_must_be_a_bool(),
    }
