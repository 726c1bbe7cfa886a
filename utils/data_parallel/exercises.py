"""Checks for the exercises of chapter 1, "Data parallelism".

Exercise 1.1, write the gradient-averaging step with ``all_reduce``:
    :func:`check_average_gradients` runs your function at world size 2 and compares
    the gradients with torch's DistributedDataParallel on the same data.
Exercise 1.2, predict the bytes one rank sends in a step with gradient accumulation:
    :func:`check_bytes_per_rank` compares your number with what the kernel counted
    leaving that rank's sockets (``RankReport.wire_bytes``, ``utils.wire``), less
    gloo's framing; only where nothing was counted (NCCL, not Linux) with the
    lab's modelled figure, and it says so.
Exercise 1.3, predict how many all-reduces torch's DDP launches per step:
    :func:`check_ddp_buckets` compares with the buckets the lab's comm hook saw.

:func:`check_memory_per_rank` (the replica's model-state bytes) is no longer an
exercise: the chapter states its answer, 16 bytes per parameter.

A function that runs inside ranks must be importable, so exercise 1.1 has you write
it to a file outside the book (:func:`exercise_file`) with ``%%writefile``. Every
check raises ``AssertionError`` on a wrong answer (``tests/test_data_parallel.py``
feeds each one plausible wrong answers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from utils.exercises import load_function, run_in_ranks
from utils.models import MLP, mlp_batch, shard_batch
from utils.report import field_of

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


def _number(answer) -> float:
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise AssertionError(f"answer with a number of bytes, got {answer!r}")
    return float(answer)


def _close(answer, measured: float, what: str, slack: float = 0.0) -> None:
    """Within 1% of ``measured``, plus ``slack`` bytes."""
    answer = _number(answer)
    if abs(answer - measured) > 0.01 * measured + slack:
        side = "high" if answer > measured else "low"
        raise AssertionError(
            f"{answer:,.0f} B is too {side}: the lab measured {measured:,.0f} B {what}"
        )
    print(f"Correct: {answer:,.0f} B; the lab measured {measured:,.0f} B {what}.")


def check_bytes_per_rank(answer: float, report) -> None:
    """Your predicted payload bytes sent by one rank in the last step of a lab run.

    Compared with the bytes the kernel counted on that rank's TCP sockets
    (``report.wire_bytes``): within 1%, plus gloo's framing for the step's
    all-reduces (:func:`utils.data_parallel.figures.gloo_framing_bytes`, 144 B per
    transfer), which no payload formula includes. Where nothing was counted
    (``wire_bytes`` is None: NCCL, or not Linux) the reference is the lab's
    ``comm_bytes``, which is modelled unless the course's ring ran, and the message
    says which.
    """
    from utils.data_parallel.figures import gloo_framing_bytes  # matplotlib: lazily

    extra = field_of(report, "extra")
    n = field_of(report, "world_size")
    rank = field_of(report, "rank")
    calls = sum(e["kind"] == "comm" for e in field_of(extra, "timeline")[-1])
    ring = field_of(extra, "config")["allreduce"] == "ring"
    wire = field_of(report, "wire_bytes")
    if wire is not None:
        slack = gloo_framing_bytes(calls, n, ring=ring)
        where = (
            f"leaving rank {rank}'s sockets in its last step (counted by the kernel; "
            f"{calls} all-reduces, up to {slack:,} B of it gloo's framing)"
        )
        _close(answer, wire, where, slack)
    else:
        source = field_of(report, "comm_source")
        where = f"for rank {rank}'s last step ({source}: no TCP counters here)"
        _close(answer, field_of(report, "comm_bytes"), where)


def check_ddp_buckets(answer, report) -> None:
    """Your ``(first, later)``: the all-reduces torch's DDP launched in the first
    step of a lab run (``--impl ddp``), and in each later step, against the buckets
    its comm hook recorded (``report.extra.timeline``)."""
    per_step = [
        sum(e["kind"] == "comm" for e in step)
        for step in field_of(field_of(report, "extra"), "timeline")
    ]
    if len(per_step) < 2 or len(set(per_step[1:])) != 1:
        raise ValueError(f"needs a ddp run of >= 2 steps, got buckets {per_step}")
    ok = (
        isinstance(answer, (tuple, list))
        and len(answer) == 2
        and all(isinstance(a, int) and not isinstance(a, bool) for a in answer)
    )
    if not ok:
        raise AssertionError(f"answer with two integers (first, later), got {answer!r}")
    measured = (per_step[0], per_step[1])
    if tuple(answer) != measured:
        hints = []
        if answer[0] != measured[0]:
            hints.append(
                "the first step: DDP builds its reducer with every parameter in one "
                "bucket when find_unused_parameters=False"
            )
        if answer[1] != measured[1]:
            hints.append(
                "later steps: the rebuilt buckets follow the order gradients arrived "
                "in, and a bucket closes once it holds bucket_cap_mb or more"
            )
        raise AssertionError(
            f"{tuple(answer)} is not it; look again at " + "; ".join(hints)
        )
    print(
        f"Correct: DDP launched {measured[0]} all-reduce in step 0 and "
        f"{measured[1]} in each later step (counted in its comm hook)."
    )


def check_memory_per_rank(answer: float, report) -> None:
    """Your predicted params + grads + optimizer bytes on one rank after the step,
    against ``report``'s measured memory; within 1%."""
    after = [e for e in report.memory if e["phase"] == "step"][-1]["current"]
    measured = after["params"] + after["grads"] + after["optimizer"]
    where = f"of model states on rank {report.rank} of {report.world_size}"
    _close(answer, measured, where)
