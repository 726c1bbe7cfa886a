"""Flat, padded buffers: how ZeRO lays parameters out to shard them evenly.

Part of chapter 2 ("ZeRO"); used by ``utils.zero.optim`` (stages 0-2) and the
exercises. Stage 3 (``utils.zero.fsdp``) shards per parameter instead, as FSDP2 does,
and keeps its own per-unit buffers. Tensors are copied end to end into one flat
buffer, padded with zeros until it divides by the number of shards N, so every rank
owns exactly ``ceil(numel / N)`` elements (the last rank's shard ends in padding), and a
reduce-scatter or all-gather moves equal chunks. DeepSpeed's ZeRO and PyTorch FSDP
(Zhao et al., VLDB 2023, section 3.2, "FlatParameter") do the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["FlatBucket", "FlatLayout", "chunk_params", "trainable_groups"]


class FlatLayout:
    """Where each tensor sits in a flat buffer padded to ``num_shards`` equal shards."""

    def __init__(self, numels: Iterable[int], num_shards: int):
        self.numels = tuple(int(n) for n in numels)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.num_shards = num_shards
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets.pop()
        self.shard_numel = math.ceil(self.numel / num_shards)
        self.padded = self.shard_numel * num_shards
        self.padding = self.padded - self.numel

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each tensor in the flat buffer."""
        return [(a, a + n) for a, n in zip(self.offsets, self.numels)]

    def shard(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of shard ``index``."""
        return index * self.shard_numel, (index + 1) * self.shard_numel


class FlatBucket:
    """A few parameters in one padded flat buffer, and this rank's slice of it."""

    def __init__(self, params, num_shards, index, master_dtype, track):
        self.params = params
        self.layout = FlatLayout((p.numel() for p in params), num_shards)
        p0 = params[0]
        self.flat = torch.zeros(self.layout.padded, dtype=p0.dtype, device=p0.device)
        with torch.no_grad():
            for p, (a, b) in zip(params, self.layout.spans()):
                self.flat[a:b].copy_(p.detach().reshape(-1))
                p.data = self.flat[a:b].view_as(p)  # the model now reads the bucket
        start, end = self.layout.shard(index)
        self.shard = self.flat[start:end]
        self.master = self.shard  # fp32 training: the optimizer updates it in place
        if master_dtype is not None and master_dtype != p0.dtype:
            self.master = self.shard.detach().to(master_dtype, copy=True)
            track("optimizer", self.master)  # the paper counts it as optimizer state
        self.grad: torch.Tensor | None = None  # flat grads (stages 0 and 1)
        self.grad_shard: torch.Tensor | None = None  # this rank's slice of them
        self.ready = 0  # stage 2: gradients accumulated in this backward
        self.reduced = False

    def link_grads(self) -> None:
        """Make every ``p.grad`` a view into ``self.grad`` (copying any stray one)."""
        with torch.no_grad():
            for p, (a, b) in zip(self.params, self.layout.spans()):
                view = self.grad[a:b].view_as(p)
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
                    p.grad = view


def trainable_groups(params) -> list[dict]:
    """Parameter groups (a list of tensors or of dicts, as torch.optim takes them)
    holding only trainable parameters, each once: a tied one in its first group."""
    params = list(params)
    if not params:
        raise ValueError("the optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    seen: set[int] = set()  # a tied parameter is optimized once, in its first group
    out = []
    for group in params:
        group = dict(group)
        ps = group["params"]
        trainable = []
        for p in [ps] if isinstance(ps, torch.Tensor) else ps:
            if p.requires_grad and id(p) not in seen:  # frozen ones are left alone
                seen.add(id(p))
                trainable.append(p)
        group["params"] = trainable
        out.append(group)
    return out


def chunk_params(params, bucket_numel: int | None) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype parameters of at most ``bucket_numel``."""
    chunks: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        full = bucket_numel is not None and size + p.numel() > bucket_numel
        if (
            not chunks
            or full
            or (p.dtype, p.device) != (chunks[-1][0].dtype, chunks[-1][0].device)
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks
