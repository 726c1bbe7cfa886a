"""A pipeline stage from any list of modules, and the point-to-point helpers.

Chapter 5 ("Pipeline parallelism"). GPipe (Huang et al. 2019, section 2) cuts a
model into consecutive stages; each stage here is a :class:`PipelineStage`: a list
of modules run in order, whose first stage takes the input batch and whose last
computes the loss. It runs one micro-batch at a time, and keeps what the backward
needs (its input and output) until then:

``forward(micro, x)``
    runs the modules; the last stage returns nothing and keeps ``loss / m``: the
    loss is scaled once over the ``m`` micro-batches, so the gradients accumulated
    over them are those of the whole batch's mean loss.
``backward(micro, grad)``
    the full backward from the output's gradient (``grad`` is None on the last
    stage: it starts from the loss); returns the input's gradient for the
    previous stage (None on the first stage, whose input is token ids).
``backward(micro, grad, split=True)`` then ``backward_weight(micro)``
    the zero-bubble split (Qi et al. 2024, section 2): ``B`` computes only the
    input gradient (``torch.autograd.grad`` with respect to the input, keeping the
    graph), ``W`` later the weight gradients (``torch.autograd.grad`` with respect
    to the parameters, freeing the graph) and adds them to ``.grad``. Autograd
    computes only what leads to the inputs asked for, so B skips every weight
    gradient; W walks the graph again from the output, so it recomputes the
    input-gradient chain inside the stage on its way to the earlier weights
    (torch's ``stage_backward_weight`` avoids that by keeping the intermediate
    gradients B computed; this version keeps to two plain autograd calls). The
    stage's activations stay alive until W, as the paper's ZB-H1 assumes.

Point-to-point: activations go forward to the next stage and gradients back, each
a tensor whose shape both sides know in advance (``b/m x s x h``: no shape
message): :func:`send` starts an ``isend``, :func:`irecv` posts an ``irecv`` into a
fresh buffer, :func:`recv` is the blocking form. They are plain ops issued one at a
time in the order of ``schedules.program``, never ``batch_isend_irecv`` (on gloo,
which cannot coalesce, it issues the same ops one by one, and a batch posted in a
different order on the two sides can hang). Each message has the tag
``schedules.message_tag`` gives, so the two ends agree on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from utils import launch
from utils.checks import check_int
from utils.models import split_layers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def partition(n_items: int, n_parts: int) -> list[range]:
    """``n_items`` consecutive layers cut into ``n_parts`` near-equal stages: chapter
    4's layer split (:func:`utils.models.split_layers`), the
    first ones one layer longer when it does not divide (each at least one)."""
    return split_layers(n_items, n_parts, what="stage")


class PipelineStage:
    """One model chunk of a pipeline: ``modules`` run in order, per micro-batch.

    ``stage`` is the chunk's index among ``n_stages`` (the virtual stage in
    interleaved schedules); stage 0 takes the input batch, stage ``n_stages - 1``
    computes ``loss_fn(output, target)``, scaled by ``1 / micro_batches``.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        stage: int,
        n_stages: int,
        *,
        micro_batches: int,
        loss_fn: LossFn | None = None,
    ):
        check_int("n_stages", n_stages)
        check_int("stage", stage, minimum=0, maximum=n_stages - 1)
        check_int("micro_batches", micro_batches)
        modules = list(modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("a stage needs a non-empty list of nn.Module")
        self.module = nn.Sequential(*modules)
        self.stage, self.n_stages, self.m = stage, n_stages, micro_batches
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss_fn(output, target)")
        self.loss_fn = loss_fn
        self._stash: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._pending_w: dict[int, torch.Tensor | None] = {}
        self.losses: dict[int, float] = {}
        """Last stage: each micro-batch's loss (before the 1/m scaling)."""

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def in_flight(self) -> int:
        """Micro-batches whose activations this stage still holds."""
        return len(self._stash)

    # [stage-forward-start]
    def forward(self, micro: int, x: torch.Tensor, target=None) -> torch.Tensor | None:
        """Run micro-batch ``micro``; the output to send on (None on the last stage)."""
        if micro in self._stash:
            raise RuntimeError(f"stage {self.stage}: micro-batch {micro} ran twice")
        if not self.is_first:  # a received activation: a leaf whose grad B sends back
            x = x.detach().requires_grad_(True)
        out = self.module(x)
        if self.is_last:
            loss = self.loss_fn(out, target)
            self.losses[micro] = loss.item()
            out = loss / self.m  # scaled once: the mean over all m micro-batches
        self._stash[micro] = (None if self.is_first else x, out)
        return None if self.is_last else out.detach()

    # [stage-forward-end]

    # [stage-backward-start]
    def backward(
        self, micro: int, grad: torch.Tensor | None = None, *, split: bool = False
    ) -> torch.Tensor | None:
        """The backward of ``micro`` from its output's gradient (None on the last
        stage); returns the input's gradient (None on the first stage).

        ``split``: only the input gradient (ZB-H1's B); call
        :meth:`backward_weight` later for the weights' (W).
        """
        if micro not in self._stash or micro in self._pending_w:
            raise RuntimeError(f"stage {self.stage}: backward of {micro} before F")
        x, out = self._stash[micro]
        if not split:
            del self._stash[micro]
            torch.autograd.backward(out, grad)  # weights' .grad and x.grad
            return None if x is None else x.grad
        self._pending_w[micro] = grad
        if x is None:  # the first stage has no input gradient: all its work is W
            return None
        (grad_x,) = torch.autograd.grad(out, [x], grad, retain_graph=True)
        return grad_x

    def backward_weight(self, micro: int) -> None:
        """ZB-H1's W for ``micro``: the weights' gradients, added to ``.grad``."""
        if micro not in self._pending_w:
            raise RuntimeError(f"stage {self.stage}: W of {micro} before its B")
        grad = self._pending_w.pop(micro)
        _, out = self._stash.pop(micro)
        params = self.parameters()
        grads = torch.autograd.grad(out, params, grad, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g

    # [stage-backward-end]

    def check_done(self) -> None:
        """Raise unless every forward has had its backward (end of a step)."""
        if self._stash:
            left = sorted(self._stash)
            raise RuntimeError(
                f"stage {self.stage}: micro-batches {left} have no backward"
            )

    def reset(self) -> None:
        """Forget the step's losses (the stash is empty after a full step)."""
        self.losses.clear()


# [p2p-start]
def send(tensor: torch.Tensor, dst: int, *, tag: int, group=None) -> dist.Work:
    """Start sending ``tensor`` to global rank ``dst``; wait on the returned work
    before changing it (the executor waits for all of a step's sends at its end).
    Under gloo a CUDA tensor goes through a host copy (``utils.launch.isend``)."""
    return launch.isend(tensor, dst, group=group, tag=tag)


def recv(
    shape: Sequence[int],
    src: int,
    *,
    tag: int,
    dtype=torch.float32,
    device="cpu",
    group=None,
) -> torch.Tensor:
    """Receive a tensor of the agreed ``shape`` from global rank ``src`` (blocks)."""
    buffer, work = irecv(shape, src, tag=tag, dtype=dtype, device=device, group=group)
    work.wait()
    return buffer


def irecv(
    shape: Sequence[int],
    src: int,
    *,
    tag: int,
    dtype=torch.float32,
    device="cpu",
    group=None,
) -> tuple[torch.Tensor, dist.Work]:
    """Post the receive of a tensor of ``shape`` from global rank ``src``: the
    buffer it lands in and the work to wait on before reading it."""
    buffer = torch.empty(tuple(shape), dtype=dtype, device=device)
    return buffer, launch.irecv(buffer, src, group=group, tag=tag)


# [p2p-end]
