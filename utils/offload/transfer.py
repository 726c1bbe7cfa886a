"""Host <-> device copies, counted: what every offload piece moves, and how long.

Part of chapter 3 ("CPU offloading"). Every copy the course's offload pieces make
goes through one :class:`Transfers`, which adds its bytes to ``bytes["h2d"]`` or
``bytes["d2h"]`` (counted: the bytes of each copy made, not a formula) and its
duration to ``seconds``. On a GPU a copy is a real PCIe transfer: host buffers are
pinned (page-locked, so the DMA engine can read them without a staging copy), the
copy is issued ``non_blocking`` on a side stream, and the compute stream waits for
it only where the data is used; its time comes from CUDA events on that stream.
On the CPU fallback both sides are CPU memory: a copy is a ``memcpy`` into a new
storage that the memory ledger files in the other pool (``utils.memory.placement``),
timed with ``time.perf_counter``. What a copy of that many bytes would take over
PCIe is :func:`pcie_seconds` (modelled).

:class:`CrossDeviceCopies` counts the copies *torch's* pieces make instead (FSDP2's
``CPUOffloadPolicy``, ``save_on_cpu``), which do not go through ``Transfers``: a
dispatch mode that sees every ``aten._to_copy`` and ``aten.copy_`` between two
devices. On the CPU fallback it counts nothing, because there torch makes no copy:
``tensor.cpu()`` of a CPU tensor returns the tensor itself
(``torch/autograd/graph.py``, ``save_on_cpu``: "If the graph was already on CPU, no
tensor copy is performed"), and FSDP2's ``sharded_param_data.to(self.device,
non_blocking=True)`` (``_fsdp_param.py``, ``all_gather_inputs``) is the same tensor
when ``self.device`` is the CPU.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass_type,
)

from utils.hardware import CLUSTERS
from utils.memory import placement

__all__ = [
    "DIRECTIONS",
    "PCIE",
    "CrossDeviceCopies",
    "Transfers",
    "pcie_seconds",
]

DIRECTIONS = ("h2d", "d2h")
"""Host to device (parameters up, activations back for backward) and device to
host (gradients down, activations saved in forward)."""

PCIE = CLUSTERS["DGX A100 x 1"]
"""Whose host link the modelled times use: an A100's PCIe Gen4 x16, 32 GB/s per
direction (half the 64 GB/s total of NVIDIA's A100 datasheet; ``utils.hardware``)."""


def pcie_seconds(nbytes: float, bytes_per_s: float | None = None) -> float:
    """Modelled seconds to move ``nbytes`` one way after another over the host
    link (bytes / bandwidth; default :data:`PCIE`'s per-direction bandwidth)."""
    return float(nbytes) / (bytes_per_s or PCIE.host_bytes_per_s)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Transfers:
    """The counted copies between ``device`` and the host, and their time."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host = torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._events: list[tuple[str, object, object]] = []
        self.reset()

    # -- what was moved ---------------------------------------------------------------
    def reset(self) -> dict:
        """Start counting afresh; returns what was counted since the last reset."""
        done = self.totals() if hasattr(self, "bytes") else None
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.copies = dict.fromkeys(DIRECTIONS, 0)
        self._seconds = dict.fromkeys(DIRECTIONS, 0.0)
        self._events = []
        return done

    @property
    def seconds(self) -> dict[str, float]:
        """Measured seconds of the copies so far, per direction (on CUDA this
        waits for the side stream)."""
        if self._events:
            self.stream.synchronize()
            for direction, start, end in self._events:
                self._seconds[direction] += start.elapsed_time(end) / 1e3
            self._events = []
        return dict(self._seconds)

    def totals(self) -> dict:
        """``{"bytes": {...}, "copies": {...}, "seconds": {...}}`` by direction."""
        return {
            "bytes": dict(self.bytes),
            "copies": dict(self.copies),
            "seconds": self.seconds,
        }

    # -- buffers --------------------------------------------------------------------
    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer (pinned when the device is a GPU), in the host pool."""
        with placement("host"):
            return torch.empty(numel, dtype=dtype, pin_memory=self.cuda)

    def host_zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        out = self.host_empty(numel, dtype)
        with placement("host"):
            return out.zero_()

    # -- copies ---------------------------------------------------------------------
    def to_host(self, src: torch.Tensor, out: torch.Tensor | None = None):
        """Copy ``src`` (on the device) to the host, into ``out`` or a new buffer.

        On CUDA the copy is asynchronous: call :meth:`synchronize` before the host
        reads it (the optimizer step does).
        """
        if out is None:
            out = self.host_empty(src.numel(), src.dtype).view(src.shape)
        self._copy(out, src, "d2h")
        return out

    def to_device(self, src: torch.Tensor, out: torch.Tensor | None = None):
        """Copy ``src`` (on the host) to the device, into ``out`` or a new tensor;
        the device's current stream waits for it, so it can be used at once."""
        if out is None:
            with placement("device"):
                out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        self._copy(out, src, "h2d")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def synchronize(self) -> None:
        """Wait for the copies in flight (CUDA); nothing to wait for on CPU."""
        if self.cuda:
            self.stream.synchronize()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, direction: str) -> None:
        nbytes = _nbytes(src)
        self.bytes[direction] += nbytes
        self.copies[direction] += 1
        if not self.cuda:
            start = time.perf_counter()
            with torch.no_grad():
                dst.copy_(src)
            self._seconds[direction] += time.perf_counter() - start
            return
        stream = self.stream
        # The side stream must see what the compute stream wrote to ``src``.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        with torch.cuda.stream(stream), torch.no_grad():
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
        # Neither side may be freed and reused before the copy has run.
        for t in (dst, src):
            if t.device.type == "cuda":
                t.record_stream(stream)
        self._events.append((direction, start, end))


class CrossDeviceCopies(TorchDispatchMode):
    """Counts torch's own copies between ``device`` and the host, by direction.

    ``with CrossDeviceCopies(device) as copies: ...`` then ``copies.bytes``. Sees
    ``aten._to_copy`` (``.to()``, ``.cpu()``, ``.cuda()``) and ``aten.copy_`` whose
    source and destination are on different devices; a copy within one device,
    or a ``.to()`` that returns its input, is not a transfer.
    """

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.copies = dict.fromkeys(DIRECTIONS, 0)

    def reset(self) -> dict:
        done = {"bytes": dict(self.bytes), "copies": dict(self.copies)}
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.copies = dict.fromkeys(DIRECTIONS, 0)
        return done

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented  # a DTensor: its local copies come through here
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = dst = None
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
        if (
            isinstance(src, torch.Tensor)
            and isinstance(dst, torch.Tensor)
            and src.device != dst.device
        ):
            direction = "d2h" if dst.device.type == "cpu" else "h2d"
            self.bytes[direction] += _nbytes(src)
            self.copies[direction] += 1
        return out
