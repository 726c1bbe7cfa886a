"""One executor for every schedule: it runs a rank's action list and times it.

Chapter 5 ("Pipeline parallelism"). A schedule is data
(``utils.pipeline_parallel.schedules``): per rank, a list of ``Action`` (``F``,
``B``, ``W`` of a stage on a micro-batch) and, from ``schedules.program``, the
sends and receives between them. :func:`run_step` walks such a list once (one
training step's micro-batches) over this rank's :class:`~.stage.PipelineStage`
objects, and records, measured with ``time.perf_counter``:

* every action's start and end, and every receive's wait (a receive blocks until
  its message is there: that time is idle, part of the bubble);
* the bytes each send hands to the transport (counted: the tensor's bytes, on a
  ``utils.comm.CommMeter`` as "send");
* a callback after each action (the lab marks the memory ledger there, so the
  activations stashed after every action are measured).

Both kinds of op are issued where the program puts them, and neither blocks
there: a send starts an ``isend``, a receive posts an ``irecv``, and the action
that consumes the message waits for it just before it runs (that wait is the
receive's span). A send is waited for two actions later (on gloo a send is done
once its peer has posted the receive, and only a wait frees its tensor), and the
last ones at the end of the step. So a rank never blocks on a message it does
not need yet, as a blocking receive in the unit-time order of
``schedules.program`` would when a backward takes twice a forward. Every wait
here comes at or after the point where that order's blocking send or receive
would wait, an order ``check.run_blocking`` shows deadlock-free, so this one is
too. :func:`add_comm` gives a hand-written action list its ops.

``pad``: a :class:`UniformCompute` (or its ``{"F": t_F, "B": t_B, "W": t_W}``,
seconds) makes every action last that long when its work fits: it sleeps first,
then does the work, then sleeps out the rest. When the pads dominate the real
compute, every stage's work is equal and the measured bubble can be compared with
the papers' formulas (the lab's ``--uniform-compute``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from utils.pipeline_parallel.schedules import (
    Action,
    P2POp,
    Schedule,
    message_tag,
    owner,
    program,
)
from utils.pipeline_parallel.stage import PipelineStage, irecv, send


@dataclass
class StepRecord:
    """What :func:`run_step` measured, times in seconds from ``t0``."""

    actions: list[dict] = field(default_factory=list)
    """{"action": "0F1", "kind", "stage", "micro", "start", "end"} in order."""
    comm: list[dict] = field(default_factory=list)
    """{"op", "peer", "what", "stage", "micro", "bytes", "start", "end"} in order;
    a recv's span is the time it blocked, a send's the time to start it."""
    end: float = 0.0
    """When the last op (and the wait for the sends) was done."""

    @property
    def busy(self) -> float:
        """Seconds inside actions."""
        return sum(a["end"] - a["start"] for a in self.actions)

    @property
    def wait(self) -> float:
        """Seconds blocked in receives and in the final wait for sends."""
        return sum(c["end"] - c["start"] for c in self.comm)


def timed_program(
    rank: int,
    p: int,
    m: int,
    v: int,
    schedule: Schedule,
    times: Mapping[str, float] | None = None,
) -> list[Action | P2POp]:
    """``schedules.program`` with its messages ordered by a timeline with these
    per-kind ``times`` (``schedules.timeline``) instead of unit times.

    ``program``'s argument holds for any times: every message gets the end time of
    its producer, every rank's ops follow (time, tag), so both ends agree on one
    global order and a blocking send or receive always finds its peer coming: no
    deadlock. With the times the actions really take (a backward twice a forward),
    a receiver posts each receive about when the message comes, so a sender's
    wait for it (gloo: a send is done once the receive is posted) does not stall
    behind an action the unit-time order put first. Same actions, same messages.
    """
    return program(rank, p, m, v, schedule, times=times)


def add_comm(
    rank: int, actions: Sequence[Action], p: int, m: int, v: int = 1
) -> list[Action | P2POp]:
    """Any action list with its sends and receives: every receive posted at the
    start (non-blocking), each send right after the action that produced it.

    For a hand-written list, where ``schedules.program`` (which needs every rank's
    list) is not at hand. :func:`run_step` waits for a message only where it is
    consumed and for a send only once its peer has posted the receive, which every
    peer did at its start: a valid schedule cannot deadlock. The price is one
    buffer per message received, held from the start of the step.
    """
    n_stages = p * v
    recvs: list[P2POp] = []
    out: list[Action | P2POp] = []
    for action in actions:
        kind, stage, micro = action
        what, step = ("act", 1) if kind == "F" else ("grad", -1)
        src, dst = stage - step, stage + step
        if kind != "W" and 0 <= src < n_stages and owner(src, p) != rank:
            tag = message_tag(what, src, micro, m)
            recvs.append(P2POp("recv", owner(src, p), what, src, micro, tag))
        out.append(action)
        if kind != "W" and 0 <= dst < n_stages and owner(dst, p) != rank:
            tag = message_tag(what, stage, micro, m)
            out.append(P2POp("send", owner(dst, p), what, stage, micro, tag))
    return recvs + out


class UniformCompute:
    """Every action padded to ``seconds[kind]``: sleep, work, sleep out the rest.

    Why sleep first: with equal durations every rank's actions end together, and
    the messages leave at those ends. Work done right after them would keep the
    cores busy just when the receivers must wake up (4 ranks on 2 cores: a
    message then waits milliseconds for a core, on every hop of the critical
    path). So the work goes last: the first sleep leaves 1.5 x the longest work
    this (kind, stage) has taken so far, plus 2 ms (nothing on the first call).
    Work longer than its pad makes the action longer (its span says so).
    """

    def __init__(self, seconds: Mapping[str, float]):
        self.seconds = dict(seconds)
        self.work: dict[tuple[str, int], float] = {}  # longest work seen

    def before(self, action: Action, start: float) -> None:
        seen = self.work.get((action.kind, action.stage))
        if seen is not None:
            _sleep_until(start + self.seconds.get(action.kind, 0.0) - 1.5 * seen - 2e-3)

    def after(self, action: Action, start: float, work_start: float) -> None:
        key = (action.kind, action.stage)
        took = time.perf_counter() - work_start
        self.work[key] = max(took, self.work.get(key, 0.0))
        _sleep_until(start + self.seconds.get(action.kind, 0.0))


def run_step(
    program: Sequence[Action | P2POp],
    stages: Mapping[int, PipelineStage],
    *,
    inputs: Sequence[torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None,
    shape: Sequence[int],
    peers: Sequence[int],
    group=None,
    dtype=torch.float32,
    device="cpu",
    meter=None,
    pad: UniformCompute | Mapping[str, float] | None = None,
    on_action: Callable[[Action], None] | None = None,
    t0: float | None = None,
) -> StepRecord:
    """Run one step of ``program`` (this rank's actions and p2p ops, in order).

    ``stages``: this rank's chunks by stage index. ``inputs`` / ``targets``: the
    micro-batches, needed where this rank holds the first / last stage. ``shape``
    and ``dtype``: every message's (agreed in advance). ``peers[k]``: the global
    rank at pipeline position k (``P2POp.peer`` is a position). ``meter``: counts
    each send's bytes. ``pad``: a :class:`UniformCompute` (keep one across steps:
    it learns how long the work takes) or its seconds per kind. ``on_action``:
    called after each action, inside its span (and its pad).
    """
    if pad is not None and not isinstance(pad, UniformCompute):
        pad = UniformCompute(pad)
    split = any(isinstance(op, Action) and op.kind == "W" for op in program)
    record = StepRecord()
    t0 = time.perf_counter() if t0 is None else t0
    ready: dict[tuple[str, int, int], torch.Tensor] = {}  # (what, producer, micro)
    posted: dict[tuple[str, int, int], tuple] = {}  # irecvs not yet waited for
    works: list = []  # sends in flight: (actions done when it started, op, work)
    done = 0  # actions done so far
    size = shape_bytes(shape, dtype)

    def take(key):  # a message for the action about to run: wait for it if posted
        if key in posted:
            op, buffer, work = posted.pop(key)
            start = time.perf_counter()
            _wait(work, op, peers)
            record.comm.append(_span(op, size, start, time.perf_counter(), t0))
            return buffer
        return ready.pop(key)  # made on this rank (a hand-off) or already here

    for op in program:
        start = time.perf_counter()
        if isinstance(op, P2POp):
            key = (op.what, op.stage, op.micro)
            if op.op == "recv":
                buffer, work = irecv(
                    shape, peers[op.peer], tag=op.tag, dtype=dtype, device=device,
                    group=group,
                )  # fmt: skip
                posted[key] = (op, buffer, work)
            else:
                tensor = ready.pop(key)
                works.append(
                    (done, op, send(tensor, peers[op.peer], tag=op.tag, group=group))
                )
                if meter is not None:
                    meter.count("send", tensor.numel() * tensor.element_size())
                record.comm.append(_span(op, size, start, time.perf_counter(), t0))
            continue
        kind, s, micro = op
        stage = stages[s]
        while works and works[0][0] < done - 1:  # sent two actions ago or more
            _, sent, work = works.pop(0)
            wait_start = time.perf_counter()
            _wait(work, sent, peers)  # gloo: done once the peer posted its recv
            record.comm.append(
                _span(sent, 0, wait_start, time.perf_counter(), t0, "wait")
            )
        message = None  # what the action consumes: waited for before it starts
        if kind == "F" and not stage.is_first:
            message = take(("act", s - 1, micro))
        elif kind == "B" and not stage.is_last:
            message = take(("grad", s + 1, micro))
        start = time.perf_counter()
        if pad is not None:
            pad.before(op, start)
        work_start = time.perf_counter()
        if kind == "F":
            x = inputs[micro] if stage.is_first else message
            out = stage.forward(micro, x, targets[micro] if stage.is_last else None)
            if out is not None:
                ready[("act", s, micro)] = out
        elif kind == "B":
            grad_x = stage.backward(micro, message, split=split)
            if grad_x is not None:
                ready[("grad", s, micro)] = grad_x
        else:
            stage.backward_weight(micro)
        if on_action is not None:
            on_action(op)
        if pad is not None:
            pad.after(op, start, work_start)
        record.actions.append(_span(op, 0, start, time.perf_counter(), t0))
        done += 1
    for _, sent, work in works:  # the step's last sends
        wait_start = time.perf_counter()
        _wait(work, sent, peers)
        record.comm.append(_span(sent, 0, wait_start, time.perf_counter(), t0, "wait"))
    if ready or posted:
        raise RuntimeError(
            f"messages never used: {sorted(ready)}; never waited for: {sorted(posted)}"
        )
    for stage in stages.values():
        stage.check_done()
    record.end = time.perf_counter() - t0
    return record


def shape_bytes(shape: Sequence[int], dtype=torch.float32) -> int:
    """Bytes of one message of ``shape`` and ``dtype``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _span(op, size: int, start: float, end: float, t0: float, name=None) -> dict:
    if isinstance(op, Action):
        return dict(
            action=str(op), kind=op.kind, stage=op.stage, micro=op.micro,
            start=start - t0, end=end - t0,
        )  # fmt: skip
    return dict(
        op=name or op.op, peer=op.peer, what=op.what, stage=op.stage, micro=op.micro,
        bytes=size, start=start - t0, end=end - t0,
    )  # fmt: skip


def _wait(work, op: P2POp, peers: Sequence[int]) -> None:
    """``work.wait()``; a failure (a timeout, a peer gone) says which message."""
    try:
        work.wait()
    except RuntimeError as err:
        made = f"{op.stage}{'F' if op.what == 'act' else 'B'}{op.micro}"
        side = "from" if op.op == "recv" else "to"
        raise RuntimeError(
            f"{op.op} of the {'activation' if op.what == 'act' else 'gradient'} "
            f"of {made} {side} rank {peers[op.peer]} (tag {op.tag}) failed: {err}"
        ) from err


def _sleep_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (no busy wait)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)
