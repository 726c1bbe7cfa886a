"""Lab 6, SIMD and MIMD: vector lanes, threads against processes, SPMD against MPMD.

Chapter 6 ("SIMD and MIMD"). Four parts (Flynn, "Some Computer Organizations and
Their Effectiveness", IEEE Trans. Computers, 1972):

* ``simd`` (rank 0, one thread, the other ranks waiting): an elementwise ``axpy``
  and a ``sum`` as a Python loop, as one-element torch ops and as one vectorised
  torch op, in float64, float32 and bfloat16; measured throughput beside the
  modelled peak of this CPU's vector units (``utils.simd_mimd.machine``).
* ``scaling``: one job (the sum of sin x) with 1, 2, ... intra-op threads in rank 0
  (``torch.set_num_threads``), then split over 1, 2, ... world_size processes
  (``worker_counts``: every count up to 8, then powers of two) that each do their
  share and add up their partial sums with an all-reduce; and each process doing
  the whole job (weak scaling). Amdahl's and Gustafson's serial
  fractions are fitted to the medians (``utils.simd_mimd.amdahl``).
* ``spmd``: which code each rank executes, recorded (``utils.simd_mimd.trace``) in
  one data-parallel step and in one step of a pipeline with one stage per rank.
* ``divergence`` (where a CUDA or ROCm GPU is present): a kernel in which half the
  lanes of each warp take the other branch (``utils.simd_mimd.kernels``);
  ``--record-gpu`` keeps the figures in ``utils/simd_mimd/gpu_recorded.json``.

The first three parts measure CPU processes, so their tensors stay on the CPU and
their messages go over gloo, also under a torchrun whose default group is NCCL.

Run it::

    python -m labs.simd_mimd                              # every part, 2 ranks
    python -m labs.simd_mimd --part simd --dtypes float32,bfloat16
    python -m labs.simd_mimd --world-size 4 --part scaling --threads 1,2,4
    python -m labs.simd_mimd --world-size 1 --part divergence --record-gpu  # a GPU
    torchrun --nproc-per-node 4 -m labs.simd_mimd --part spmd
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from utils import lab
from utils.checks import check_bool, check_choice, check_int
from utils.cli import LabConfig, run_from_cli
from utils.models import MLP, count_params, mlp_batch, shard_batch
from utils.report import RankReport, lab_data
from utils.simd_mimd import kernels, machine, steps, trace

PARTS = ("simd", "scaling", "spmd", "divergence")
TIMEOUT_S = 120.0
"""The launch's collective timeout: the longest a rank may wait in one barrier."""
SCALAR_ELEMENT_S = 25e-6
"""A generous cost of one element of the one-element torch loops (axpy and sum
together; about 17 us measured on a loaded 2-core EPYC): the SIMD part's budget."""


def worker_counts(n: int) -> tuple[int, ...]:
    """The worker counts the scaling part measures on n ranks: every one up to 8,
    then the powers of two, then n. Each count needs its own gloo group, whose k
    ranks open k - 1 connections each: every count up to 64 would hold rank 0 to
    about 2,000 sockets (past a laptop's open-file limit) and take minutes to set
    up."""
    counts = set(range(1, min(n, 8) + 1)) | {n}
    counts |= {2**i for i in range(n.bit_length()) if 2**i <= n}
    return tuple(sorted(counts))


