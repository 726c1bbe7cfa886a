"""Checks for the exercises of chapter 1, "Data parallelism".

1. Write the gradient-averaging step with ``all_reduce``:
   :func:`check_average_gradients` runs your function at world size 2 and compares
   the gradients with torch's DistributedDataParallel on the same data.
2. Predict the bytes one rank sends per step: :func:`check_bytes_per_rank`
   compares your number with what a lab run measured.
3. Predict the memory per rank: :func:`check_memory_per_rank` compares with the
   lab's measured model states.

A function that runs inside ranks must be importable, so exercise 1 has you write it
to a file outside the book (:func:`exercise_file`) with ``%%writefile``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from utils.exercises import load_function, run_in_ranks
from utils.models import MLP, mlp_batch, shard_batch

SIZES = (16, 32, 8)
WORLD_SIZE = 2


def average_rank(path: str, name: str) -> dict:
    """Inside a rank: the learner's averaging against DDP, one backward each."""
    rank, n = dist.get_rank(), dist.get_world_size()
    average_gradients = load_function(path, name)
    mine, theirs = MLP(SIZES, seed=1), DistributedDataParallel(MLP(SIZES, seed=1))
    x, y = shard_batch(mlp_batch(SIZES, 8, seed=1), rank, n)
    F.mse_loss(mine(x), y).backward()
    F.mse_loss(theirs(x), y).backward()
    local = [p.grad.clone() for p in mine.parameters()]
    average_gradients(mine)
    out = {"error": 0.0, "vs_sum": 0.0, "unchanged": True, "missing": False}
    for p, q, g in zip(mine.parameters(), theirs.parameters(), local):
        if p.grad is None:
            out["missing"] = True
            continue
        out["error"] = max(out["error"], (p.grad - q.grad).abs().max().item())
        out["vs_sum"] = max(out["vs_sum"], (p.grad - n * q.grad).abs().max().item())
        out["unchanged"] &= torch.equal(p.grad, g)
    return out


def check_average_gradients(path, name: str = "average_gradients") -> None:
    """Run ``name`` from ``path`` in 2 ranks after a backward; its gradients must
    equal DDP's (the mean over ranks) to 1e-6. Raises AssertionError with a hint."""
    results = run_in_ranks(average_rank, path, name, world_size=WORLD_SIZE)
    for rank, r in enumerate(results):
        if r["missing"]:
            raise AssertionError(f"rank {rank}: a parameter lost its .grad")
        if r["error"] <= 1e-6:
            continue
        if r["unchanged"]:
            hint = "the gradients were not changed: all-reduce them in place"
        elif r["vs_sum"] <= 1e-6:
            hint = "they are the sum over ranks: divide by the world size"
        else:
            hint = "compare with the mean of every rank's gradient"
        raise AssertionError(
            f"rank {rank}: gradients differ from DDP's by {r['error']:.2e}; {hint}"
        )
    print(
        f"Correct: on {WORLD_SIZE} ranks your gradients equal DDP's (max error "
        f"{max(r['error'] for r in results):.1e})."
    )


def _close(answer, measured: float, what: str) -> None:
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise AssertionError(f"answer with a number of bytes, got {answer!r}")
    if abs(answer - measured) > 0.01 * measured:
        side = "high" if answer > measured else "low"
        raise AssertionError(
            f"{answer:,.0f} B is too {side}: the lab measured {measured:,.0f} B {what}"
        )
    print(f"Correct: {answer:,.0f} B; the lab measured {measured:,.0f} B {what}.")


def check_bytes_per_rank(answer: float, report) -> None:
    """Your predicted bytes sent by one rank per step, against ``report`` (a lab
    run's RankReport); within 1%."""
    where = f"(rank {report.rank} of {report.world_size}, per step)"
    _close(answer, report.comm_bytes, where)


def check_memory_per_rank(answer: float, report) -> None:
    """Your predicted params + grads + optimizer bytes on one rank after the step,
    against ``report``'s measured memory; within 1%."""
    after = [e for e in report.memory if e["phase"] == "step"][-1]["current"]
    measured = after["params"] + after["grads"] + after["optimizer"]
    where = f"of model states on rank {report.rank} of {report.world_size}"
    _close(answer, measured, where)
