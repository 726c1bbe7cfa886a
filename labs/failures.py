"""Workshop lab: four faults injected into a data-parallel run, and what the tools say.

The workshop page ``workshop/failures.md`` ("Failure-injection lab"). Every rank
trains the same small MLP with SGD on its 1/world_size of a fixed global batch and
averages the gradients with one all-reduce of a flat buffer per step (chapter 1's
naive data parallelism), with the memory ledger (``utils.memory``) giving every
rank a device budget. One rank (``--rank``) can be made to misbehave; what the
launcher (``utils.launch``), the ledger and this lab print is what
``utils.failures.diagnose`` reads::

    python -m labs.failures --fault none
    python -m labs.failures --fault collective_mismatch --rank 1
    python -m labs.failures --fault collective_mismatch --mismatch op
    python -m labs.failures --fault collective_mismatch --check-collectives
    python -m labs.failures --fault hung_rank --rank 1 --timeout 3
    python -m labs.failures --fault oom --rank 1
    python -m labs.failures --fault loss_scaling
    torchrun --nproc-per-node 2 -m labs.failures --fault loss_scaling

Each fault, what the rank does wrong, and what happens (gloo on CPU, torch 2.13):

collective_mismatch
    ``--mismatch size``: rank ``--rank`` leaves its last parameter out of the
    gradient buffer (as if it had frozen it), so its all-reduce is smaller than its
    peers'. gloo aborts the rank with the smaller buffer (SIGABRT, "Received data
    size doesn't match expected size") within a second. ``--mismatch op``: it
    broadcasts the buffer where the others all-reduce it; every rank waits
    ``--timeout`` s, then fails waiting.
hung_rank
    Rank ``--rank`` sleeps ``HANG_TIMEOUTS`` x ``--timeout`` before step 1's
    all-reduce (stuck in I/O, a deadlock); its peers time out in the all-reduce and
    the launcher names it.
oom
    Rank ``--rank`` trains on the whole global batch, not its share (a forgotten
    ``shard_batch``); the ledger's device budget (``--device-mem-mb``) refuses the
    allocation that would exceed it: ``torch.OutOfMemoryError``, naming need and
    budget.
loss_scaling
    Every rank sums the gradients instead of averaging them. The run finishes; at
    step 0 the gradient is world_size x the single-process reference's
    (:func:`reference`), which :func:`describe` prints.

What happens was measured on gloo with torch 2.13 (``tests/test_failures.py``
checks each). ``--check-collectives`` runs the all-reduce on a group made with
``TORCH_DISTRIBUTED_DEBUG=DETAIL``'s checks (``dist.set_debug_level``): torch's
``ProcessGroupWrapper`` compares every rank's collective (op, shapes, dtypes) before
it runs and raises "Detected mismatch between collectives on ranks", naming both.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors
from torch.nn import functional as F

from utils import lab
from utils.checks import check_bool, check_int, check_number
from utils.cli import LabConfig, config_from_args, progress, run_from_cli
from utils.comm import CommMeter, all_reduce, broadcast
from utils.launch import LaunchError
from utils.memory import MemoryTracker
from utils.models import MLP, count_params, mlp_batch, shard_batch
from utils.report import RankReport, lab_data
from utils.wire import WireCounter

FAULTS = ("none", "collective_mismatch", "hung_rank", "oom", "loss_scaling")
ONE_RANK = ("collective_mismatch", "hung_rank", "oom")
"""The faults of one rank, ``--rank``."""
MISMATCHES = ("size", "op")
HANG_TIMEOUTS = 10
"""A hung rank sleeps this many timeouts: far past the point where its peers give
up, so the launcher, not the sleep, ends the job."""
MIB = 2**20


@dataclass(frozen=True)
class Config(LabConfig):
    """One run of the failure lab."""

    CHOICES = {**LabConfig.CHOICES, "fault": FAULTS, "mismatch": MISMATCHES}

    steps: int = 3
    """Training steps (a hung rank stops at step 1)."""
    fault: str = "none"
    """The fault to inject: none, collective_mismatch, hung_rank, oom or
    loss_scaling (see the module docstring)."""
    rank: int = 1
    """The rank that misbehaves (none, loss_scaling: ignored; in loss_scaling
    every rank does)."""
    mismatch: str = "size"
    """collective_mismatch: size (a smaller all-reduce) or op (a broadcast)."""
    check_collectives: bool = False
    """All-reduce on a group with TORCH_DISTRIBUTED_DEBUG=DETAIL's collective
    checks, which name a mismatch instead of crashing or hanging."""
    timeout: float = 3.0
    """Seconds a rank waits for its peers in a collective (and the launcher for
    stragglers): small, so that a hang ends fast."""
    device_mem_mb: float = 1.4
    """Device memory budget per rank in MiB for the memory ledger: a rank
    training on its share fits, one training on the whole batch does not."""
    sizes: tuple[int, ...] = (32, 256, 256, 8)
    """MLP widths (in, hidden..., out): 76,296 parameters."""
    rows_per_rank: int = 128
    """Rows of the batch each rank trains on per step; the global batch is
    world_size times this, so a rank's memory does not depend on world_size."""
    lr: float = 0.05
    """SGD's learning rate (plain SGD: a gradient twice too large is a step twice
    too long, so summed gradients change the loss; Adam would hide them)."""

    def __post_init__(self):
        super().__post_init__()
        if self.fault in ONE_RANK:  # the others ignore it (any rank count runs)
            check_int("rank", self.rank, minimum=0, maximum=self.world_size - 1)
        else:
            check_int("rank", self.rank, minimum=0)
        check_bool("check_collectives", self.check_collectives)
        check_number("timeout", self.timeout, minimum=0, maximum=3600)
        check_number("device_mem_mb", self.device_mem_mb, minimum=0)
        check_int("rows_per_rank", self.rows_per_rank, maximum=2**16)
        check_number("lr", self.lr, minimum=0, maximum=1e6)
        if len(self.sizes) < 2:
            raise ValueError(f"sizes must be >= 2 positive ints, got {self.sizes!r}")
        for width in self.sizes:
            check_int("each of sizes", width, maximum=2**14)
        if self.fault != "none" and self.world_size < 2:
            raise ValueError(
                f"fault={self.fault!r} needs world_size >= 2: a fault of one rank "
                "shows only against its peers"
            )
        if self.fault == "hung_rank" and self.steps < 2:
            raise ValueError("fault='hung_rank' hangs at step 1: it needs steps >= 2")

    @property
    def batch_size(self) -> int:
        """The global batch: ``world_size x rows_per_rank`` rows."""
        return self.world_size * self.rows_per_rank

    @property
    def device_budget(self) -> int:
        """The budget in bytes."""
        return int(self.device_mem_mb * MIB)

    def estimate_bytes(self) -> int:
        """Per rank: parameters, gradients and the flat buffer (12 B each), and
        the activations of the whole batch (the oom fault's) twice."""
        widths = list(self.sizes)
        params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        return 12 * params + 8 * self.batch_size * sum(widths)


