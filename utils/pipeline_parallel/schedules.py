"""Pipeline schedules as data: what each rank computes, and in which order.

A schedule here is a plain function ``(rank, p, m, v=1) -> list[Action]``: the
compute actions of one rank of a ``p``-stage pipeline over ``m`` micro-batches, with
``v`` model chunks per rank (only :func:`interleaved` takes ``v > 1``). Nothing here
touches ``torch.distributed``: the lab's executor runs these lists, and
``utils.pipeline_parallel.check`` validates and simulates them.

Notation: an action prints as ``<stage><kind><micro>``: ``0F1`` is stage 0's forward
of micro-batch 1, ``5B3`` stage 5's backward of micro-batch 3, ``2W0`` stage 2's
weight-gradient pass of micro-batch 0. ``stage`` is the model chunk (the virtual
stage, ``0 .. p*v - 1``); rank ``r`` holds chunks ``r, r + p, r + 2p, ...``. ``B`` is
the full backward, except in the zero-bubble schedule, where ``B`` computes the
input gradient only and ``W`` the weight gradient (Qi et al. 2024, section 2).

Bubble conventions (``idle`` = one rank's idle time in a step, ``busy`` = its compute):
"of the step" is ``idle / (idle + busy)``; "of ideal" is ``idle / busy``. GPipe and
1F1B give ``(p-1)/(m+p-1)`` of the step, that is ``(p-1)/m`` of ideal.

The four schedules follow picotron's ``pipeline_parallel.py`` shape (warm-up, steady
state, cool-down) and the orders of Megatron-LM's
``megatron/core/pipeline_parallel/schedules.py`` and torch's
``torch/distributed/pipelining/schedules.py``; each docstring names the lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

from utils.checks import check_int

KINDS = ("F", "B", "W")


class Action(NamedTuple):
    """One compute action: ``kind`` ("F", "B" or "W") of ``stage`` on ``micro``."""

    kind: str
    stage: int
    micro: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro}"


_ACTION = re.compile(r"(\d+)([FBW])(\d+)")


def parse(text: str) -> list[Action]:
    """``"0F0 0F1 0B0"`` -> the actions it names (the inverse of ``str``)."""
    out = []
    for word in text.split():
        match = _ACTION.fullmatch(word)
        if match is None:
            raise ValueError(
                f"{word!r} is not an action like '0F1' (stage, kind, micro)"
            )
        out.append(Action(match.group(2), int(match.group(1)), int(match.group(3))))
    return out


Schedule = Callable[..., list[Action]]


def check_sizes(rank: int, p: int, m: int, v: int = 1) -> None:
    """Raise ``ValueError`` unless ``p, m, v >= 1`` and ``0 <= rank < p``."""
    check_int("p (pipeline stages)", p)
    check_int("m (micro-batches)", m)
    check_int("v (model chunks per rank)", v)
    check_int("rank", rank, minimum=0, maximum=p - 1)


def _one_chunk(name: str, v: int) -> None:
    if v != 1:
        raise ValueError(f"{name} runs one model chunk per rank (v=1), got v={v}")


def owner(stage: int, p: int) -> int:
    """The rank holding model chunk ``stage``: chunks go round-robin over ranks."""
    return stage % p


def stages_of(rank: int, p: int, v: int = 1) -> list[int]:
    """The model chunks rank ``rank`` holds: ``rank, rank + p, ...`` (v of them)."""
    return [rank + chunk * p for chunk in range(v)]


# ---------------------------------------------------------------- the schedules
# [gpipe-start]
def gpipe(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    """GPipe (Huang et al. 2019, section 2.2): every forward, then every backward.

    Warm-up: the ``m`` forwards. Steady state: none. Cool-down: the ``m`` backwards.
    Bubble: ``(p-1)/(m+p-1)`` of the step (``(p-1)/m`` of ideal) for any F and B
    times; the rank holds all ``m`` activations at the turn. Same order as torch's
    ``ScheduleGPipe`` (torch/distributed/pipelining/schedules.py, line 872).
    """
    check_sizes(rank, p, m, v)
    _one_chunk("gpipe", v)
    actions = [Action("F", rank, i) for i in range(m)]  # warm-up: all forwards
    actions += [Action("B", rank, i) for i in range(m)]  # cool-down: all backwards
    return actions


# [gpipe-end]


# [one-f-one-b-start]
def one_f_one_b(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021, section 2.2, Figure 4 top).

    Warm-up: ``min(p - rank - 1, m)`` forwards. Steady state: one forward, one
    backward, until the forwards run out. Cool-down: the remaining backwards.
    Bubble: as GPipe, ``(p-1)/(m+p-1)`` of the step (``(p-1)/m`` of ideal), but the
    rank holds at most ``p - rank`` activations instead of ``m``. The counts are
    Megatron-LM's ``forward_backward_pipelining_without_interleaving``
    (schedules.py lines 2277-2279, loops at 2334, 2381 and 2452).
    """
    check_sizes(rank, p, m, v)
    _one_chunk("one_f_one_b", v)
    warmup = min(p - rank - 1, m)
    actions = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: F of micro i + warmup, B of micro i
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
    actions += [Action("B", rank, i) for i in range(m - warmup, m)]  # cool-down
    return actions


