"""The course's models and data: a tiny MLP, a small GPT, synthetic batches.

Introduced in chapter 0 ("Why one device is not enough") and used by every lab.
Nothing is downloaded, ever: weights come from a seed and batches are generated in
code, so every rank (and every reader) builds bit-identical models and data.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from utils.checks import check_int


@contextmanager
def _seeded(seed: int):
    """Seed the global RNG for a block, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class MLP(nn.Sequential):
    """Linear layers with ReLU between them: ``sizes = (in, hidden..., out)``."""

    def __init__(self, sizes: tuple[int, ...] = (32, 64, 64, 8), *, seed: int = 0):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be >= 2 positive ints, got {sizes!r}")
        layers: list[nn.Module] = []
        with _seeded(seed):
            for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers.append(nn.Linear(fan_in, fan_out))
                if i < len(sizes) - 2:
                    layers.append(nn.ReLU())
        super().__init__(*layers)
        self.sizes = tuple(sizes)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the small GPT-style transformer."""

    vocab_size: int = 64
    """Tokens in the synthetic vocabulary."""
    seq_len: int = 16
    """Tokens per sequence (the context length)."""
    d_model: int = 32
    """Hidden size h."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads a; d_model must divide by it."""
    tie_weights: bool = True
    """Share the embedding and output matrices (a tied parameter, as in GPT-2)."""

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"GPTConfig.{name} must be a positive int, got {value!r}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )


