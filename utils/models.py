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


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4h MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=-1)
        q, k, v = (
            t.view(b, s, self.n_heads, h // self.n_heads).transpose(1, 2)
            for t in (q, k, v)
        )
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, blocks, a final norm, a head."""

    def __init__(self, cfg: GPTConfig = GPTConfig(), *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        with _seeded(seed):
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


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