# [one-f-one-b-end]


# [interleaved-start]
def interleaved(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2, Figure 4 bottom).

    Rank ``r`` holds ``v`` chunks (``r, r + p, ...``); micro-batches go through the
    chunks in groups of ``p``: forwards of micro 0..p-1 on chunk 0, then on chunk 1,
    ..., then micro p..2p-1 (Megatron's ``get_schedule_table``, lines 989-1016, with
    ``microbatch_group_size_per_vp_stage = p``); backwards visit the chunks in
    reverse (``get_model_chunk_id``, lines 1244-1249). Warm-up:
    ``min(2*(p - rank - 1) + (v-1)*p, m*v)`` chunk forwards
    (``get_pp_rank_microbatches``, lines 964-965). Steady state: one chunk forward,
    one chunk backward (lines 1733-1746). Cool-down: the remaining chunk backwards
    (line 1972). torch's ``ScheduleInterleaved1F1B`` gives the same order (line 2891;
    ``_get_warmup_ops`` line 2872 with ``multiply_factor=2``).

    Bubble: ``(1/v) (p-1)/m`` of ideal, chunk F and B times being ``1/v`` of a whole
    stage's. Requires ``m`` to be a multiple of ``p``.
    """
    check_sizes(rank, p, m, v)
    if m % p:
        raise ValueError(
            f"interleaved needs m (micro-batches) a multiple of p={p}, got m={m}"
        )
    order = [  # (micro, chunk) of each chunk forward, in Megatron's table order
        (i, chunk)
        for group in range(0, m, p)
        for chunk in range(v)
        for i in range(group, group + p)
    ]

    def forward(k: int) -> Action:
        micro, chunk = order[k]
        return Action("F", rank + chunk * p, micro)

    def backward(k: int) -> Action:
        micro, chunk = order[k]
        return Action("B", rank + (v - 1 - chunk) * p, micro)

    total = m * v
    warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    actions = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):  # steady state
        actions += [forward(k + warmup), backward(k)]
    actions += [backward(k) for k in range(total - warmup, total)]  # cool-down
    return actions


# [interleaved-end]


# [zb1p-start]
def zb1p(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 2.1).

    The backward is split into ``B`` (input gradient, on the critical path) and ``W``
    (weight gradient, free to move). Warm-up: ``min(p - rank - 1, m)`` forwards, as
    1F1B. Steady state: ``F, B`` pairs, with rank ``r`` holding back its first ``r``
    ``W`` passes, then ``F, B, W``. Cool-down: ``B, W`` and the held-back ``W``
    passes last, where 1F1B's cool-down bubble was. Holding back ``r`` passes gives
    every rank the same ``p`` micro-batches in flight (released at ``W``), the peak
    of 1F1B's first rank. Order of torch's ``ScheduleInterleavedZeroBubble`` with one
    chunk (``_get_1f1b_rank_ops`` lines 2735-2869, ``num_1f1b_microbatches = rank``
    at line 3114).

    Bubble: ``(p-1)(T_F + T_B - T_W)`` per rank (the paper, section 2.1), a third
    of 1F1B's ``(p-1)(T_F + T_B + T_W)`` when ``T_F = T_B = T_W``: ``(p-1)/(3m)``
    of ideal, ``(p-1)/(3m+p-1)`` of the step.
    """
    check_sizes(rank, p, m, v)
    _one_chunk("zb1p", v)
    warmup = min(p - rank - 1, m)
    actions = [Action("F", rank, i) for i in range(warmup)]
    weights = 0  # W passes issued so far; W follows B in micro-batch order

    def after_backward(step: int) -> None:
        nonlocal weights
        if step >= rank:  # rank r holds back its first r weight passes
            actions.append(Action("W", rank, weights))
            weights += 1

    for i in range(m - warmup):  # steady state
        actions += [Action("F", rank, i + warmup), Action("B", rank, i)]
        after_backward(i)
    for i in range(m - warmup, m):  # cool-down
        actions.append(Action("B", rank, i))
        after_backward(i)
    actions += [Action("W", rank, i) for i in range(weights, m)]  # held back
    return actions