TINY = Config(steps=2)
"""What tests run: 76,296 parameters, two steps, a fraction of a second."""


@lab_data
class FailuresData:
    """What the failure lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    grad_norms: list = field(default_factory=list)
    """Per step, the norm of the gradient after the all-reduce (every rank's)."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step by the all-reduce (modelled, ``utils.comm``)."""
    peak_device_bytes: int = 0
    """The device pool's peak over the run (the ledger), against the budget."""


def my_batch(cfg: Config, step: int, rank: int, n: int, device, whole: bool):
    """This rank's rows of the step's global batch (all of them when ``whole``:
    the oom fault's forgotten ``shard_batch``)."""
    batch = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
    if not whole:
        batch = shard_batch(batch, rank, n)
    return tuple(t.clone().to(device) for t in batch)


# [sync-start]
def sync_gradients(model, flat, meter, group=None, fault: str | None = None):
    """Average the gradients over the ranks with one all-reduce of the flat
    buffer ``flat`` (one element per parameter); returns the averaged gradient's
    norm. ``fault`` is what this rank gets wrong."""
    grads = [p.grad for p in model.parameters()]
    if fault == "size":  # a parameter left out: a smaller buffer than the peers'
        grads = grads[:-1]
    buffer = flat[: sum(g.numel() for g in grads)]
    torch.cat([g.reshape(-1) for g in grads], out=buffer)
    if fault == "op":  # a different collective than the peers'
        broadcast(buffer, src=0, meter=meter, group=group)
    else:
        all_reduce(buffer, meter=meter, group=group)
    if fault != "sum":  # the sum of the ranks' gradients, not yet their mean
        buffer /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(buffer[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(torch.linalg.vector_norm(buffer))


# [sync-end]


def train_step(model, opt, batch, flat, clock, meter, group=None, fault=None):
    """One SGD step on this rank's batch: (local loss, averaged gradient norm)."""
    x, y = batch
    opt.zero_grad()
    with clock("forward"):
        loss = F.mse_loss(model(x), y)
    with clock("backward"):
        loss.backward()
    with clock("sync", kind="comm", mark=False):
        norm = sync_gradients(model, flat, meter, group, fault)
    with clock("step"):
        opt.step()
    return loss.item(), norm


def _fault_of(cfg: Config, rank: int) -> str | None:
    """What ``sync_gradients`` gets wrong in this rank, if anything."""
    if cfg.fault == "loss_scaling":
        return "sum"  # every rank: the bug is in the shared code
    if cfg.fault == "collective_mismatch" and rank == cfg.rank:
        return cfg.mismatch
    return None


def checked_group():
    """A group whose collectives torch checks across ranks before running them:
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL``'s ``ProcessGroupWrapper`` (set here with
    ``dist.set_debug_level``, which ``new_group`` reads)."""
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    return dist.new_group()


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, train ``cfg.steps`` steps (misbehaving where
    ``cfg`` says), report."""
    cfg, rank, n, device = lab.join(cfg)
    group = checked_group() if cfg.check_collectives else None
    model = MLP(cfg.sizes, seed=cfg.seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    mem = MemoryTracker(device, device_budget=cfg.device_budget).watch(model, opt)
    meter, clock = CommMeter(), lab.PhaseClock(device, mem)
    fault = _fault_of(cfg, rank)
    whole = cfg.fault == "oom" and rank == cfg.rank
    losses, norms, sent, wired, times = [], [], [], [], []
    with mem:
        # Made once, like DDP's buckets. With a new buffer every step, a clean
        # rank's device peak varied from run to run by up to one buffer (the
        # previous step's, sometimes still alive: measured), and so would the
        # oom fault's verdict; with one buffer it is the same in every run.
        flat = torch.zeros(count_params(model), device=device)
        mem.mark("init")
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            batch = my_batch(cfg, step, rank, n, device, whole)
            clock.new_step(step)
            meter.reset()
            if cfg.fault == "hung_rank" and rank == cfg.rank and step == 1:
                time.sleep(HANG_TIMEOUTS * cfg.timeout)  # stuck: I/O, a deadlock
            wire = WireCounter().start()
            t0 = time.perf_counter()
            loss, norm = train_step(model, opt, batch, flat, clock, meter, group, fault)
            times.append(time.perf_counter() - t0)
            wired.append(wire.stop())
            lab.check_finite(loss, step)
            losses.append(loss)
            norms.append(norm)
            sent.append(meter.total)
            del batch
    peak = max(m["pools"]["device"]["peak_total"] for m in mem.timeline())
    return lab.rank_report(
        cfg,
        num_params=count_params(model),
        losses=lab.global_losses(losses),
        memory=mem.timeline(),
        comm_bytes=sent[-1],
        comm_source=meter.kind,
        wire_bytes=wired[-1],
        timings={"step": sum(times[1:] or times) / len(times[1:] or times)},
        extra=FailuresData(
            config=asdict(cfg),
            grad_norms=norms,
            comm_bytes_per_step=sent,
            peak_device_bytes=peak,
        ),
    )


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports; a
    fault that stops the job raises the launcher's ``LaunchError``."""
    return lab.run(worker, cfg, timeout=cfg.timeout)


# [reference-start]
def reference(cfg: Config) -> dict:
    """The single-process run that data parallelism must reproduce: the same
    model, batches and SGD on the whole batch, here in the caller. Returns
    ``{"losses", "grad_norms"}`` per step."""
    model = MLP(cfg.sizes, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses, norms = [], []
    for step in range(cfg.steps):
        x, y = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norms.append(float(torch.linalg.vector_norm(_flatten_dense_tensors(grads))))
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grad_norms": norms}


# [reference-end]


def describe(reports, cfg: Config) -> str:
    """The lab's verdict on a run that finished: its gradient norm and losses
    against the single-process reference's. At step 0 both start from the same
    parameters, so the ratio of the gradient norms is exact there."""
    r0 = reports[0]
    cfg = replace(cfg, world_size=r0.world_size)  # torchrun's, if it decided
    ref = reference(cfg)
    ratio = r0.extra.grad_norms[0] / ref["grad_norms"][0]
    ours = ", ".join(f"{v:.4f}" for v in r0.losses)
    theirs = ", ".join(f"{v:.4f}" for v in ref["losses"])
    peaks = [r.extra.peak_device_bytes for r in reports]
    return "\n".join(
        [
            f"gradient norm / single-process reference: x{ratio:.3f} at step 0 "
            f"(world_size={r0.world_size}; {r0.extra.grad_norms[0]:.6f} vs "
            f"{ref['grad_norms'][0]:.6f})",
            f"loss per step: {ours} (single process: {theirs})",
            f"device pool peak per rank: {peaks} bytes (budget "
            f"{cfg.device_budget:,} bytes)",
        ]
    )


def run_and_describe(cfg: Config) -> list[RankReport]:
    """What ``python -m labs.failures`` shows, as a function (the workshop page
    runs it under ``utils.failures.capture``): run, then print :func:`describe`'s
    verdict on a run that finished; a fault that stops the job raises."""
    reports = run(cfg)
    print(describe(reports, cfg))
    return reports


def main(argv=None) -> None:
    try:
        reports, args = run_from_cli(Config, run, argv)
    except (LaunchError, torch.OutOfMemoryError) as err:  # the fault's verdict
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json is None and int(os.environ.get("RANK", "0")) == 0:
        print(describe(reports, config_from_args(Config, args)))


if __name__ == "__main__":
    main()
