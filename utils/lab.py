"""What every lab shares around its training loop, so a lab reads
build -> apply -> loop -> report.

Introduced in chapter 0 ("Why one device is not enough"); every ``labs/<name>.py``
uses it:

- :func:`join`: this rank's place (rank, world size, device) and the Config with
  the world size torchrun decided;
- :class:`PhaseClock`: times each phase of a step (measured, with a device sync
  before reading the clock) and marks the memory ledger after it;
- :func:`global_losses`: the global-batch loss of each step, all-reduced once after
  the loop (one collective, not one per step); :func:`check_finite` stops a run
  whose loss is NaN or infinite, naming the step;
- :func:`rank_report`: the report shell every lab fills;
- :func:`run`: refuse a launch the machine cannot hold (memory estimate against
  what is available), then start the ranks through ``utils.launch``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import replace

import psutil
import torch
import torch.distributed as dist

from utils.launch import (
    LaunchConfigError,
    in_torchrun,
    launch,
    rank_device,
    synchronize,
)
from utils.report import RankReport, format_bytes

RANK_OVERHEAD_BYTES = 400 * 2**20
"""Memory one rank needs besides its tensors: the forked interpreter with torch
(pages shared with the fork server are not counted twice, but each rank touches
its own), gloo's buffers and the ledger. A generous round figure: the check it
feeds refuses only launches that cannot fit."""


def join(cfg):
    """``(cfg, rank, world_size, device)`` inside a rank; under torchrun the world
    size is the launcher's, and ``cfg`` is updated to say so.

    ``device`` is the one ``utils.launch`` chose for this rank (``rank_device``):
    ``cuda:r`` under NCCL, ``cuda:(r % GPUs)`` for ranks sharing the GPUs through
    gloo, else the CPU. A lab builds its model, batches and ``MemoryTracker`` there,
    so ranks sharing a GPU each measure their own CUDA memory."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if n != cfg.world_size:
        cfg = replace(cfg, world_size=n)
    return cfg, rank, n, rank_device()


class PhaseClock:
    """Measured phases of a step, and a memory mark at the end of each.

    ``with clock("forward"):`` records ``{"kind", "name", "start", "end"}`` in
    ``events`` (``time.perf_counter`` seconds) and the phase's duration in
    ``seconds``; the device is synchronised before the clock is read, so a CUDA
    phase is timed when its kernels are done. ``mark=False`` times without a
    memory mark; ``kind`` tells compute from communication waits in figures.
    """

    def __init__(self, device, mem=None):
        self.device, self.mem = device, mem
        self.step: int | None = None
        self.events: list[dict] = []
        self.seconds: dict[str, float] = {}

    def new_step(self, step: int) -> None:
        self.step, self.events, self.seconds = step, [], {}

    @contextmanager
    def __call__(self, phase: str, kind: str = "compute", mark: bool = True):
        start = time.perf_counter()
        yield
        synchronize(self.device)
        end = time.perf_counter()
        self.events.append({"kind": kind, "name": phase, "start": start, "end": end})
        self.seconds[phase] = self.seconds.get(phase, 0.0) + end - start
        if self.mem is not None and mark:
            self.mem.mark(phase, step=self.step)


def check_finite(loss: float | torch.Tensor, step: int) -> None:
    """Stop the run when the loss is NaN or infinite, naming the step."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the loss is {value} at step {step}: training diverged (a learning "
            "rate too large, or an overflow in low precision)"
        )


def global_losses(local: list, group=None) -> list[float]:
    """The global-batch loss per step from each rank's loss on its equal share:
    the mean over ranks, by one all-reduce of every step's value at once."""
    values = torch.tensor([float(v) for v in local], dtype=torch.float64)
    device = rank_device()
    if device.type == "cuda":  # NCCL reduces device tensors only
        values = values.to(device)
    dist.all_reduce(values, group=group)
    return (values.cpu() / dist.get_world_size(group)).tolist()


def rank_report(cfg, *, num_params: int, coords=None, **fields) -> RankReport:
    """The report shell: this rank's identity and coordinates, plus ``fields``."""
    if coords is None:  # a one-axis lab: every rank is a data-parallel replica
        coords = {"dp": dist.get_rank(), "tp": 0, "pp": 0}
    return RankReport(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        backend=dist.get_backend(),
        device=str(rank_device()),
        num_params=num_params,
        coords=dict(coords),
        **fields,
    )


def check_memory(cfg) -> None:
    """Refuse a launch whose estimated memory exceeds what this machine has free.

    The estimate is ``world_size`` x (the rank overhead + the Config's own
    ``estimate_bytes()``, what its model, optimizer, batch and activations take per
    rank); it is compared with ``psutil.virtual_memory().available``. Better a
    clear refusal now than ``can't allocate memory`` from inside a rank a minute on.
    """
    per_rank = RANK_OVERHEAD_BYTES + int(cfg.estimate_bytes())
    need = cfg.world_size * per_rank
    available = psutil.virtual_memory().available
    if need > available:
        raise LaunchConfigError(
            f"this run needs about {format_bytes(need)} ({cfg.world_size} ranks x "
            f"{format_bytes(per_rank)}) but the machine has "
            f"{format_bytes(available)} available: use fewer ranks or a smaller "
            "model, batch or message"
        )


def run(worker, cfg, *, timeout: float = 60.0) -> list:
    """Check the configuration fits this machine, then start ``cfg.world_size``
    ranks (or join torchrun's world) and return what ``worker(cfg)`` returned in
    each rank, ordered by rank."""
    if not in_torchrun():
        check_memory(cfg)
    return launch(
        worker, cfg, world_size=cfg.world_size, backend=cfg.backend, timeout=timeout
    )


def run_many(worker, cfgs, *, timeout: float | None = None) -> list[list]:
    """Several configurations of one lab (same world size) in one launch: the
    ranks start once and run ``worker(cfg)`` for each in turn (:func:`each`);
    returns each configuration's per-rank results. Every configuration is checked
    against this machine's memory first. ``timeout`` (default 60 s plus 30 s per
    configuration) bounds the job as :func:`run`'s does."""
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("run_many needs at least one configuration")
    sizes = {c.world_size for c in cfgs}
    if len(sizes) != 1:
        raise ValueError(f"run_many needs one world size, got {sorted(sizes)}")
    if not in_torchrun():
        for cfg in cfgs:
            check_memory(cfg)
    if timeout is None:
        timeout = 60.0 + 30.0 * len(cfgs)
    per_rank = launch(
        each, worker, cfgs, world_size=sizes.pop(), backend=cfgs[0].backend,
        timeout=timeout,
    )  # fmt: skip
    return [list(results) for results in zip(*per_rank)]


def each(worker, cfgs) -> list:
    """``worker(cfg)`` for each configuration in turn, inside one set of ranks."""
    return [worker(c) for c in cfgs]