# [zb1p-end]


SCHEDULES: dict[str, Schedule] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb1p": zb1p,
}
"""The schedules by the names the lab's ``--schedule`` flag takes."""


def all_ranks(schedule: Schedule, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """Every rank's action list, rank 0 first."""
    return [schedule(rank, p, m, v) for rank in range(p)]


# --------------------------------------------------------- timing the actions
class ScheduleError(ValueError):
    """A schedule that cannot run: an action missing, repeated or out of order."""


def needs(action: Action, n_stages: int) -> Action | None:
    """The action on another stage (or the forward) that ``action`` waits for.

    F of stage s needs F of s-1 (its input); B of s needs B of s+1 (its output's
    gradient), the last stage's B its own F (the loss); W needs its B.
    """
    kind, stage, micro = action
    if kind == "F":
        return Action("F", stage - 1, micro) if stage > 0 else None
    if kind == "B":
        if stage == n_stages - 1:
            return Action("F", stage, micro)
        return Action("B", stage + 1, micro)
    return Action("B", stage, micro)


def timeline(
    ranks: list[list[Action]],
    v: int = 1,
    times: Mapping[str, float] | None = None,
    comm: float = 0.0,
) -> list[list[tuple[Action, float, float]]]:
    """``(action, start, end)`` of every action, each rank running its list in order.

    An action starts when its rank is free and what it :func:`needs` has ended (plus
    ``comm`` when that ran on another rank). ``times`` maps a kind to its duration
    (default 1 each). Raises :class:`ScheduleError` when no rank can go on.
    """
    times = {"F": 1.0, "B": 1.0, "W": 1.0, **(times or {})}
    p = len(ranks)
    n_stages = p * v
    end: dict[Action, float] = {}
    out: list[list[tuple[Action, float, float]]] = [[] for _ in ranks]
    free = [0.0] * p
    pos = [0] * p
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(ranks):
            while pos[rank] < len(actions):
                action = actions[pos[rank]]
                dep = needs(action, n_stages)
                ready = 0.0
                if dep is not None:
                    if dep not in end:
                        break
                    ready = end[dep] + (comm if owner(dep.stage, p) != rank else 0.0)
                if action.kind == "B" and Action("F", *action[1:]) not in end:
                    break  # its own forward has not run
                start = max(free[rank], ready)
                free[rank] = end[action] = start + times[action.kind]
                out[rank].append((action, start, free[rank]))
                pos[rank] += 1
                progress = True
    stuck = [r for r in range(p) if pos[r] < len(ranks[r])]
    if stuck:
        waits = "; ".join(f"rank {r} at {ranks[r][pos[r]]}" for r in stuck)
        raise ScheduleError(f"no rank can go on (dependency cycle): {waits}")
    return out


# -------------------------------------------------------- point-to-point ops
class P2POp(NamedTuple):
    """A blocking send or recv of ``what`` ("act" or "grad") produced by ``stage``.

    ``tag`` is unique per message within a step: both ends compute the same one.
    """

    op: str
    peer: int
    what: str
    stage: int
    micro: int
    tag: int

    def __str__(self) -> str:
        made = f"{self.stage}{'F' if self.what == 'act' else 'B'}{self.micro}"
        arrow = "->" if self.op == "send" else "<-"
        return f"{self.op} {self.what} of {made} {arrow} rank {self.peer}"


def message_tag(what: str, stage: int, micro: int, m: int) -> int:
    """A distinct non-negative int per (what, stage, micro) of one step."""
    return 2 * (stage * m + micro) + (what == "grad")


def program(
    rank: int,
    p: int,
    m: int,
    v: int,
    schedule: Schedule,
    naive: bool = False,
    times: Mapping[str, float] | None = None,
) -> list[Action | P2POp]:
    """Rank ``rank``'s actions with its sends and recvs in a deadlock-free order.

    F on a stage that is not last sends its activation to the holder of stage+1,
    after it; F on a stage that is not first receives one, before it; B likewise
    sends a gradient to the holder of stage-1 and receives one from stage+1 (the
    last stage's B starts from the loss). Hand-offs within one rank need no op.

    Order: every message gets the time its producer ends in the unit-time
    :func:`timeline`, and every rank's ops follow (time, tag). Both ends of each
    message therefore agree on one global order of messages, so under blocking
    send/recv the earliest unfinished message always finds both its ends waiting
    for it: no deadlock, whatever the real durations (``check.run_blocking``).

    ``naive=True`` instead puts each recv just before its action and each send just
    after: the order a first executor writes, which deadlocks 1F1B's steady state
    (rank r sends micro i+1's activation while rank r+1 sends micro i's gradient).

    ``times`` (per kind, as :func:`timeline` takes them) orders the messages by a
    timeline with those durations instead of unit times; the argument above holds
    for any times.
    """
    ranks = all_ranks(schedule, p, m, v)
    n_stages = p * v
    rows = timeline(ranks, v, times)
    ends = {action: end for row in rows for action, _, end in row}
    events: list[tuple[float, int, int, Action | P2POp]] = []
    for action, start, end in rows[rank]:
        events.append((start, 2, 0, action))  # comm first at equal times
        kind, stage, micro = action
        if kind == "W":
            continue
        what, step = ("act", 1) if kind == "F" else ("grad", -1)
        src = stage - step  # the stage whose output this action consumes
        if 0 <= src < n_stages and owner(src, p) != rank:
            tag = message_tag(what, src, micro, m)
            made = start if naive else ends[Action(kind, src, micro)]
            recv = P2POp("recv", owner(src, p), what, src, micro, tag)
            events.append((made, int(naive), tag, recv))  # naive: after sends
        dst = stage + step
        if 0 <= dst < n_stages and owner(dst, p) != rank:
            tag = message_tag(what, stage, micro, m)
            send = P2POp("send", owner(dst, p), what, stage, micro, tag)
            events.append((end, 0, tag, send))
    events.sort(key=lambda e: e[:3])
    return [e[3] for e in events]


def comm_ops(
    rank: int, p: int, m: int, v: int, schedule: Schedule, naive: bool = False
) -> list[P2POp]:
    """Rank ``rank``'s sends and recvs, in the order of :func:`program`."""
    ops = program(rank, p, m, v, schedule, naive)
    return [op for op in ops if isinstance(op, P2POp)]


def table(schedule: Schedule, p: int, m: int, v: int = 1) -> str:
    """One line per rank, its actions in order: ``"0F0 0F1 0B0 0B1"``."""
    return "\n".join(" ".join(map(str, row)) for row in all_ranks(schedule, p, m, v))