@dataclass(frozen=True)
class Config(LabConfig):
    """One run of the lab; validated on construction, before any process starts."""

    CHOICES = {**LabConfig.CHOICES, "part": ("all", *PARTS)}

    world_size: int = 2
    """Ranks: the scaling part splits its job over 1..world_size of them
    (``worker_counts``)."""
    part: str = "all"
    """"simd", "scaling", "spmd", "divergence" (needs a GPU) or "all"."""
    steps: int = 1
    """SPMD part: steps traced (every step's path is recorded and printed)."""
    dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16")
    """SIMD part: the dtypes measured."""
    loop_numel: int = 2048
    """Elements of the Python and one-element-torch loops (each element costs
    between 0.1 and 20 us: small keeps the part to a second)."""
    vector_numel: int = 1 << 18
    """Elements of the vectorised op: enough that one call's fixed cost (a few us)
    is small next to its work."""
    repeats: int = 7
    """Timed repeats of every measurement (after one untimed): medians reported."""
    scaling_numel: int = 1 << 22
    """Scaling part: elements of the job (sum of sin x), split over the workers
    (a few ms on one core: long next to an all-reduce of one number)."""
    threads: tuple[int, ...] = (1, 2)
    """Scaling part: intra-op thread counts rank 0 runs the job with (1 among them:
    the speedups are against it)."""
    width: int = 16
    """SPMD part: width of the MLP (one linear layer per pipeline stage)."""
    batch_size: int = 8
    """SPMD part: the global batch (split over the ranks in the data-parallel step)."""
    record_gpu: bool = False
    """Divergence part: write its figures to utils/simd_mimd/gpu_recorded.json."""

    def __post_init__(self):
        super().__post_init__()
        # every traced op of every step is kept in the report and printed
        check_int("steps", self.steps, maximum=100)
        if not self.dtypes:
            raise ValueError(f"dtypes needs at least one of {tuple(kernels.DTYPES)}")
        for name in self.dtypes:
            check_choice("each of dtypes", name, tuple(kernels.DTYPES))
        if len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError(f"dtypes lists a dtype twice: {','.join(self.dtypes)}")
        # 2**16 one-element torch ops take about a second: the loops' total is
        # budgeted below against the barrier the other ranks wait at
        check_int("loop_numel", self.loop_numel, maximum=1 << 16)
        check_int("vector_numel", self.vector_numel, maximum=1 << 26)
        check_int("repeats", self.repeats, maximum=1000)
        check_int("scaling_numel", self.scaling_numel, maximum=1 << 28)
        if self.scaling_numel < self.world_size:
            raise ValueError(
                f"scaling_numel={self.scaling_numel} must be at least "
                f"world_size={self.world_size} (every worker needs a share)"
            )
        if not self.threads:
            raise ValueError("threads needs at least one thread count, such as 1,2")
        for k in self.threads:
            check_int("each of threads", k, maximum=1024)
        if len(set(self.threads)) != len(self.threads):
            raise ValueError(
                f"threads lists a count twice: {','.join(map(str, self.threads))}"
            )
        if 1 not in self.threads:
            raise ValueError(
                "threads must include 1, the time every speedup is measured "
                f"against: got {','.join(map(str, self.threads))}"
            )
        check_int("width", self.width, maximum=4096)
        check_int("batch_size", self.batch_size, maximum=1 << 16)
        check_bool("record_gpu", self.record_gpu)
        if "simd" in self.parts and self.simd_budget_s() > TIMEOUT_S / 2:
            raise ValueError(
                f"the SIMD part's one-element torch loops would take about "
                f"{self.simd_budget_s():.0f} s (loop_numel={self.loop_numel} x "
                f"(repeats={self.repeats} + 1) x {len(self.dtypes)} dtypes x "
                f"{SCALAR_ELEMENT_S * 1e6:g} us), while the other ranks wait at a "
                f"barrier that times out after {TIMEOUT_S:g} s: keep it under "
                f"{TIMEOUT_S / 2:g} s with a smaller loop_numel or fewer repeats"
            )
        if "spmd" in self.parts and self.world_size < 2:
            raise ValueError(
                f"part {self.part!r} includes 'spmd', which compares ranks: "
                f"world_size must be >= 2, got {self.world_size}"
            )
        if "spmd" in self.parts and self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} must divide by world_size="
                f"{self.world_size} (the data-parallel step splits it evenly)"
            )
        gpu = torch.cuda.is_available()
        if self.part == "divergence" and not gpu:
            raise ValueError(
                "part='divergence' needs a CUDA or ROCm GPU, and "
                "torch.cuda.is_available() is False here; the chapter shows the "
                "figures recorded on a GPU machine instead"
            )
        if self.record_gpu and (self.part not in ("divergence", "all") or not gpu):
            raise ValueError(
                "record_gpu needs part 'divergence' (or 'all') and a GPU: got "
                f"part={self.part!r}, torch.cuda.is_available()={gpu}"
            )

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS if self.part == "all" else (self.part,)

    def simd_budget_s(self) -> float:
        """Seconds the SIMD part's one-element torch loops may take, budgeted
        generously (:data:`SCALAR_ELEMENT_S` per element, every dtype and repeat)."""
        runs = (self.repeats + 1) * len(self.dtypes)
        return runs * self.loop_numel * SCALAR_ELEMENT_S

    def estimate_bytes(self) -> int:
        """Per rank: three vectors of the largest dtype, the Python lists (about
        32 bytes a float with its list slot), the job and its sin; for the SPMD
        part, the MLP of world_size layers of width x width floats, about four
        times over (the replica, its gradients, the pipeline's MLP and its
        gradients)."""
        mlp = self.world_size * (self.width + 1) * self.width * 4
        return (
            3 * 8 * self.vector_numel
            + 3 * 32 * self.loop_numel
            + (3 * 4 * self.scaling_numel)
            + (4 * mlp if "spmd" in self.parts else 0)
        )


