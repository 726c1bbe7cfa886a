"""Checking pipeline schedules without running them: validity, timing, deadlock.

The schedules of ``utils.pipeline_parallel.schedules`` are plain lists, so what a
pipeline chapter usually argues with pictures can be computed:

* :func:`validate`: every forward and backward once per (stage, micro-batch), in an
  order the ranks can run together, with send/recv ops that cannot deadlock.
* :func:`simulate`: a discrete-event run of all ranks with per-kind durations,
  giving each action's (start, end), the makespan and the bubble.
* :func:`run_blocking`: the point-to-point ops run with blocking send/recv, which
  raises :class:`Deadlock` naming the ranks and the ops they are stuck on.
* :func:`peak_activations`: the most micro-batch activations a rank holds at once.
* :func:`expected_bubble`: the papers' bubble formulas, for comparison.

Bubble conventions: ``bubble`` is idle time over ``p * makespan`` ("of the step");
``bubble_of_ideal`` is idle time over compute time ("of ideal", the convention of
Narayanan et al. 2021, section 2.2, and the zero-bubble paper's table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from utils.checks import check_number
from utils.pipeline_parallel.schedules import (
    KINDS,
    SCHEDULES,
    Action,
    P2POp,
    Schedule,
    ScheduleError,
    all_ranks,
    check_sizes,
    interleaved,
    program,
    stages_of,
    timeline,
    zb1p,
)


class Deadlock(RuntimeError):
    """Blocking send/recv that can never complete; ``stuck`` maps rank -> its op."""

    def __init__(self, stuck: Mapping[int, P2POp | None]):
        self.stuck = dict(stuck)
        self.ranks = sorted(self.stuck)
        parts = [
            f"rank {r} on {op} (tag {op.tag})"
            if op is not None
            else f"rank {r} finished"
            for r, op in sorted(self.stuck.items())
        ]
        super().__init__("deadlock: " + "; ".join(parts))


def run_blocking(programs: Sequence[Sequence[Action | P2POp]]) -> int:
    """Run every rank's ops with rendezvous send/recv; return the messages passed.

    A send from ``a`` to ``b`` completes only together with ``b``'s recv from ``a``
    of the same tag, each being the op its rank has reached (compute actions never
    block). When no pair can complete and some rank has ops left, raise
    :class:`Deadlock` with every unfinished rank's op (and the finished ranks those
    wait for).
    """
    pos = [0] * len(programs)

    def head(rank: int) -> P2POp | None:
        ops = programs[rank]
        while pos[rank] < len(ops) and not isinstance(ops[pos[rank]], P2POp):
            pos[rank] += 1  # compute: runs without waiting
        return ops[pos[rank]] if pos[rank] < len(ops) else None

    passed = 0
    progress = True
    while progress:
        progress = False
        for rank in range(len(programs)):
            op = head(rank)
            if op is None or op.op != "send" or not 0 <= op.peer < len(programs):
                continue
            other = head(op.peer)
            if other is not None and (other.op, other.peer, other.tag) == (
                "recv",
                rank,
                op.tag,
            ):
                pos[rank] += 1
                pos[op.peer] += 1
                passed += 1
                progress = True
    stuck: dict[int, P2POp | None] = {
        r: head(r) for r in range(len(programs)) if head(r) is not None
    }
    if stuck:
        for op in list(stuck.values()):
            if op is not None and op.peer not in stuck:
                stuck[op.peer] = None  # waited for by a rank that has finished
        raise Deadlock(stuck)
    return passed


def programs(schedule: Schedule, p: int, m: int, v: int = 1, naive: bool = False):
    """Every rank's :func:`~utils.pipeline_parallel.schedules.program`."""
    return [program(rank, p, m, v, schedule, naive) for rank in range(p)]


def validate(schedule: Schedule, p: int, m: int, v: int = 1) -> None:
    """Raise :class:`ScheduleError` (or :class:`Deadlock`) unless ``schedule`` is sound.

    Per rank: only its own chunks; every (stage, micro) forward exactly once; its
    backward exactly once, after it; if the schedule splits the backward, its W
    exactly once, after its B. Across ranks: an order exists in which every F of
    stage s+1 follows F of s and every B of s follows B of s+1 (the last stage's B
    its F), each rank keeping its list's order (:func:`timeline`). Then the
    schedule's send/recv ops run under blocking semantics without deadlock.
    """
    ranks = all_ranks(schedule, p, m, v)
    split = any(a.kind == "W" for row in ranks for a in row)
    for rank, actions in enumerate(ranks):
        held = stages_of(rank, p, v)
        where: dict[Action, int] = {}
        for i, action in enumerate(actions):
            if not isinstance(action, Action) or action.kind not in KINDS:
                raise ScheduleError(f"rank {rank}: {action!r} is not an Action")
            if action.stage not in held or not 0 <= action.micro < m:
                raise ScheduleError(
                    f"rank {rank} runs {action}, but holds stages {held} "
                    f"and micro-batches 0..{m - 1}"
                )
            if action in where:
                raise ScheduleError(f"rank {rank} runs {action} twice")
            where[action] = i
        kinds = ("F", "B", "W") if split else ("F", "B")
        for stage in held:
            for micro in range(m):
                steps = [Action(k, stage, micro) for k in kinds]
                missing = [str(a) for a in steps if a not in where]
                if missing:
                    raise ScheduleError(f"rank {rank} never runs {', '.join(missing)}")
                for before, after in zip(steps, steps[1:]):
                    if where[after] < where[before]:
                        raise ScheduleError(f"rank {rank} runs {after} before {before}")
    timeline(ranks, v)  # dependency order across ranks
    run_blocking(programs(schedule, p, m, v))


