"""What a rank hands back: the plain-data report every lab returns.

Introduced in chapter 0 ("Why one device is not enough"), used by every lab.
A report pickles across processes and round-trips through JSON, so the notebook,
the CLI (``--json PATH``) and the tests all read the same thing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
"""The memory categories every report uses, in stacking order."""


@dataclass
class RankReport:
    """One rank's record of one lab run."""

    rank: int
    """This rank's index in the world, 0..world_size-1."""
    world_size: int
    """How many ranks ran the job."""
    backend: str
    """The process-group backend: "gloo" or "nccl"."""
    device: str
    """Where this rank computed, e.g. "cpu" or "cuda:3"."""
    num_params: int
    """Parameters of the full (unsharded) model."""
    losses: list[float] = field(default_factory=list)
    """The training loss after each step (the global-batch mean)."""
    memory: list[dict] = field(default_factory=list)
    """Phases in order: {"phase", "step", "current": {cat: bytes}, "peak": {...}}."""
    comm_bytes: int = 0
    """Bytes this rank sent per training step."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds, e.g. {"step": ..., "compute": ..., "comm": ...}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything lab-specific (config, padding bytes, per-step timelines...)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankReport:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown report fields {sorted(unknown)}")
        return cls(**data)


def save_reports(reports: list[RankReport], path: str | Path) -> None:
    """Write reports as a JSON list (what every lab's ``--json PATH`` does)."""
    Path(path).write_text(json.dumps([r.to_dict() for r in reports], indent=1))


def load_reports(path: str | Path) -> list[RankReport]:
    """Read a JSON list written by :func:`save_reports`."""
    return [RankReport.from_dict(d) for d in json.loads(Path(path).read_text())]
