"""The single-process reference of chapter 7's lab: one process, the whole GPT.

Chapter 7 ("DP x TP x PP, and planning a run") holds ``labs/combined.py`` to it:
whatever the layout (dp x tp x pp, ZeRO stage, schedule), the lab must train the
same model the same way as one process that sees the whole global batch. The
global batch of each step is cut into the ``dp x m`` micro-batches the ranks see
(dp contiguous slices, each in m chunks: ``labs.pipeline_parallel.micro_batches``),
each micro-batch's mean cross-entropy is scaled once by ``1/(dp m)`` and the
gradients accumulate before one AdamW step, the way chapter 5's pipeline and
chapter 1's averaging all-reduce combine (the same computation as
``tests/_pipeline_parallel_workers.reference``, which ``tests/test_combined.py``
uses; ``tests/test_combined_figures.py`` checks that the two agree).

It takes the lab's ``Config`` (anything with ``gpt()``, ``seed``, ``lr``,
``steps``, ``batch_size``, ``dp_size`` and ``micro_batches``) and imports no lab,
so the book can call it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from utils.models import GPT, gpt_batch


def reference(cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(the loss of each step, every final parameter flattened, by name): one
    process, gradients accumulated over the ``dp x m`` micro-batches of each step,
    the loss scaled once by ``1/(dp m)``, AdamW with the lab's learning rate."""
    gpt = GPT(cfg.gpt(), seed=cfg.seed)
    opt = torch.optim.AdamW(gpt.parameters(), lr=cfg.lr)
    k = cfg.dp_size * cfg.micro_batches
    losses = []
    for step in range(cfg.steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            loss = F.cross_entropy(gpt(xs).flatten(0, 1), ys.flatten())
            (loss / k).backward()
            total += loss.item()
        opt.step()
        losses.append(total / k)
    params = {n: p.detach().reshape(-1).clone() for n, p in gpt.named_parameters()}
    return losses, params


def differences(reports, cfg) -> dict[str, float]:
    """How far a run of the lab (its rank reports, ``return_params`` on) is from
    :func:`reference`: the largest loss difference over ranks and steps, and the
    largest parameter difference over every parameter (each taken whole, from the
    first rank that reports it)."""
    losses, params = reference(cfg)
    loss = max(
        abs(a - b) for r in reports for a, b in zip(r.losses, losses, strict=True)
    )
    got: dict[str, torch.Tensor] = {}
    for r in reports:
        if r.extra.params is None:
            raise ValueError(
                f"rank {r.rank} sent no parameters: run the lab with return_params=True"
            )
        for name, flat in r.extra.params.items():
            got.setdefault(name, torch.tensor(flat))
    if set(got) != set(params):
        missing = sorted(set(params) - set(got))
        raise ValueError(f"the ranks did not report every parameter: {missing[:4]}")
    param = max((got[n] - params[n]).abs().max().item() for n in params)
    return {"loss": loss, "param": param}
