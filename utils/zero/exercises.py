"""Checks for the exercises of chapter 2, "ZeRO".

* :func:`check_smallest_world_size`: the fewest data-parallel ranks at which a
  model's states fit a device, for each stage, against ``model_state_bytes``.
* :func:`check_shard_update`: stage 1's step (reduce-scatter the gradients, update
  this rank's shard, all-gather the parameters), written by the learner to a file
  (ranks find code by path), run in 2 gloo ranks against stage 0
  (``utils.zero.ReplicatedOptimizer``) with its bytes counted.

A check prints one line when the answer is right and raises ``AssertionError`` with
what was expected when it is not.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from torch.nn import functional as F

from utils.comm import CollectiveCounter, CommMeter, bytes_sent
from utils.exercises import load_function, run_in_ranks
from utils.flat import FlatLayout
from utils.memory_model import model_state_bytes
from utils.models import MLP, mlp_batch, shard_batch
from utils.zero.optim import ReplicatedOptimizer

__all__ = [
    "MAX_WORLD_SIZE",
    "check_shard_update",
    "check_smallest_world_size",
    "smallest_world_size",
]

MAX_WORLD_SIZE = 4096
"""The largest data-parallel world the first exercise considers."""

_SIZES = (1_300_000_000, 7_500_000_000, 70_000_000_000, 175_000_000_000, 10**12)
_DEVICES_GB = (24, 80, 141)


def smallest_world_size(num_params: int, device_bytes: int, stage: int) -> int | None:
    """The reference answer: fewest ranks whose mixed-precision model states (the
    paper's 16 B/param) fit in ``device_bytes`` at ``stage``; None if no
    N <= MAX_WORLD_SIZE does (a replicated state that alone is too big)."""
    for n in range(1, MAX_WORLD_SIZE + 1):
        need = model_state_bytes(num_params, world_size=n, zero_stage=stage).total
        if need <= device_bytes:
            return n
    return None


def check_smallest_world_size(fn) -> None:
    """``fn(num_params, device_bytes, stage)`` must return the fewest ranks (or
    None) for every model size, device and stage of a grid."""
    cases = 0
    for num_params in _SIZES:
        for gb in _DEVICES_GB:
            for stage in range(4):
                want = smallest_world_size(num_params, gb * 10**9, stage)
                got = fn(num_params, gb * 10**9, stage)
                cases += 1
                if got != want:
                    raise AssertionError(
                        f"{num_params / 1e9:g}B params, {gb} GB device, stage {stage}: "
                        f"you return {got!r}, expected {want!r} (the states per rank "
                        f"are model_state_bytes(num_params, world_size=N, "
                        f"zero_stage={stage}).total)"
                    )
    print(f"correct: {cases} cases (model sizes x devices x stages) agree")


# -------------------------------------------------------------- stage 1's update
SIZES = (16, 32, 8)
"""The MLP of the second exercise: 16*32+32 + 32*8+8 = 808 parameters."""
STEPS = 3


def rank_check_shard_update(path: str, name: str) -> dict:
    """Runs in each rank: the learner's stage-1 step against stage 0."""
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        step_fn = load_function(path, name)
        model, ref = MLP(SIZES, seed=0), MLP(SIZES, seed=0)
        params = list(model.parameters())
        layout = FlatLayout((p.numel() for p in params), n)
        flat = torch.zeros(layout.padded)
        flat_grad = torch.zeros(layout.padded)
        for p, (a, b) in zip(params, layout.spans()):
            flat[a:b].copy_(p.detach().reshape(-1))
            p.data = flat[a:b].view_as(p)  # the model reads the flat buffer
            p.grad = flat_grad[a:b].view_as(p)  # backward writes into it
        start, end = layout.shard(rank)
        shard = flat[start:end]  # what this rank's optimizer owns
        opt = torch.optim.AdamW([shard], lr=1e-2)
        ref_opt = ReplicatedOptimizer(ref.parameters(), torch.optim.AdamW, lr=1e-2)
        meter = CommMeter()
        for step in range(STEPS):
            x, y = shard_batch(mlp_batch(SIZES, 8, step=step), rank, n)
            for m in (model, ref):
                F.mse_loss(m(x), y).backward()
            with CollectiveCounter(meter):
                step_fn(flat, flat_grad, shard, opt)
            ref_opt.step()
            flat_grad.zero_()
            ref_opt.zero_grad()
        diff = max((a - b).abs().max().item() for a, b in zip(params, ref.parameters()))
        state = [t.numel() for s in opt.state.values() for t in s.values() if t.dim()]
        return {
            "diff": diff,
            "bytes": meter.total / STEPS,
            "state": state,
            "shard": end - start,
            "padded": layout.padded,
            "error": None,
        }
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def check_shard_update(path, name: str = "sharded_step", world_size: int = 2) -> None:
    """Run ``name`` from the file ``path`` as the step of a 2-rank stage-1 training
    of a small MLP; parameters must equal stage 0's, the optimizer must hold only
    the shard's state, and the bytes sent must be stage 1's 2 Psi (N-1)/N."""
    results = run_in_ranks(
        rank_check_shard_update, path, name, world_size=world_size, timeout=60.0
    )
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise AssertionError("\n".join(errors))
    r = results[0]
    want = 2 * bytes_sent("all_gather", r["padded"] * 4, world_size)
    for rank, res in enumerate(results):
        if res["diff"] > 1e-6:
            raise AssertionError(
                f"rank {rank}: parameters differ from stage 0 by {res['diff']:.3g} "
                f"after {STEPS} steps: average the gradients (reduce-scatter, then "
                f"divide by {world_size}), step, then all-gather every shard"
            )
        if any(size != res["shard"] for size in res["state"]):
            raise AssertionError(
                f"rank {rank}: optimizer state sizes {res['state']}, expected "
                f"{res['shard']} each (this rank's shard only)"
            )
    if abs(r["bytes"] - want) > 0.01 * want:
        raise AssertionError(
            f"each rank sent {r['bytes']:,.0f} bytes per step; stage 1 sends "
            f"{want:,} (a reduce-scatter and an all-gather of the padded buffer, "
            f"2 Psi (N-1)/N x 4 bytes). An all-reduce plus an all-gather would be "
            f"{1.5 * want:,.0f}."
        )
    print(
        f"correct: same parameters as stage 0 after {STEPS} steps on {world_size} "
        f"ranks, optimizer state of {r['shard']} elements per rank (of "
        f"{r['padded']}), {r['bytes']:,.0f} bytes sent per step = 2 Psi (N-1)/N x 4"
    )