TINY = Config(
    loop_numel=256, vector_numel=1 << 14, repeats=3, scaling_numel=1 << 16, width=8
)
"""The preset tests and CI use: every part in a second or two."""


def alone(rank: int, fn, group):
    """``fn()`` in rank 0 while the others wait at a barrier (so rank 0 has the
    machine to itself); its result in rank 0, None elsewhere."""
    dist.barrier(group=group)
    result = fn() if rank == 0 else None
    dist.barrier(group=group)
    return result


def simd(cfg: Config, rank: int, group):
    """Rank 0 alone, one intra-op thread: throughput of every (op, impl, dtype)."""

    def measure():
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # one core: the peak it is compared with is one's
        try:
            return kernels.measure_simd(
                cfg.dtypes,
                loop_numel=cfg.loop_numel,
                vector_numel=cfg.vector_numel,
                repeats=cfg.repeats,
                seed=cfg.seed,
            )
        finally:
            torch.set_num_threads(before)

    return alone(rank, measure, group)


# [scaling-start]
def job(x: torch.Tensor) -> torch.Tensor:
    """The work being parallelised: the sum of sin x (one element out)."""
    return torch.sin(x).sum().reshape(1)


def with_threads(x: torch.Tensor, k: int) -> float:
    """Seconds of the whole job in this process with k intra-op threads."""
    torch.set_num_threads(k)
    start = time.perf_counter()
    job(x)
    return time.perf_counter() - start


def with_processes(share, rank: int, k: int, group, everyone):
    """Workers 0..k-1 each compute their share, then add the k partial sums with an
    all-reduce: this rank's (compute, combine, total) seconds, None outside the k."""
    dist.barrier(group=everyone)  # every worker starts together
    if rank >= k:
        return None
    start = time.perf_counter()
    partial = job(share)
    mid = time.perf_counter()
    if k > 1:  # the part that does not shrink: combining the partial sums
        dist.all_reduce(partial, group=group)
    end = time.perf_counter()
    return mid - start, end - mid, end - start


def scaling(cfg: Config, rank: int, n: int, everyone) -> dict:
    """Rounds of every configuration once, interleaved, so that a busy moment of
    the machine slows all of them alike: k threads in rank 0 alone, then k of the
    n processes sharing the job (strong) or each doing all of it (weak)."""
    x = torch.rand(cfg.scaling_numel, generator=torch.Generator().manual_seed(cfg.seed))
    groups = {
        k: dist.new_group(list(range(k)), backend="gloo") for k in worker_counts(n)
    }
    shares = {k: x.tensor_split(k)[rank] for k in groups if rank < k}
    threads = {k: [] for k in cfg.threads}
    strong = {k: [] for k in groups}
    weak = {k: [] for k in groups}
    before = torch.get_num_threads()
    try:
        for repeat in range(1 + cfg.repeats):  # round 0 warms up, untimed
            for k in cfg.threads:
                t = alone(rank, functools.partial(with_threads, x, k), everyone)
                if rank == 0 and repeat:
                    threads[k].append(t)
            torch.set_num_threads(1)  # a process is one worker: one thread
            for k, group in groups.items():
                for runs, share in ((strong, shares.get(k)), (weak, x)):
                    t = with_processes(share, rank, k, group, everyone)
                    if t is not None and repeat:
                        runs[k].append(t)
        dist.barrier(group=everyone)
    finally:
        torch.set_num_threads(before)
    return {
        "threads": [
            {"threads": k, "samples_s": v, **kernels.summary(v)}
            for k, v in threads.items()
        ]
        if rank == 0
        else None,
        "processes": [_columns(k, v) for k, v in strong.items()],
        "weak": [_columns(k, v) for k, v in weak.items()],
    }


# [scaling-end]


def _columns(k: int, samples: list) -> dict | None:
    if not samples:
        return None  # this rank is not one of the k workers
    compute, combine, total = (list(c) for c in zip(*samples))
    return {"workers": k, "compute_s": compute, "combine_s": combine, "total_s": total}


