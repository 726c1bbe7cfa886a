"""Inter-layer model parallelism: each rank holds a contiguous group of layers.

Chapter 4 ("Model parallelism", the split across layers). The model's layers are
cut into ``n`` consecutive groups, one per rank (:func:`split_layers`); rank ``k``
runs its group on the activation rank ``k - 1`` sends it and sends its output to
rank ``k + 1``; the last rank computes the loss; the backward then walks the chain
the other way, each rank receiving its output's gradient and sending its input's
(the post's "Model Parallelism" section; the "naive model parallelism" of Huang
et al. 2019, "GPipe", fig. 2b). One batch is in flight, so at any moment one rank
computes and the others wait: the idle time that pipeline parallelism (chapter
5) fills with micro-batches.

:class:`LayerGroup` works on any list of modules: the first takes the batch's
input, each message between groups is a tensor whose shape both sides know in
advance (``recv_shape``: no shape message), and the last group applies
``loss_fn(output, target)``. :func:`gpt_pieces` lists the course GPT as such
modules (the embedding, each block, the final norm and head) with the prefix each
one's parameters have in the whole model, and :func:`gpt_groups` assigns them:
the blocks cut by :func:`split_layers`, the embedding with the first group and the
head with the last.

Messages are plain blocking ``dist.send`` / ``dist.recv``, one at a time, in the
one order the chain allows. ``batch_isend_irecv`` would add nothing: on a backend
that cannot coalesce (gloo) it issues the same ops one by one
(``torch/distributed/distributed_c10d.py``). Each send's bytes are counted on a
``CommMeter`` ("send.fwd" for an activation, "send.bwd" for a gradient), and
every send and wait is timed by the ``clock`` given (``utils.lab.PhaseClock``'s
protocol: ``clock(name, kind=..., mark=...)`` is a context manager).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from utils import launch
from utils.checks import check_int
from utils.comm import CommMeter, nbytes
from utils.models import split_layers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def _no_clock(name, kind="compute", mark=True):
    yield


class LayerGroup(nn.Module):
    """Rank ``index``'s group of ``n_groups``: ``modules`` run in order.

    ``prev_rank`` / ``next_rank`` are the global ranks of the neighbours (None at
    the ends); ``recv_shape`` and ``dtype`` the activation this group receives (not
    needed on the first). The last group needs ``loss_fn``. ``forward`` then
    ``backward`` once per step, on every rank of the chain.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        index: int,
        n_groups: int,
        *,
        prev_rank: int | None = None,
        next_rank: int | None = None,
        recv_shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        loss_fn: LossFn | None = None,
        meter: CommMeter | None = None,
        clock=None,
    ):
        super().__init__()
        check_int("n_groups", n_groups)
        check_int("index", index, minimum=0, maximum=n_groups - 1)
        modules = list(modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("a layer group needs a non-empty list of nn.Module")
        self.layers = nn.Sequential(*modules)
        self.index, self.n_groups = index, n_groups
        self.is_first, self.is_last = index == 0, index == n_groups - 1
        for name, peer, needed in (
            ("prev_rank", prev_rank, not self.is_first),
            ("next_rank", next_rank, not self.is_last),
        ):
            if needed and peer is None:
                raise ValueError(f"group {index} of {n_groups} needs {name}")
        if not self.is_first and recv_shape is None:
            raise ValueError(f"group {index} receives activations: give recv_shape")
        if self.is_last and loss_fn is None:
            raise ValueError("the last group needs a loss_fn(output, target)")
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.recv_shape = None if recv_shape is None else tuple(recv_shape)
        self.dtype, self.loss_fn = dtype, loss_fn
        self.meter, self.clock = meter, clock or _no_clock
        self._saved: tuple[torch.Tensor | None, torch.Tensor] | None = None

    # [layer-group-start]
    def forward(self, x=None, target=None) -> torch.Tensor | None:
        """Run this group: receive (unless first), compute, send on (unless last).
        Returns the loss on the last group, None elsewhere."""
        device = next(self.parameters()).device
        if not self.is_first:  # wait for the previous group's activation
            with self.clock("recv activation", kind="wait", mark=False):
                x = torch.empty(self.recv_shape, dtype=self.dtype, device=device)
                launch.irecv(x, self.prev_rank).wait()  # dist.recv (see _send)
            x.requires_grad_(True)  # a leaf: its gradient is what we send back
        with self.clock("forward"):
            out = self.layers(x)
            if self.is_last:
                out = self.loss_fn(out, target)
        self._saved = (None if self.is_first else x, out)
        if not self.is_last:
            self._send(out.detach(), "fwd", "send activation")
            return None
        return out

    def backward(self) -> None:
        """The backward of this group's last forward: receive the output's
        gradient (unless last), backpropagate, send the input's (unless first)."""
        if self._saved is None:
            raise RuntimeError(f"group {self.index}: backward before forward")
        x, out = self._saved
        self._saved = None
        grad = None
        if not self.is_last:
            with self.clock("recv gradient", kind="wait", mark=False):
                grad = torch.empty_like(out)
                launch.irecv(grad, self.next_rank).wait()
        with self.clock("backward"):
            torch.autograd.backward(out, grad)
        if not self.is_first:
            self._send(x.grad, "bwd", "send gradient")

    # [layer-group-end]

    def _send(self, tensor: torch.Tensor, phase: str, name: str) -> None:
        peer = self.next_rank if phase == "fwd" else self.prev_rank
        with self.clock(name, kind="comm", mark=False):
            # dist.send, but through a host copy for a CUDA tensor under gloo
            # (ranks sharing a GPU), whose send/recv read host memory only
            launch.isend(tensor, peer).wait()
        if self.meter is not None:
            self.meter.count(f"send.{phase}", nbytes(tensor))


# ------------------------------------------------------------ the course GPT
class GPTEmbedding(nn.Module):
    """The GPT's token plus position embeddings, as a layer: ids -> (b, s, h)."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.tok, self.pos = gpt.tok, gpt.pos

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(positions)


class GPTHead(nn.Module):
    """The GPT's final norm and head, as a layer: (b, s, h) -> logits."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


# [gpt-groups-start]
def gpt_pieces(gpt: nn.Module) -> list[tuple[str, nn.Module]]:
    """The course GPT (``utils.models.GPT``) as consecutive layers, each with the
    prefix its parameters' names have in the whole model: ``("", embedding)``,
    ``("blocks.0.", block 0)``, ..., ``("", final norm and head)``. Refuses a tied
    model: its embedding and head would sit on two ranks."""
    if gpt.head.weight is gpt.tok.weight:
        raise ValueError(
            "split the GPT across layers untied (GPTConfig(tie_weights=False)): "
            "the embedding goes to the first rank and the head to the last"
        )
    blocks = [(f"blocks.{i}.", b) for i, b in enumerate(gpt.blocks)]
    return [("", GPTEmbedding(gpt)), *blocks, ("", GPTHead(gpt))]


def gpt_groups(gpt: nn.Module, n_groups: int) -> list[list[tuple[str, nn.Module]]]:
    """:func:`gpt_pieces` assigned to ``n_groups`` ranks: the blocks cut by
    :func:`split_layers`, the embedding with the first group, the head with the
    last."""
    pieces = gpt_pieces(gpt)
    embed, blocks, head = pieces[0], pieces[1:-1], pieces[-1]
    groups = [[blocks[i] for i in r] for r in split_layers(len(blocks), n_groups)]
    groups[0].insert(0, embed)
    groups[-1].append(head)
    return groups


# [gpt-groups-end]


def named_parameters(group: Sequence[tuple[str, nn.Module]]):
    """``(full-model name, parameter)`` for every parameter of a group of
    :func:`gpt_pieces`."""
    for prefix, module in group:
        for name, p in module.named_parameters():
            yield prefix + name, p
