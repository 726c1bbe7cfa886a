"""Lab 0, "Why one device is not enough": memory anatomy, collectives, bus bandwidth.

Three parts, each run inside every rank:

* ``anatomy``: train a small MLP with fp32 Adam, every rank holding the full replica
  and averaging gradients with all-reduce; record memory by category at the end of
  forward, backward and the optimizer step (``utils.memory.MemoryTracker``).
* ``collectives``: run broadcast, reduce, all-reduce, reduce-scatter and all-gather
  on small tensors and keep each rank's tensor before and after.
* ``busbw``: time all-reduce over message sizes (warm-up, then the median and the
  p10-p90 spread of the slowest rank) and report algbw and busbw as nccl-tests
  defines them.

Run it::

    python -m labs.foundations --world-size 4                    # all three parts
    python -m labs.foundations --world-size 4 --part collectives
    python -m labs.foundations --world-size 2 --part busbw --max-bytes 16777216
    torchrun --nproc-per-node 4 -m labs.foundations --part busbw
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id lab0 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m labs.foundations --part busbw   # on each node

(and ``sbatch labs/slurm/lab.sbatch labs.foundations --part busbw`` on Slurm).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from time import perf_counter

import torch
import torch.distributed as dist
from torch.nn import functional as F

from utils import lab
from utils.checks import check_int
from utils.cli import LabConfig, run_from_cli
from utils.comm import CommMeter, all_reduce_mean, time_all_reduce
from utils.launch import synchronize
from utils.memory import MemoryTracker
from utils.models import MLP, count_params, mlp_batch, shard_batch
from utils.report import RankReport, format_bytes, lab_data
from utils.wire import WireCounter

PARTS = ("anatomy", "collectives", "busbw")
COLLECTIVES = ("broadcast", "reduce", "all_reduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class Config(LabConfig):
    """What one run of the lab does; validated on construction."""

    CHOICES = {**LabConfig.CHOICES, "part": ("all", *PARTS)}

    world_size: int = 4
    """Ranks to start (under torchrun: the world torchrun started)."""
    part: str = "all"
    """Which part to run: "anatomy", "collectives", "busbw" or "all"."""
    steps: int = 3
    """Anatomy steps: the first creates Adam's states, later ones are steady."""
    sizes: tuple[int, ...] = (256, 1024, 1024, 256)
    """MLP widths: 1.6 M parameters, so the model states dominate on 2 CPU cores."""
    batch_size: int = 256
    """Global batch of the anatomy part; each rank takes batch_size / world_size."""
    chunk: int = 1
    """Collectives: elements per rank's chunk; tensors hold chunk * world_size."""
    min_bytes: int = 4096
    """Smallest all-reduce message (bytes); sizes grow 4x up to max_bytes."""
    max_bytes: int = 4 * 2**20
    """Largest all-reduce message: 4 MiB keeps the part under a second on gloo."""
    warmup: int = 5
    """Untimed all-reduces per size first (connections, caches, allocator):
    nccl-tests' -w default until 2025 (now 1 per size, over the whole sweep)."""
    iters: int = 20
    """Timed all-reduces per size, nccl-tests' -n default: the median and the
    p10-p90 spread of the slowest rank are reported (robust to a busy machine)."""

    def __post_init__(self):
        super().__post_init__()
        if len(self.sizes) < 2:
            raise ValueError(f"sizes needs at least 2 widths, got {self.sizes!r}")
        for width in self.sizes:
            check_int("each of sizes", width, maximum=2**16)
        check_int("batch_size", self.batch_size, maximum=2**20)
        if "anatomy" in self.parts and self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} must divide by "
                f"world_size={self.world_size} (each rank takes an equal share)"
            )
        check_int("chunk", self.chunk, maximum=2**20)
        check_int("min_bytes", self.min_bytes, minimum=4)
        if self.min_bytes % 4:
            raise ValueError(
                f"min_bytes must be a multiple of 4 (fp32), got {self.min_bytes}"
            )
        check_int("max_bytes", self.max_bytes, minimum=self.min_bytes, maximum=2**31)
        check_int("warmup", self.warmup, minimum=0, maximum=1000)
        check_int("iters", self.iters, maximum=10_000)

    def estimate_bytes(self) -> int:
        """Per rank: 16 B per MLP parameter plus twice its activations and batch
        share (anatomy), and two buffers of the largest message (busbw)."""
        widths = list(self.sizes)
        params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        rows = self.batch_size // self.world_size
        anatomy = 16 * params + 2 * 4 * rows * sum(widths)
        return (anatomy if "anatomy" in self.parts else 0) + (
            2 * self.max_bytes if "busbw" in self.parts else 0
        )

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS if self.part == "all" else (self.part,)

    def message_sizes(self) -> list[int]:
        """min_bytes, 4 min_bytes, 16 min_bytes, ... up to max_bytes."""
        sizes, size = [], self.min_bytes
        while size <= self.max_bytes:
            sizes.append(size)
            size *= 4
        return sizes


TINY = Config(
    world_size=2,
    steps=2,
    sizes=(16, 32, 8),
    batch_size=8,
    max_bytes=64 * 1024,
    warmup=1,
    iters=3,
)
"""The preset tests and CI use: a few seconds on 2 CPU cores."""