def spmd(cfg: Config, rank: int, n: int, group) -> dict:
    """The recorded path of each rank through ``cfg.steps`` data-parallel steps and
    ``cfg.steps`` pipeline steps (an MLP with one linear layer per stage)."""
    sizes = (cfg.width,) * (n + 1)
    model = MLP(sizes, seed=cfg.seed)  # the data-parallel replica: the whole MLP
    stage = torch.nn.Sequential(*list(model)[2 * rank : 2 * rank + 2])  # its stage
    dp_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events = {"data_parallel": [], "pipeline_parallel": []}
    pipeline_losses = []
    for step in range(cfg.steps):
        x, y = mlp_batch(sizes, cfg.batch_size, seed=cfg.seed, step=step)
        xs, ys = shard_batch((x, y), rank, n)
        dist.barrier(group=group)
        with trace.CodePath([steps.__file__]) as path:
            steps.data_parallel_step(model, dp_opt, xs, ys, group)
        events["data_parallel"] += path.events
    pipe = torch.nn.Sequential(
        *list(MLP(sizes, seed=cfg.seed))[2 * rank : 2 * rank + 2]
    )
    pp_opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    for step in range(cfg.steps):
        x, y = mlp_batch(sizes, cfg.batch_size, seed=cfg.seed, step=step)
        dist.barrier(group=group)
        with trace.CodePath([steps.__file__]) as path:
            loss = steps.pipeline_step(pipe, pp_opt, x, y, rank, n, group)
        events["pipeline_parallel"] += path.events
        pipeline_losses.append(None if loss is None else loss.item())
    return {
        "events": {k: [list(e) for e in v] for k, v in events.items()},
        "pipeline_losses": pipeline_losses,
        "stage_params": count_params(stage),
        "params": count_params(model),
    }


def divergence(rank: int):
    """Rank 0 on its GPU, if there is one: ``kernels.measure_divergence``."""
    if rank != 0 or not torch.cuda.is_available():
        return None
    return kernels.measure_divergence()


@lab_data
class SimdMimdData:
    """What the SIMD/MIMD lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    machine: dict | None = None
    """Rank 0: this CPU as read (``machine.CpuInfo.as_dict``)."""
    simd: list | None = None
    """Rank 0: one row per (op, impl, dtype): medians, elements/s, FLOP/s."""
    scaling: dict | None = None
    """"threads" (rank 0), "processes" and "weak": this rank's seconds per repeat."""
    spmd: dict | None = None
    """This rank's recorded events in each step kind, and the pipeline losses."""
    divergence: dict | None = None
    """Rank 0 on a GPU: ``kernels.measure_divergence``'s result."""
    divergence_note: str | None = None
    """Why there are no divergence figures, where there are none."""
    load_average: list | None = None
    """Rank 0: the machine's 1-minute load average (``os.getloadavg``) when the
    rank started and when it finished: how busy the cores were with other work."""


def worker(cfg: Config) -> RankReport:
    """One rank's share: the parts ``cfg.part`` names, in order."""
    cfg, rank, n, _ = lab.join(cfg)
    data = SimdMimdData(asdict(cfg))
    report = lab.rank_report(cfg, num_params=0, extra=data)
    # The CPU parts measure CPU processes: their tensors and messages go over gloo,
    # also in a job whose default group is NCCL (torchrun on GPUs).
    cpu = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    if rank == 0:
        data.machine = machine.cpu_info().as_dict()
        data.load_average = [os.getloadavg()[0]]
    for part in cfg.parts:
        start = time.perf_counter()
        if part == "simd":
            data.simd = simd(cfg, rank, cpu)
        elif part == "scaling":
            data.scaling = scaling(cfg, rank, n, cpu)
        elif part == "spmd":
            data.spmd = spmd(cfg, rank, n, cpu)
            report.num_params = data.spmd["params"]
        else:
            data.divergence = divergence(rank)
            if rank == 0 and data.divergence is None:
                data.divergence_note = "no CUDA or ROCm GPU in this rank's machine"
        report.timings[part] = time.perf_counter() - start
    if rank == 0:
        data.load_average.append(os.getloadavg()[0])
    return report


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and run the lab."""
    return lab.run(worker, cfg, timeout=TIMEOUT_S)


def describe(reports: list[RankReport]) -> str:
    """The figures as text, for the CLI (``figures.summary_text``)."""
    from utils.simd_mimd import figures  # drawing code: only the CLI needs it here

    return figures.summary_text(reports)


def main(argv: list[str] | None = None) -> None:
    reports, args = run_from_cli(Config, run, argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.json is None:
        print(describe(reports))
    if args.record_gpu and reports[0].extra.divergence:
        path = kernels.save_recorded(reports[0].extra.divergence)
        print(f"recorded the divergence figures in {path}")


if __name__ == "__main__":
    main()