def _fused_qkv_(attn: Attention, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a fused ``(3h, h)`` qkv weight and ``(3h,)`` bias into ``q``, ``k``, ``v``.

    Rows ``[0, h)`` go to q, ``[h, 2h)`` to k, ``[2h, 3h)`` to v: the slices the old
    fused ``qkv`` layer's ``.split(h, dim=-1)`` gave, so the function is unchanged.
    """
    with torch.no_grad():
        for layer, w, b in zip(
            (attn.q, attn.k, attn.v), weight.chunk(3), bias.chunk(3), strict=True
        ):
            layer.weight.copy_(w)
            layer.bias.copy_(b)


class Attention(nn.Module):
    """Causal multi-head self-attention with one Linear each for q, k, v (and proj).

    Separate q/k/v layers (rather than one fused ``qkv``) make the tensor-parallel
    cut of Megatron-LM (Shoeybi et al. 2019, "Megatron-LM", sec. 3, fig. 3) a plain
    column split of each layer: heads are contiguous ``h / n_heads`` slices of the
    outputs, so ``world_size`` equal row blocks of ``q.weight`` are whole heads.
    A tensor-parallel rewrite shrinks the layers and sets ``n_heads`` to the local
    head count; ``forward`` reads both from the module, never from the config.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h = cfg.d_model
        self.n_heads = cfg.n_heads
        # Why a throwaway fused layer: its default init draws from the global RNG
        # exactly what the old ``qkv = nn.Linear(h, 3h)`` drew, so every later draw
        # (GPT's re-init included) stays where it was. q/k/v are built without
        # drawing (skip_init: meta device, then empty) and take its row slices,
        # which are a correct default init too (the fan-in, h, is the same).
        fused = nn.Linear(h, 3 * h)
        self.q = nn.utils.skip_init(nn.Linear, h, h)
        self.k = nn.utils.skip_init(nn.Linear, h, h)
        self.v = nn.utils.skip_init(nn.Linear, h, h)
        _fused_qkv_(self, fused.weight, fused.bias)
        self.proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        # The local width: all of h here, h / world_size on a tensor-parallel rank.
        # Why read it off the output, not ``self.q.out_features``: torch's own
        # ColwiseParallel shards the weight but leaves out_features at the global h,
        # while a from-scratch rewrite's smaller Linear changes it; both give
        # outputs of the local width.
        h_local = q.shape[-1]
        q, k, v = (
            t.view(b, s, self.n_heads, h_local // self.n_heads).transpose(1, 2)
            for t in (q, k, v)
        )
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(att.transpose(1, 2).reshape(b, s, h_local))


class FeedForward(nn.Module):
    """The block's MLP: ``proj(gelu(fc(x)))`` with a 4h hidden layer.

    ``fc`` is the column-parallel and ``proj`` the row-parallel half of Megatron-LM's
    MLP split (Shoeybi et al. 2019, sec. 3, fig. 3a); GELU is elementwise, so it
    needs no communication between them.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4h MLP, each with a residual.

    Submodule paths (``ln1``, ``attn.q``/``k``/``v``/``proj``, ``ln2``, ``mlp.fc``/
    ``proj``) are what tensor-parallel plans name, e.g. ``blocks.0.attn.q``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        # Why this order: construction and ``modules()`` order both decide which
        # RNG draws each weight gets; it is the old ln1, qkv, proj, ln2, fc, out.
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, blocks, a final norm, a head.

    ``forward(idx)`` is ``logits(blocks(embed(idx)))``, and the three are separate so
    a pipeline stage can run just its part: ``embed`` on the first stage, a slice of
    the ``blocks`` ModuleList on each, ``logits`` on the last (GPipe, Huang et al.
    2019, sec. 2).
    """

    def __init__(self, cfg: GPTConfig = GPTConfig(), *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        with _seeded(seed):
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            # GPT-2's init (Radford et al. 2019; N(0, 0.02), zero biases), drawn in
            # ``modules()`` order.
            done: set[int] = set()
            for module in self.modules():
                if id(module) in done:
                    continue
                if isinstance(module, Attention):
                    # Why one (3h, h) draw: CPU normal_ fills in blocks of 16
                    # (Box-Muller pairs), so three (h, h) draws match the old fused
                    # qkv weight only when h * h divides by 16 (h = 3, 6, 10 do
                    # not); slicing one draw matches for every h.
                    h = module.q.in_features
                    weight = nn.init.normal_(torch.empty(3 * h, h), std=0.02)
                    _fused_qkv_(module, weight, torch.zeros(3 * h))
                    done.update(id(m) for m in (module.q, module.k, module.v))
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
        # Untied, ``head.weight`` keeps its own N(0, 0.02) draw above; tied, that
        # draw is still made (and dropped), so both settings share every other weight.
        if cfg.tie_weights:
            self.head.weight = self.tok.weight

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: ``(b, s)`` ids to ``(b, s, h)``."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and head: ``(b, s, h)`` hidden states to ``(b, s, vocab)``."""
        return self.head(self.ln_f(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)


def count_params(module: nn.Module) -> int:
    """Parameters counted once each, shared (tied) ones included once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def mlp_batch(sizes: tuple[int, ...], batch_size: int, *, seed: int = 0, step: int = 0):
    """A regression batch ``(x, y)`` for the MLP: y is a fixed random teacher of x."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch_size, sizes[0], generator=g)
    teacher = torch.randn(
        sizes[0], sizes[-1], generator=torch.Generator().manual_seed(seed)
    )
    y = torch.tanh(x @ teacher / math.sqrt(sizes[0]))
    return x, y


def gpt_batch(cfg: GPTConfig, batch_size: int, *, seed: int = 0, step: int = 0):
    """Token batch ``(idx, targets)``: noisy arithmetic sequences a GPT can learn."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, cfg.vocab_size, (batch_size, 1), generator=g)
    stride = torch.randint(1, 4, (batch_size, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def shard_batch(batch, rank: int, world_size: int):
    """This rank's contiguous 1/world_size slice of every tensor in ``batch``."""
    out = []
    for t in batch:
        if t.shape[0] % world_size:
            raise ValueError(
                f"batch of {t.shape[0]} does not divide across {world_size} ranks"
            )
        n = t.shape[0] // world_size
        out.append(t[rank * n : (rank + 1) * n])
    return tuple(out)


def split_layers(n_layers: int, n_groups: int, what: str = "group") -> list[range]:
    """``n_layers`` consecutive layers cut into ``n_groups`` near-equal ranges, the
    first ones one layer longer when it does not divide (each at least one).
    ``what`` names a range in the error ("group"; the pipeline's "stage").
    Chapter 4's split across layers, chapter 5's stages and the planner's stages
    all cut the same way."""
    check_int("n_layers", n_layers)
    check_int("n_groups", n_groups)
    if n_layers < n_groups:
        raise ValueError(
            f"cannot cut {n_layers} layers into {n_groups} {what}s: every {what} "
            "needs at least one layer"
        )
    base, extra = divmod(n_layers, n_groups)
    out, start = [], 0
    for k in range(n_groups):
        size = base + (k < extra)
        out.append(range(start, start + size))
        start += size
    return out