# [anatomy-start]
def anatomy(cfg: Config, report: RankReport, device: torch.device) -> None:
    """Train with every rank holding the full model, gradients and Adam states."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = MLP(cfg.sizes, seed=cfg.seed).to(device)  # the same replica everywhere
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # fp32: 4+4+8 B/param
    meter, step_times = CommMeter(), []
    mem = MemoryTracker(device).watch(model, optimizer)
    with mem:
        mem.mark("init")  # the model and the optimizer exist; no state yet
        for step in range(cfg.steps):
            start = perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batch = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
            x, y = (
                t.to(device, copy=True) for t in shard_batch(batch, rank, world_size)
            )
            del batch  # keep only this rank's share of the global batch
            loss = F.mse_loss(model(x), y)
            mem.mark("forward", step)  # activations saved for backward peak here
            loss.backward()
            meter.reset()
            wire = WireCounter().start()  # the kernel's count of what really left
            all_reduce_mean([p.grad for p in model.parameters()], meter=meter)
            report.wire_bytes = wire.stop()
            mem.mark("backward", step)  # every rank: the same averaged gradients
            optimizer.step()
            mem.mark("step", step)  # params + grads + optimizer states: 16 B/param
            synchronize(device)
            step_times.append(perf_counter() - start)
            report.losses.append(loss.item())  # this rank's; averaged below
            lab.check_finite(report.losses[-1], step)
            del x, y, loss
    report.losses = lab.global_losses(report.losses)  # equal shares: mean of means
    report.num_params = count_params(model)
    report.memory = mem.timeline()
    report.comm_bytes, report.comm_source = meter.total, meter.kind
    report.timings["step"] = statistics.median(step_times)
    report.extra.anatomy = {
        "sizes": list(cfg.sizes),
        "local_batch": cfg.batch_size // world_size,
        "optimizer": "Adam (fp32)",
    }


# [anatomy-end]


# [collectives-start]
def collectives(cfg: Config, device: torch.device) -> dict:
    """Each collective on a fresh tensor; every rank's tensor before and after.

    Rank r starts with [10(r+1), 10(r+1)+1, ...]: the tens digit names the rank
    (plus one) and the units digit the position, so the result shows who sent what.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    numel = cfg.chunk * n
    mine = slice(rank * cfg.chunk, (rank + 1) * cfg.chunk)

    def start() -> torch.Tensor:
        return torch.arange(numel, dtype=torch.float32, device=device) + 10 * (rank + 1)

    def run_one(op: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        x = start()
        if op == "broadcast":  # rank 0's tensor everywhere
            before = x.clone()
            dist.broadcast(x, src=0)
            return before, x, 0
        if op == "reduce":  # the sum lands on rank 0 only
            before = x.clone()
            dist.reduce(x, dst=0)
            return before, x, 0
        if op == "all_reduce":  # the sum everywhere
            before = x.clone()
            dist.all_reduce(x)
            return before, x, None
        if op == "reduce_scatter":  # rank r keeps chunk r of the sum
            out = torch.empty(cfg.chunk, device=device)
            dist.reduce_scatter_single(out, x)
            return x, out, None
        shard = x[mine].clone()  # all_gather: every rank's chunk everywhere
        out = torch.empty(numel, device=device)
        dist.all_gather_single(out, shard)
        return shard, out, None

    result = {}
    for op in COLLECTIVES:
        before, after, root = run_one(op)
        result[op] = {"before": before.tolist(), "after": after.tolist(), "root": root}
    return result


# [collectives-end]


def bus_bandwidth(cfg: Config, device: torch.device) -> list[dict]:
    """All-reduce time per message size; algbw = S/t, busbw = algbw * 2(n-1)/n."""
    return time_all_reduce(
        cfg.message_sizes(), warmup=cfg.warmup, iters=cfg.iters, device=device
    )


@lab_data
class FoundationsData:
    """What the foundations lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    anatomy: dict | None = None
    """The anatomy part's model: widths, this rank's batch rows, the optimizer."""
    collectives: dict | None = None
    """Per collective: this rank's tensor "before" and "after", and the "root"."""
    busbw: list | None = None
    """All-reduce timings per message size (``utils.comm.time_all_reduce`` rows)."""


def worker(cfg: Config) -> RankReport:
    """One rank's share of the lab: the parts ``cfg.part`` names, in order."""
    cfg, rank, n, device = lab.join(cfg)
    report = lab.rank_report(cfg, num_params=0, extra=FoundationsData(asdict(cfg)))
    if "anatomy" in cfg.parts:
        anatomy(cfg, report, device)
    if "collectives" in cfg.parts:
        report.extra.collectives = collectives(cfg, device)
    if "busbw" in cfg.parts:
        report.extra.busbw = bus_bandwidth(cfg, device)
    return report


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and run the lab."""
    return lab.run(worker, cfg)


def describe(reports: list[RankReport]) -> str:
    """The collectives' tensors and the bandwidth table, as text (for the CLI)."""
    lines = []
    ordered = sorted(reports, key=lambda r: r.rank)
    if ordered[0].extra.collectives:
        for op in COLLECTIVES:
            lines.append(f"{op}:")
            for r in ordered:
                rec = r.extra.collectives[op]
                lines.append(f"  rank {r.rank}: {rec['before']} -> {rec['after']}")
    if ordered[0].extra.busbw:
        lines.append(
            f"{'size':>10} {'time (us)':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"
        )
        for row in ordered[0].extra.busbw:
            lines.append(
                f"{format_bytes(row['bytes']):>10} {row['time_s'] * 1e6:>10.1f} "
                f"{row['algbw'] / 1e9:>11.3f} {row['busbw'] / 1e9:>11.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    reports, args = run_from_cli(Config, run, argv)
    if int(os.environ.get("RANK", "0")) == 0 and args.json is None:
        print(describe(reports))


if __name__ == "__main__":
    main()
