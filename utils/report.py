"""What a rank hands back: the plain-data report every lab returns.

Introduced in chapter 0 ("Why one device is not enough"), used by every lab.
A report pickles across processes and round-trips through JSON, so the notebook,
the CLI (``--json PATH``) and the tests all read the same thing.

Each report carries the rank's place in the layout (``coords``: its dp, tp and pp
coordinates, from ``utils.dims.ParallelDims``) and, in ``extra``, the lab's own data
as a typed dataclass registered with :func:`lab_data` (``labs.zero.ZeroData``...),
never a free dict read by string keys. In JSON, ``extra`` is that dataclass's
fields and ``extra_type`` names the class, so :func:`load_reports` rebuilds it.

Byte units: :func:`format_bytes` is the one formatter of the course (binary units,
as allocators count); ``utils.hardware.GB`` is the vendors' decimal gigabyte.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
"""The memory categories every report uses, in stacking order."""

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float, precision: int = 1) -> str:
    """``1536 -> "1.5 KiB"``, ``-2048 -> "-2.0 KiB"``: binary units."""
    value, unit = abs(float(n)), _UNITS[0]
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    sign = "-" if n < 0 else ""
    if unit == "B":
        return f"{sign}{value:.0f} B"
    return f"{sign}{value:.{precision}f} {unit}"


def field_of(obj: Any, name: str) -> Any:
    """``obj.name``, or ``obj[name]`` for the dict form that JSON gives.

    Figures accept both a :class:`RankReport` and its ``to_dict()``; this is the one
    place that knows the two shapes.
    """
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


_LAB_DATA: dict[str, type] = {}
_IMPORTABLE = ("labs.", "utils.", "tests.")


def lab_data(cls: type) -> type:
    """Register a lab's dataclass of its own report data (a class decorator).

    The class becomes a dataclass if it is not one yet; its instances go in
    ``RankReport.extra`` and come back from JSON as instances of it.
    """
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)
    _LAB_DATA[_key_of(cls)] = cls
    return cls


def _module_name(module: str) -> str:
    """A module's importable name: ``python -m labs.x`` (and ``torchrun -m``) runs
    the lab as ``__main__``, whose real name its ``__spec__`` keeps, so a report
    saved there loads anywhere."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
    return module


def _key_of(cls: type) -> str:
    return f"{_module_name(cls.__module__)}:{cls.__qualname__}"


def _lab_data_class(key: str) -> type:
    if key not in _LAB_DATA:
        module = key.partition(":")[0]
        if not module.startswith(_IMPORTABLE):
            raise ValueError(f"unknown report extra_type {key!r}")
        importlib.import_module(module)  # registers its classes
    if key not in _LAB_DATA:
        raise ValueError(f"unknown report extra_type {key!r}")
    return _LAB_DATA[key]


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
    coords: dict[str, int] = field(default_factory=dict)
    """This rank's coordinates in the layout: {"dp": .., "tp": .., "pp": ..}."""
    losses: list[float] = field(default_factory=list)
    """The training loss after each step (the global-batch mean)."""
    memory: list[dict] = field(default_factory=list)
    """Phases in order: {"phase", "step", "current": {cat: bytes}, "peak": {...}}."""
    comm_bytes: int = 0
    """Bytes this rank sent per training step, as ``comm_source`` says."""
    comm_source: str = "modelled"
    """How ``comm_bytes`` was obtained: "counted" or "modelled" (``utils.comm``)."""
    wire_bytes: int | None = None
    """Bytes this rank's TCP sockets sent in the last step, counted by the kernel
    (``utils.wire``): gloo's real traffic, framing included; None where it cannot
    be measured (NCCL, not Linux)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds, e.g. {"step": ..., "compute": ..., "comm": ...}."""
    extra: Any = None
    """The lab's own data: an instance of a class registered with :func:`lab_data`."""

    def to_dict(self) -> dict:
        data = asdict(self)  # recurses into the extra dataclass
        if self.extra is not None:
            cls = type(self.extra)
            data["extra_type"] = _key_of(cls)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RankReport:
        data = dict(data)
        kind = data.pop("extra_type", None)
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown report fields {sorted(unknown)}")
        if kind is not None:
            data["extra"] = _lab_data_class(kind)(**data["extra"])
        return cls(**data)


def check_output_path(path: str | Path) -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    The folder must exist and be writable; the path must not be a folder. A
    symbolic link at the path is refused: in a shared folder (``/tmp``) another
    user could plant one to make us overwrite their target.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; refusing to write through it")
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; give a file name such as {path}/run.json"
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"folder {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path} exists and is not writable")
    return path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` all at once: a temporary file in the same folder,
    then ``os.replace``, which replaces a planted symlink instead of following it.
    A reader never sees half a file; a failure leaves the old file as it was."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_reports(reports: list[RankReport], path: str | Path) -> None:
    """Write reports as a JSON list (what every lab's ``--json PATH`` does)."""
    write_atomic(path, json.dumps([r.to_dict() for r in reports], indent=1))


def load_reports(path: str | Path) -> list[RankReport]:
    """Read a JSON list written by :func:`save_reports`."""
    return [RankReport.from_dict(d) for d in json.loads(Path(path).read_text())]