# ------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Simulation:
    """The result of :func:`simulate`."""

    spans: list[list[tuple[Action, float, float]]]
    """Per rank, ``(action, start, end)`` in the rank's order."""
    makespan: float
    """When the last action ends (all start at 0)."""

    @property
    def busy(self) -> list[float]:
        """Per rank, the time spent computing."""
        return [sum(end - start for _, start, end in row) for row in self.spans]

    @property
    def idle(self) -> list[float]:
        """Per rank, ``makespan - busy``: its share of the bubble."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self) -> float:
        """Idle time over ``p * makespan``: the bubble's fraction of the step."""
        return sum(self.idle) / (len(self.spans) * self.makespan)

    @property
    def bubble_per_rank(self) -> list[float]:
        """Per rank, idle time over the makespan."""
        return [i / self.makespan for i in self.idle]

    @property
    def bubble_of_ideal(self) -> float:
        """Idle time over compute time: the bubble as a fraction of the ideal step."""
        return sum(self.idle) / sum(self.busy)


DEFAULT_TIMES = {"F": 1.0, "B": 1.0, "W": 1.0}


def simulate(
    p: int,
    m: int,
    v: int,
    schedule: Schedule,
    times: Mapping[str, float] | None = None,
    comm: float = 0.0,
) -> Simulation:
    """Run every rank's list as a discrete-event simulation.

    ``times`` gives each kind's duration (default 1 each; a missing kind keeps 1).
    In unsplit schedules B is the whole backward: compare ``zb1p`` at F=B=W=1 with
    the others at F=1, B=2. For interleaved, durations are per chunk. ``comm`` is
    added to every dependency that crosses ranks.
    """
    times = {**DEFAULT_TIMES, **(times or {})}
    for kind in KINDS:
        check_number(f"times[{kind!r}]", times[kind], minimum=0)
    check_number("comm", comm, minimum=0, strict=False)
    spans = timeline(all_ranks(schedule, p, m, v), v, times, comm)
    makespan = max((row[-1][2] for row in spans if row), default=0.0)
    return Simulation(spans, makespan)


def expected_bubble(
    schedule: Schedule,
    p: int,
    m: int,
    v: int = 1,
    times: Mapping[str, float] | None = None,
) -> float:
    """The papers' bubble, as a fraction of the step, with ``comm = 0``.

    Per rank the idle time is ``(p-1)(T_F + T_B)`` for GPipe and 1F1B (Huang et al.
    2019; Narayanan et al. 2021, section 2.2) and for interleaved with per-chunk
    times (busy ``v m (T_F + T_B)``, so ``(p-1)/(v m)`` of ideal), and
    ``(p-1)(T_F + T_B - T_W)`` for ZB-H1 (Qi et al. 2024, section 2.1; for
    ``m >= p`` and ``T_W <= T_F + T_B``).
    """
    check_sizes(0, p, m, v)
    t = {**DEFAULT_TIMES, **(times or {})}
    chunks = v if schedule is interleaved else 1
    if schedule is zb1p:
        idle, busy = (p - 1) * (t["F"] + t["B"] - t["W"]), m * sum(t.values())
    elif schedule in SCHEDULES.values():
        idle, busy = (p - 1) * (t["F"] + t["B"]), chunks * m * (t["F"] + t["B"])
    else:
        raise ValueError(f"no formula for {schedule!r}")
    return idle / (idle + busy)


# -------------------------------------------------------------- activations
def live_activations(
    actions: Sequence[Action], free_on: str | None = None
) -> list[int]:
    """Micro-batch activations held after each action.

    F stores one (per chunk: interleaved counts chunk activations, each ``1/v`` of
    a stage's); ``free_on`` releases it: "B", or "W" where the backward is split,
    since W still reads the layer inputs (the default when the list has W passes).
    """
    if free_on is None:
        free_on = "W" if any(a.kind == "W" for a in actions) else "B"
    if free_on not in ("B", "W"):
        raise ValueError(f"free_on must be 'B' or 'W', got {free_on!r}")
    held, out = 0, []
    for action in actions:
        held += (action.kind == "F") - (action.kind == free_on)
        out.append(held)
    return out


def peak_activations(actions: Sequence[Action], free_on: str | None = None) -> int:
    """The most activations the rank holds at once (see :func:`live_activations`).

    GPipe: ``m``. 1F1B: ``min(p - rank, m)``. Interleaved: ``min(warm-up + 1, m v)``
    chunk activations. ZB-H1: ``min(p, m)`` released at W, as 1F1B's rank 0.
    """
    return max(live_activations(actions, free_on), default=0)


def gantt(sim: Simulation) -> str:
    """The simulated timeline as text, one row per rank, one cell per time unit.

    For integer durations: an action of duration d fills d cells, idle is ``.``.
    """
    width = max((len(str(a)) for row in sim.spans for a, _, _ in row), default=1)
    rows = []
    for row in sim.spans:
        cells = ["." * width] * round(sim.makespan)
        for action, start, end in row:
            for t in range(round(start), round(end)):
                cells[t] = str(action).ljust(width)
        rows.append(" ".join(cells))
    return "\n".join(rows)
