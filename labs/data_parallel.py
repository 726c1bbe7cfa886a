"""Lab 1, data parallelism: every rank a full replica, gradients averaged.

Chapter 1 ("Data parallelism"). Each rank trains the same MLP with Adam on its
1/world_size share of a fixed global batch, averages gradients with one of three
implementations, and reports losses, memory by category, bytes sent and a
compute/communication timeline measured per rank::

    python -m labs.data_parallel --world-size 4 --impl naive
    python -m labs.data_parallel --world-size 4 --impl bucketed --bucket-mb 0.25
    python -m labs.data_parallel --world-size 2 --impl bucketed --allreduce ring
    python -m labs.data_parallel --world-size 4 --impl ddp --accum-steps 2
    torchrun --nproc-per-node 4 -m labs.data_parallel --impl bucketed

``naive`` and ``bucketed`` are ``utils.data_parallel.ddp.NaiveDDP`` /
``BucketedDDP``; ``ddp`` is torch's DistributedDataParallel with a comm hook that
times its buckets. Timings
(``RankReport.timings``, seconds per step, mean over all steps but the first):
compute (forward, backward, optimizer step), comm (time with an all-reduce in
flight), overlap (comm during compute) and exposed_comm (comm - overlap). DDP waits
for its buckets at the end of backward, inside autograd, so for ``ddp`` that wait is
counted as compute and exposed_comm reads 0.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from utils import lab
from utils.checks import check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.comm import CommMeter, all_reduce, nbytes, ring_all_reduce, time_all_reduce
from utils.data_parallel.ddp import ALLREDUCE, BucketedDDP, NaiveDDP
from utils.launch import launch, rank_device
from utils.memory import MemoryTracker
from utils.models import MLP, count_params, mlp_batch, shard_batch
from utils.report import RankReport, lab_data
from utils.wire import WireCounter

IMPLS = ("naive", "bucketed", "ddp")


@dataclass(frozen=True)
class Config(LabConfig):
    """One data-parallel training run."""

    CHOICES = {**LabConfig.CHOICES, "impl": IMPLS, "allreduce": ALLREDUCE}
    CLI_HIDDEN = ("return_params",)

    steps: int = 4
    """Optimizer steps; timings average all but the first (warm-up) step."""
    impl: str = "bucketed"
    """How gradients are averaged: naive, bucketed (overlapping backward) or ddp."""
    allreduce: str = "builtin"
    """builtin: the backend's all-reduce; ring: utils.comm.ring_all_reduce."""
    bucket_mb: float = 0.25
    """Bucket capacity in MiB (DDP's default is 25; small so this model has several)."""
    accum_steps: int = 1
    """Micro-batches accumulated per step; only the last one synchronises."""
    batch_size: int = 64
    """Global batch per step, whatever the world size: losses do not depend on it."""
    sizes: tuple[int, ...] = (256, 512, 512, 512, 256)
    """MLP widths (in, hidden..., out): about 0.7 M parameters."""
    lr: float = 1e-3
    """Adam's learning rate."""
    track_memory: bool = True
    """Record the memory timeline (a dispatch mode; the benchmark turns it off)."""
    return_params: bool = False
    """Send the final parameters back in ``extra["params"]`` (tests compare them)."""

    def __post_init__(self):
        super().__post_init__()
        check_int("accum_steps", self.accum_steps, maximum=4096)
        check_int("batch_size", self.batch_size, maximum=2**20)
        if self.allreduce == "ring" and self.impl == "ddp":
            raise ValueError("allreduce='ring' needs impl naive or bucketed, not ddp")
        check_number("bucket_mb", self.bucket_mb, minimum=0, maximum=2**20)
        per_step = self.world_size * self.accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must divide into world_size="
                f"{self.world_size} x accum_steps={self.accum_steps} = {per_step} "
                "equal micro-batches"
            )
        if len(self.sizes) < 2:
            raise ValueError(f"sizes must be >= 2 positive ints, got {self.sizes!r}")
        for width in self.sizes:
            check_int("each of sizes", width, maximum=2**16)
        check_number("lr", self.lr, minimum=0, maximum=1e6)

    def estimate_bytes(self) -> int:
        """Per rank: fp32 params, grads, Adam's two states, buckets (16 + 4 B per
        parameter), plus the batch and twice the activations of this rank's rows."""
        widths = list(self.sizes)
        params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        rows = self.batch_size // self.world_size
        acts = rows * sum(widths) * 4 * 2
        data = self.steps * rows * (widths[0] + widths[-1]) * 4
        return 20 * params + acts + data


