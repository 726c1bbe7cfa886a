"""The two steps whose code paths chapter 6 records ("SPMD and MPMD, traced"):
a data-parallel step and a pipeline step with one stage per rank.

``labs/simd_mimd.py`` (part ``spmd``) runs each inside ``trace.CodePath([__file__
of this module])``, so the functions below are the "calls" of the recorded path;
the ops they dispatch (matmuls, backward ops, ``c10d::allreduce_``, ``c10d::send``,
``c10d::recv_``) are its "ops". The pipeline step is the smallest there is: one
micro-batch forward through the stages and its gradient back (chapter 5 builds the
real schedules). Every function takes the process ``group`` it communicates on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F

from utils.comm import all_reduce_mean


# [spmd-steps-start]
def forward_stage(layers, x):
    return layers(x)


def compute_loss(out, y):
    return F.mse_loss(out, y)


def backward_loss(loss):
    loss.backward()


def average_gradients(model, group):
    all_reduce_mean([p.grad for p in model.parameters()], group=group)


def update(optimizer):
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def data_parallel_step(model, optimizer, x, y, group):
    """Every rank: the same code on its own slice of the batch."""
    loss = compute_loss(forward_stage(model, x), y)
    backward_loss(loss)
    average_gradients(model, group)
    update(optimizer)
    return loss


def send_activation(out, to, group):
    dist.send(out.detach(), dst=to, group=group)


def recv_activation(shape, frm, group):
    inp = torch.empty(shape)
    dist.recv(inp, src=frm, group=group)
    return inp.requires_grad_()


def send_gradient(inp, to, group):
    dist.send(inp.grad, dst=to, group=group)


def backward_stage(out, frm, group):
    grad = torch.empty_like(out)
    dist.recv(grad, src=frm, group=group)
    out.backward(grad)


def pipeline_step(stage, optimizer, x, y, rank, n, group):
    """Rank r holds stage r of n; one micro-batch forward to the last stage and
    its gradient back (a pipeline step at its simplest)."""
    loss = None
    if rank > 0:  # every stage but the first receives its input
        x = recv_activation((x.shape[0], stage[0].in_features), rank - 1, group)
    out = forward_stage(stage, x)
    if rank < n - 1:  # every stage but the last sends forward, waits for a gradient
        send_activation(out, rank + 1, group)
        backward_stage(out, rank + 1, group)
    else:  # the last stage alone computes the loss
        loss = compute_loss(out, y)
        backward_loss(loss)
    if rank > 0:
        send_gradient(x, rank - 1, group)
    update(optimizer)
    return loss


# [spmd-steps-end]
