"""Record which code a rank executes, to tell SPMD from MPMD by what ran: chapter 6,
"SIMD and MIMD", section "SPMD and MPMD, traced".

``with CodePath(files) as path:`` records, in the order they happen on this thread,

* ``("call", name)``: every Python function entered whose code lives in one of
  ``files`` (``sys.setprofile``: the lab's own step functions, not torch's);
* ``("op", name)``: every operator that reaches torch's dispatcher below autograd
  (a ``TorchDispatchMode``): ``aten::addmm``, ``aten::threshold_backward`` and the
  collectives and point-to-point ops, ``c10d::allreduce_``, ``c10d::send``,
  ``c10d::recv_``, the same way ``utils.comm.CollectiveCounter`` sees them.

The op stream is the rank's instruction stream at the granularity of torch ops.
:func:`classify` compares the streams of the ranks: identical streams are one
program on several data (SPMD, in execution as in source); streams that differ are
several programs (MPMD), even when they come from one script that branches on the
rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.utils._python_dispatch import TorchDispatchMode


class _OpLog(TorchDispatchMode):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.events.append(("op", func._schema.name))
        return func(*args, **(kwargs or {}))


class CodePath:
    """Records the calls into ``files`` and the ops dispatched while active."""

    def __init__(self, files: Sequence[str]):
        self.files = set(files)
        self.events: list[tuple[str, str]] = []
        self._ops = _OpLog(self.events)
        self._previous = None

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename in self.files:
            self.events.append(("call", frame.f_code.co_name))

    def __enter__(self) -> CodePath:
        self._previous = sys.getprofile()
        self._ops.__enter__()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._previous)
        self._ops.__exit__(*exc)


def calls(events: Sequence) -> list[str]:
    """The Python functions entered, in order."""
    return [name for kind, name in events if kind == "call"]


def ops(events: Sequence) -> list[str]:
    """The dispatched ops, in order."""
    return [name for kind, name in events if kind == "op"]


def comm_ops(events: Sequence) -> list[str]:
    """Only the communication ops (``c10d::``), without the namespace."""
    return [name.partition("::")[2] for name in ops(events) if name.startswith("c10d")]


def path_summary(events: Sequence) -> list[str]:
    """The rank's path for display: its step functions and communication, in order
    (``"send"``, ``"recv"``, ``"allreduce"``: torch's trailing ``_`` dropped;
    comprehensions left out; a run of the same op as one ``"allreduce x4"``)."""
    names = []
    for kind, name in events:
        if kind == "call" and not name.startswith("<"):
            names.append(name)
        elif kind == "op" and name.startswith("c10d::"):
            names.append(name.partition("::")[2].rstrip("_"))
    out: list[str] = []
    counts: list[int] = []
    for name in names:
        if out and out[-1] == name and kind_of(name) == "comm":
            counts[-1] += 1
        else:
            out.append(name)
            counts.append(1)
    return [n if c == 1 else f"{n} x{c}" for n, c in zip(out, counts)]


COMM_NAMES = frozenset(
    ("send", "recv", "recv_any_source", "allreduce", "allreduce_coalesced",
     "broadcast", "reduce", "allgather", "_allgather_base",
     "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base",
     "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base", "gather",
     "scatter", "barrier")
)  # fmt: skip
"""torch's c10d op names (``torch.ops.c10d``), trailing ``_`` dropped."""


def kind_of(name: str) -> str:
    """ "comm" for a communication op's label in a path, else "call"."""
    return "comm" if name.split(" x")[0] in COMM_NAMES else "call"


def classify(streams: Sequence[Sequence]) -> str:
    """ "SPMD" when every rank's op stream is identical, else "MPMD"."""
    if len(streams) < 2:
        raise ValueError("classify needs the streams of at least two ranks")
    first = ops(streams[0])
    return "SPMD" if all(ops(s) == first for s in streams[1:]) else "MPMD"