TINY = Config(steps=3, batch_size=16, sizes=(32, 64, 64, 8), bucket_mb=0.01)
"""What tests and CI run: 6,792 parameters in 2-3 buckets, a few seconds."""


# [wrap-start]
def wrap(model, cfg: Config, meter: CommMeter, events: list):
    """The data-parallel replica: one of our wrappers, or torch's DDP."""
    if cfg.impl == "naive":
        ddp = NaiveDDP(model, allreduce=cfg.allreduce, meter=meter)
    elif cfg.impl == "bucketed":
        ddp = BucketedDDP(model, cfg.bucket_mb, allreduce=cfg.allreduce, meter=meter)
    else:
        device = next(model.parameters()).device
        ddp = DistributedDataParallel(
            model,
            device_ids=None if device.index is None else [device.index],
            bucket_cap_mb=cfg.bucket_mb,
            gradient_as_bucket_view=True,  # grads live in the buckets: no extra copy
        )
        ddp.register_comm_hook((meter, events), _timed_allreduce_hook)
    if cfg.impl != "ddp":
        ddp.comm_events = events
    return ddp


# [wrap-end]


@lab_data
class DataParallelData:
    """What the data-parallel lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    timeline: list = field(default_factory=list)
    """Per step: measured intervals {"kind": compute|wait|comm, "name", "start",
    "end"}, seconds from the step's start."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step (as ``RankReport.comm_source`` says)."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    comm_by_op: dict = field(default_factory=dict)
    """Bytes of the last step by operation."""
    comm_sources: dict = field(default_factory=dict)
    """For each operation: "counted" (real sends) or "modelled" (bus factor)."""
    grad_bytes: int = 0
    """Bytes of one full set of gradients (what the all-reduce averages)."""
    rows_per_rank: int = 0
    """Rows of the global batch this rank computed per step."""
    param_checksum: float = 0.0
    """Sum of every final parameter (equal on every rank: the replicas agree)."""
    params: dict | None = None
    """The final parameters (name -> nested lists) when ``return_params``."""


def _timed_allreduce_hook(state, bucket):
    """torch's default DDP hook (average a bucket), plus bytes and timestamps."""
    meter, events = state
    event = {"kind": "comm", "name": f"bucket {bucket.index()}"}
    event["start"] = time.perf_counter()
    events.append(event)
    buffer = bucket.buffer().div_(dist.get_world_size())
    fut = all_reduce(buffer, meter=meter, async_op=True).get_future()

    def done(f):
        event.setdefault("end", time.perf_counter())
        return f.value()[0]

    return fut.then(done)


# [train-step-start]
def train_step(model, opt, micro_batches, cfg: Config, clock) -> float:
    """One optimizer step over this rank's micro-batches; returns its local loss."""
    opt.zero_grad(set_to_none=False)  # keep the grads allocated (16 B/param)
    total = 0.0
    for k, (x, y) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with nullcontext() if last else model.no_sync():  # sync only the last
            with clock("forward"):
                loss = F.mse_loss(model(x), y) / len(micro_batches)
            with clock("backward"):
                loss.backward()  # bucketed/ddp: all-reduces start in here
        total += loss.item()
    if cfg.impl != "ddp":  # DDP waits inside backward; ours wait here
        with clock("sync", kind="wait", mark=False):
            model.finish_gradient_synchronization()
    with clock("step"):
        opt.step()
    return total


# [train-step-end]


