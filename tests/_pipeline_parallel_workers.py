"""Rank functions and the single-process reference for tests/test_pipeline_parallel.py
(importable, so the ranks find them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from labs.pipeline_parallel import Config, loss_fn, worker
from utils.models import GPT, gpt_batch
from utils.pipeline_parallel.executor import add_comm, run_step
from utils.pipeline_parallel.schedules import one_f_one_b, parse
from utils.pipeline_parallel.stage import PipelineStage


def reference(cfg: Config) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the whole model, gradients accumulated over the dp x m
    micro-batches of each step (the loss scaled once by 1/(dp m)), AdamW."""
    gpt = GPT(cfg.gpt(), seed=cfg.seed)
    opt = torch.optim.AdamW(gpt.parameters(), lr=cfg.lr)
    k = cfg.dp_size * cfg.micro_batches
    losses = []
    for step in range(cfg.steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = loss_fn(gpt(xs), ys)
            (loss / k).backward()
            total += loss.item()
        opt.step()
        losses.append(total / k)
    return losses, {
        n: p.detach().reshape(-1).clone() for n, p in gpt.named_parameters()
    }


def many(cfgs: list[Config]) -> list:
    """The lab for each configuration in turn, in one set of ranks."""
    return [worker(c) for c in cfgs]


def hand_written_program() -> tuple[list[float], list[float]]:
    """A learner's own action list (1F1B for 2 ranks, typed out) through
    ``add_comm`` and the executor, two linear layers one per rank: (the losses of
    the two micro-batches, the sum of this rank's weight gradient)."""
    rank, p, m = dist.get_rank(), dist.get_world_size(), 2
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(p)]
    stage = PipelineStage(
        [layers[rank]], rank, p, micro_batches=m, loss_fn=torch.nn.functional.mse_loss
    )
    x = list(torch.randn(2 * m, 4).chunk(m))
    y = list(torch.randn(2 * m, 4).chunk(m))
    typed = {0: "0F0 0F1 0B0 0B1", 1: "1F0 1B0 1F1 1B1"}[rank]
    assert parse(typed) == one_f_one_b(rank, p, m)
    prog = add_comm(rank, parse(typed), p, m)
    run_step(
        prog, {rank: stage}, inputs=x, targets=y, shape=(2, 4), peers=list(range(p))
    )
    grads = [layer.weight.grad for layer in layers if layer.weight.grad is not None]
    return [stage.losses.get(i, 0.0) for i in range(m)], [g.sum().item() for g in grads]


def lab_and_pieces(cfgs: list[Config]):
    """The lab for each configuration, then the hand-written program (world 2)."""
    reports = [worker(c) for c in cfgs]
    extra = hand_written_program() if dist.get_world_size() == 2 else None
    return reports, extra
