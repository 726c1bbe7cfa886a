"""Lab 0, "Why one device is not enough": memory anatomy, collectives, bus bandwidth.

Three parts, each run inside every rank:

* ``anatomy``: train a small MLP with fp32 Adam, every rank holding the full replica
  and averaging gradients with all-reduce; record memory by category at the end of
  forward, backward and the optimizer step (``utils.memory.MemoryTracker``).
* ``collectives``: run broadcast, reduce, all-reduce, reduce-scatter and all-gather
  on small tensors and keep each rank's tensor before and after.
* ``busbw``: time all-reduce over message sizes (warm-up, then the median) and
  report algbw and busbw as nccl-tests defines them.

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

from utils.cli import (
    LabConfig,
    check_choice,
    check_int,
    format_bytes,
    lab_parser,
    run_from_cli,
)
from utils.comm import CommMeter, all_reduce_mean, time_all_reduce
from utils.launch import launch, rank_device, synchronize
from utils.memory import MemoryTracker
from utils.models import MLP, count_params, mlp_batch, shard_batch
from utils.report import RankReport

PARTS = ("anatomy", "collectives", "busbw")
COLLECTIVES = ("broadcast", "reduce", "all_reduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class Config(LabConfig):
    """What one run of the lab does; validated on construction."""

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
    warmup: int = 3
    """Untimed all-reduces per size first (connections, caches, allocator)."""
    iters: int = 9
    """Timed all-reduces per size; the median is reported (robust to noise)."""

    def __post_init__(self):
        super().__post_init__()
        check_choice("part", self.part, ("all", *PARTS))
        if len(self.sizes) < 2:
            raise ValueError(f"sizes needs at least 2 widths, got {self.sizes!r}")
        for width in self.sizes:
            check_int("each of sizes", width)
        check_int("batch_size", self.batch_size)
        if "anatomy" in self.parts and self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} must divide by "
                f"world_size={self.world_size} (each rank takes an equal share)"
            )
        check_int("chunk", self.chunk)
        check_int("min_bytes", self.min_bytes, minimum=4)
        if self.min_bytes % 4:
            raise ValueError(
                f"min_bytes must be a multiple of 4 (fp32), got {self.min_bytes}"
            )
        check_int("max_bytes", self.max_bytes, minimum=self.min_bytes)
        check_int("warmup", self.warmup, minimum=0)
        check_int("iters", self.iters)

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
            all_reduce_mean([p.grad for p in model.parameters()], meter=meter)
            mem.mark("backward", step)  # every rank: the same averaged gradients
            optimizer.step()
            mem.mark("step", step)  # params + grads + optimizer states: 16 B/param
            synchronize(device)
            step_times.append(perf_counter() - start)
            global_loss = loss.detach() / world_size  # equal shares: mean of means
            dist.all_reduce(global_loss)
            report.losses.append(global_loss.item())
            del x, y, loss, global_loss
    report.num_params = count_params(model)
    report.memory = mem.timeline()
    report.comm_bytes = meter.total
    report.timings["step"] = statistics.median(step_times)
    report.extra["anatomy"] = {
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


def worker(cfg: Config) -> RankReport:
    """One rank's share of the lab: the parts ``cfg.part`` names, in order."""
    device = rank_device()
    report = RankReport(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        backend=dist.get_backend(),
        device=str(device),
        num_params=0,
        extra={"config": asdict(cfg)},
    )
    if "anatomy" in cfg.parts:
        anatomy(cfg, report, device)
    if "collectives" in cfg.parts:
        report.extra["collectives"] = collectives(cfg, device)
    if "busbw" in cfg.parts:
        report.extra["busbw"] = bus_bandwidth(cfg, device)
    return report


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and run the lab."""
    return launch(worker, cfg, world_size=cfg.world_size, backend=cfg.backend)


def describe(reports: list[RankReport]) -> str:
    """The collectives' tensors and the bandwidth table, as text (for the CLI)."""
    lines = []
    ordered = sorted(reports, key=lambda r: r.rank)
    if "collectives" in ordered[0].extra:
        for op in COLLECTIVES:
            lines.append(f"{op}:")
            for r in ordered:
                rec = r.extra["collectives"][op]
                lines.append(f"  rank {r.rank}: {rec['before']} -> {rec['after']}")
    if "busbw" in ordered[0].extra:
        lines.append(
            f"{'size':>10} {'time (us)':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"
        )
        for row in ordered[0].extra["busbw"]:
            lines.append(
                f"{format_bytes(row['bytes']):>10} {row['time_s'] * 1e6:>10.1f} "
                f"{row['algbw'] / 1e9:>11.3f} {row['busbw'] / 1e9:>11.3f}"
            )
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    parser = lab_parser(__doc__.splitlines()[0], defaults)
    add = parser.add_argument
    add("--part", choices=("all", *PARTS), default=defaults.part, help="what to run")
    add("--sizes", type=_sizes, default=defaults.sizes, help="MLP widths: 256,1024,256")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch")
    add("--chunk", type=int, default=defaults.chunk, help="collectives: chunk length")
    add("--min-bytes", type=int, default=defaults.min_bytes, help="smallest message")
    add("--max-bytes", type=int, default=defaults.max_bytes, help="largest message")
    add("--warmup", type=int, default=defaults.warmup, help="untimed iterations")
    add("--iters", type=int, default=defaults.iters, help="timed iterations (median)")
    reports, args = run_from_cli(parser, Config, run, argv)
    if int(os.environ.get("RANK", "0")) == 0 and args.json is None:
        print(describe(reports))


if __name__ == "__main__":
    main()