def my_share(cfg: Config, step: int, rank: int, n: int, device) -> list[tuple]:
    """This rank's rows of the step's global batch, as ``accum_steps`` micro-batches.

    Made before tracking starts and copied out of the global batch, as a
    distributed data loader would deliver them: a rank holds only its own rows.
    """
    x, y = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
    x, y = (t.clone().to(device) for t in shard_batch((x, y), rank, n))
    return list(zip(x.chunk(cfg.accum_steps), y.chunk(cfg.accum_steps)))


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, replicate, train ``cfg.steps`` steps, report."""
    cfg, rank, n, device = lab.join(cfg)
    meter, comm_events = CommMeter(), []
    model = wrap(MLP(cfg.sizes, seed=cfg.seed).to(device), cfg, meter, comm_events)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mem = MemoryTracker(device).watch(model.module, opt) if cfg.track_memory else None
    clock = lab.PhaseClock(device, mem)
    losses, sent, wired, timeline = [], [], [], []
    loader = [my_share(cfg, step, rank, n, device) for step in range(cfg.steps)]
    with mem if mem is not None else nullcontext():
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            micro = loader.pop(0)  # this step's micro-batches; freed after it
            clock.new_step(step)
            comm_events.clear()
            meter.reset()
            dist.barrier()  # ranks start the step together: comparable timelines
            wire = WireCounter().start()
            t0 = time.perf_counter()
            losses.append(train_step(model, opt, micro, cfg, clock))
            wired.append(wire.stop())
            lab.check_finite(losses[-1], step)
            sent.append(meter.total)
            events = sorted(clock.events + comm_events, key=lambda e: e["start"])
            timeline.append(
                [{**e, "start": e["start"] - t0, "end": e["end"] - t0} for e in events]
            )
    params = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    grad_bytes = sum(nbytes(p) for p in model.module.parameters() if p.requires_grad)
    return lab.rank_report(
        cfg,
        num_params=count_params(model.module),
        losses=lab.global_losses(losses),
        memory=mem.timeline() if mem is not None else [],
        comm_bytes=sent[-1],
        comm_source=meter.kind,
        wire_bytes=wired[-1],
        timings=split_times(timeline[1:] or timeline),
        extra=DataParallelData(
            config=asdict(cfg),
            timeline=timeline,
            comm_bytes_per_step=sent,
            wire_bytes_per_step=wired,
            comm_by_op=dict(meter.by_op),
            comm_sources=dict(meter.source),
            grad_bytes=grad_bytes,
            rows_per_rank=cfg.batch_size // n,
            param_checksum=float(sum(p.double().sum() for p in params.values())),
            params={k: v.tolist() for k, v in params.items()}
            if cfg.return_params
            else None,
        ),
    )


def _union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def split_times(timeline: list[list[dict]]) -> dict[str, float]:
    """Mean seconds per step: step, compute, comm, overlap (comm hidden behind
    compute) and exposed comm (comm - overlap), from measured intervals."""
    rows = []
    for events in timeline:
        compute = _union(
            [(e["start"], e["end"]) for e in events if e["kind"] == "compute"]
        )
        comm = _union([(e["start"], e["end"]) for e in events if e["kind"] == "comm"])
        hidden = [(max(a, c), min(b, d)) for a, b in compute for c, d in comm]
        overlap = _length([(s, e) for s, e in hidden if e > s])
        rows.append(
            {
                "step": max(e["end"] for e in events),
                "compute": _length(compute),
                "comm": _length(comm),
                "overlap": overlap,
                "exposed_comm": _length(comm) - overlap,
            }
        )
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports."""
    return lab.run(worker, cfg)


def bandwidth_worker(
    sizes_bytes: list[int], iters: int = 5, warmup: int = 3
) -> list[dict]:
    """The ring against the built-in all-reduce: ``utils.comm.time_all_reduce``."""
    impls = {"builtin": dist.all_reduce, "ring": ring_all_reduce}
    return time_all_reduce(
        sizes_bytes, impls, warmup=warmup, iters=iters, device=rank_device()
    )


def measure_bandwidth(
    world_size: int, sizes_bytes, iters: int = 5, backend: str = "auto"
) -> list[dict]:
    """Rank 0's rows of :func:`bandwidth_worker` on ``world_size`` ranks."""
    sizes = [int(s) for s in sizes_bytes]
    return launch(
        bandwidth_worker, sizes, iters, world_size=world_size, backend=backend
    )[0]


def main(argv=None) -> None:
    run_from_cli(Config, run, argv)


if __name__ == "__main__":
    main()
