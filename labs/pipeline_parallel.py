"""Lab 5, pipeline parallelism: layers split into stages, the batch into micro-batches.

Chapter 5 ("Pipeline parallelism"). The course's small GPT (untied embeddings: the
first and the last stage each own theirs) is cut into ``p * v`` consecutive model
chunks, ``v`` per rank (``utils.pipeline_parallel.stage.PipelineStage``); every step
splits this pipeline's share of a fixed global batch into ``m`` micro-batches and
runs one schedule, GPipe (Huang et al. 2019), 1F1B (PipeDream-Flush, Narayanan et
al. 2021, section 2.2), interleaved 1F1B (ibid.) or ZB-H1 (Qi et al. 2024, section
2.1), as data (``utils.pipeline_parallel.schedules``) through one executor
(``utils.pipeline_parallel.executor``) or through ``torch.distributed.pipelining``.
With ``dp_size > 1`` there are ``dp_size`` pipelines, whose gradients are averaged
once per step, after the last backward. Each rank reports its losses, every action
with its measured start and end, the measured bubble, peak activation bytes, bytes
sent per step and memory by category after every action::

    python -m labs.pipeline_parallel --world-size 4 --schedule 1f1b
    python -m labs.pipeline_parallel --world-size 4 --schedule gpipe --micro-batches 8
    python -m labs.pipeline_parallel --world-size 2 --schedule interleaved
    python -m labs.pipeline_parallel --world-size 4 --schedule zb1p --uniform-compute
    python -m labs.pipeline_parallel --world-size 4 --dp-size 2 --schedule 1f1b
    python -m labs.pipeline_parallel --world-size 4 --impl torch --schedule interleaved
    torchrun --nproc-per-node 4 -m labs.pipeline_parallel --schedule 1f1b

``--uniform-compute`` pads every action to a fixed duration (``--action-ms`` for a
whole stage's forward of one micro-batch, twice that for its backward; ZB-H1's B
and W one each; an interleaved chunk's ``1/v`` of those: ``TIMES``) by sleeping
around its real work (``executor.UniformCompute``). The pads dominate the real
work of this small model (a few ms), so every stage's work is equal, as the
papers' formulas assume, whatever else runs on a shared machine, and the measured
bubble is comparable with ``check.expected_bubble``; what it adds on top is the
point-to-point latency along the critical path (measured: a few percent of the
bubble with 40 ms actions, more for interleaved and ZB-H1, whose bubble is smaller
for as many hops). Without it, the stages' real compute is what is timed.

torch: ``PipelineStage`` with ``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B`` and ``ScheduleInterleavedZeroBubble`` (torch 2.13), all
of which run on gloo and the CPU; its own limits are refused before launching (see
:func:`torch_refusal`). Its actions are timed by wrapping the stage's
``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn import functional as F

from utils import lab
from utils.checks import check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.comm import CommMeter, all_reduce
from utils.dims import ParallelDims
from utils.launch import check_cuda_p2p
from utils.memory import MemoryTracker
from utils.model_parallel.layer_split import gpt_groups, named_parameters
from utils.models import GPT, GPTConfig, count_params, gpt_batch, shard_batch
from utils.pipeline_parallel.check import expected_bubble, peak_activations
from utils.pipeline_parallel.executor import (
    UniformCompute,
    run_step,
    shape_bytes,
    timed_program,
)
from utils.pipeline_parallel.schedules import SCHEDULES, Action, stages_of
from utils.pipeline_parallel.stage import PipelineStage
from utils.report import RankReport, lab_data
from utils.wire import WireCounter

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb1p")
IMPLS = ("scratch", "torch")


@dataclass(frozen=True)
class Config(LabConfig):
    """One pipeline-parallel training run."""

    CHOICES = {
        **LabConfig.CHOICES,
        "schedule": SCHEDULE_NAMES,
        "impl": IMPLS,
    }
    CLI_HIDDEN = ("return_params", "mismatch")

    world_size: int = 4
    """Ranks to start: stages x dp_size."""
    steps: int = 3
    """Optimizer steps; ``timings`` take the median of all but the first."""
    schedule: str = "1f1b"
    """gpipe, 1f1b, interleaved (v chunks per rank) or zb1p (ZB-H1, B and W split)."""
    stages: int = 0
    """Pipeline stages p (ranks per pipeline); 0 means world_size / dp_size."""
    micro_batches: int = 8
    """Micro-batches m per step; each is batch_size / (dp_size * m) sequences."""
    virtual_stages: int = 0
    """Model chunks v per rank (interleaved only); 0 means 2 for interleaved, else 1."""
    dp_size: int = 1
    """Data-parallel replicas of the pipeline; gradients all-reduced once per step."""
    impl: str = "scratch"
    """scratch: the course's executor; torch: torch.distributed.pipelining."""
    uniform_compute: bool = False
    """Pad every action to a fixed duration (action_ms): equal stages, as the
    bubble formulas assume."""
    action_ms: float = 30.0
    """With uniform_compute: a whole stage's forward of one micro-batch, in ms (a
    backward 2x, or B = W = 1x in zb1p; one of v chunks 1/v of it)."""
    d_model: int = 32
    """GPT hidden size h (activations sent between stages are b/m x s x h)."""
    n_layers: int = 8
    """GPT blocks, split over the p * v model chunks (at least one each)."""
    batch_size: int = 32
    """Global batch (sequences) per step: dp_size x m micro-batches."""
    lr: float = 1e-3
    """AdamW's learning rate."""
    track_memory: bool = True
    """Record the memory ledger after every action (the benchmark turns it off)."""
    return_params: bool = False
    """Send this rank's final parameters back in ``extra.params`` (tests compare)."""
    mismatch: bool = False
    """Test only: the last pipeline rank runs one micro-batch fewer, so its
    neighbour waits for a message that never comes (the launcher's timeout)."""

    def __post_init__(self):
        super().__post_init__()
        check_int("dp_size", self.dp_size, maximum=self.world_size)
        check_int("stages", self.stages, minimum=0, maximum=self.world_size)
        check_int("micro_batches", self.micro_batches, maximum=4096)
        check_int("virtual_stages", self.virtual_stages, minimum=0, maximum=64)
        check_int("d_model", self.d_model, maximum=4096)
        check_int("n_layers", self.n_layers, maximum=256)
        check_int("batch_size", self.batch_size, maximum=2**16)
        check_number("lr", self.lr, minimum=0, maximum=1e6)
        check_number("action_ms", self.action_ms, minimum=0, maximum=10_000)
        if self.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 heads: {self.d_model}")
        if self.world_size % self.dp_size:
            raise ValueError(
                f"world_size={self.world_size} must be a multiple of dp_size="
                f"{self.dp_size} (world_size = stages x dp_size)"
            )
        if self.stages and self.stages * self.dp_size != self.world_size:
            raise ValueError(
                f"stages={self.stages} x dp_size={self.dp_size} != world_size="
                f"{self.world_size}: give stages = world_size / dp_size, or 0"
            )
        p, v, m = self.pp, self.v, self.micro_batches
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ValueError(
                f"virtual_stages={self.virtual_stages} needs schedule='interleaved'"
                f" ({self.schedule} runs one model chunk per rank)"
            )
        if self.schedule == "interleaved" and m % p:
            raise ValueError(
                f"interleaved needs micro_batches a multiple of stages={p} "
                f"(Narayanan et al. 2021, section 2.2), got micro_batches={m}"
            )
        if p * v > self.n_layers:
            chunks = f"stages={p}" + (f" x virtual_stages={v}" if v > 1 else "")
            raise ValueError(
                f"{chunks} = {p * v} model chunks but n_layers={self.n_layers}: "
                "every chunk needs at least one transformer block"
            )
        if self.batch_size % (self.dp_size * m):
            raise ValueError(
                f"batch_size={self.batch_size} must divide into dp_size="
                f"{self.dp_size} x micro_batches={m} = {self.dp_size * m} equal "
                "micro-batches"
            )
        if self.mismatch and (p < 2 or m < 2):
            raise ValueError("mismatch needs stages >= 2 and micro_batches >= 2")
        refusal = torch_refusal(self)
        if refusal:
            raise ValueError(refusal)

    @property
    def pp(self) -> int:
        """Pipeline stages p: ``stages``, or world_size / dp_size when 0."""
        return self.stages or self.world_size // self.dp_size

    @property
    def v(self) -> int:
        """Model chunks per rank: ``virtual_stages``, or 2 (interleaved) / 1."""
        if self.virtual_stages:
            return self.virtual_stages
        return 2 if self.schedule == "interleaved" else 1

    @property
    def rows_per_micro(self) -> int:
        """Sequences per micro-batch: batch_size / (dp_size x m)."""
        return self.batch_size // (self.dp_size * self.micro_batches)

    def gpt(self) -> GPTConfig:
        """The GPT, untied: the embedding (first stage) and the head (last) are
        separate matrices, so no stage needs another's weights."""
        return GPTConfig(
            d_model=self.d_model, n_layers=self.n_layers, n_heads=4, tie_weights=False
        )

    def message_shape(self) -> tuple[int, int, int]:
        """Every activation and gradient between stages: (b/m, s, h)."""
        return (self.rows_per_micro, self.gpt().seq_len, self.d_model)

    def pads(self) -> dict[str, float] | None:
        """Seconds per action kind under ``uniform_compute`` (None otherwise):
        ``action_ms`` per forward, in the ratios of ``TIMES``, 1/v per chunk."""
        if not self.uniform_compute:
            return None
        t = self.action_ms / 1e3 / self.v  # one chunk's forward
        return {kind: t * k for kind, k in TIMES[self.schedule].items()}

    def estimate_bytes(self) -> int:
        """Per rank, all of the model (an upper bound): 16 B per parameter (fp32
        weights, grads, AdamW's two states) and every micro-batch's activations
        (about 34 s h bytes per layer and sequence, Korthikanti et al. 2022, plus
        the logits)."""
        g = self.gpt()
        params = (
            12 * g.n_layers * g.d_model**2 + (2 * g.vocab_size + g.seq_len) * g.d_model
        )
        rows = self.batch_size // self.dp_size
        acts = rows * g.seq_len * (34 * g.d_model * g.n_layers + 8 * g.vocab_size)
        return 16 * params + acts


TIMES = {
    "gpipe": {"F": 1, "B": 2},
    "1f1b": {"F": 1, "B": 2},
    "interleaved": {"F": 1, "B": 2},
    "zb1p": {"F": 1, "B": 1, "W": 1},
}
"""Relative action times: a backward is about twice a forward (two matmuls per
forward one), ZB-H1 splits it into B and W of one forward each (Qi et al. 2024,
section 2.1). Uniform compute pads to them; the formulas and message order use
them."""


TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zb1p": "ScheduleInterleavedZeroBubble",
}
"""torch.distributed.pipelining's class for each schedule (all run on gloo/CPU)."""


def torch_refusal(cfg: Config) -> str | None:
    """Why torch's schedule cannot run ``cfg`` (None when it can): its own checks,
    made here before any process starts. torch 2.13,
    torch/distributed/pipelining/schedules.py."""
    if cfg.impl != "torch":
        return None
    p, m = cfg.pp, cfg.micro_batches
    if cfg.schedule == "1f1b" and m < p:
        return (
            f"impl='torch': Schedule1F1B needs micro_batches >= stages, got "
            f"{m} < {p} (its __init__ raises: schedules.py line 1020); the "
            "scratch 1F1B runs it (warm-up min(p - rank - 1, m))"
        )
    rounds = max(1, m // p)
    if cfg.schedule == "zb1p" and m % rounds:
        return (
            f"impl='torch': ScheduleInterleavedZeroBubble needs micro_batches a "
            f"multiple of its rounds max(1, m // p) = {rounds}, got m={m} "
            "(schedules.py line 3048)"
        )
    if cfg.mismatch:
        return "mismatch is a fault of the scratch executor only (impl='scratch')"
    return None


@lab_data
class PipelineData:
    """What the pipeline lab reports besides the common fields.

    Times are measured (``time.perf_counter``), in seconds from this rank's start
    of the step (the moment it leaves the barrier that starts it).
    """

    config: dict
    """The Config, as a dict."""
    schedule: str = ""
    """The schedule's name (``Config.schedule``)."""
    implementation: str = ""
    """What ran it: "utils.pipeline_parallel.executor" or torch's schedule class."""
    p: int = 1
    """Pipeline stages (ranks per pipeline)."""
    m: int = 1
    """Micro-batches per step."""
    v: int = 1
    """Model chunks per rank."""
    pp_rank: int = 0
    """This rank's place in its pipeline (0 = first stage)."""
    dp_rank: int = 0
    """This rank's data-parallel replica."""
    stage_ids: list = field(default_factory=list)
    """The model chunks (virtual stages) this rank holds: pp_rank, pp_rank + p, ..."""
    layers: dict = field(default_factory=dict)
    """Chunk id (as a string) -> the names of the modules it runs."""
    schedule_table: str = ""
    """This rank's planned actions: ``"0F0 0F1 0B0 ..."`` (``schedules.table``)."""
    actions: list = field(default_factory=list)
    """Per step, the executed actions in order: {"action": "0F1", "kind", "stage",
    "micro", "start", "end"} (measured, seconds from the step's start)."""
    comm: list = field(default_factory=list)
    """Per step, the point-to-point ops in order: {"op": "send"|"recv"|"wait",
    "peer", "what": "act"|"grad", "stage", "micro", "bytes", "start", "end"}
    (``stage`` is the producer's; ``peer`` a pipeline position). A send's span is
    the ``isend`` call, a recv's the wait for it before its action, a wait's the
    wait for a send to complete (scratch only; torch: [])."""
    step_seconds: list = field(default_factory=list)
    """Per step, measured: from the step's start to the end of the pipeline's
    last action (the latest over its ranks: ``pipeline_end``)."""
    busy_seconds: list = field(default_factory=list)
    """Per step, measured: the time inside F, B and W actions."""
    wait_seconds: list = field(default_factory=list)
    """Per step, measured: the time blocked in recvs and sends (part of idle)."""
    bubble: list = field(default_factory=list)
    """Per step, measured: idle / step time = 1 - busy_seconds / step_seconds."""
    bubble_expected: float = 0.0
    """The paper's bubble of the step for this (schedule, p, m, v), with F = 1,
    B = 2 (B = W = 1 in zb1p): ``check.expected_bubble`` (modelled)."""
    peak_activation_bytes: int = 0
    """Measured: the most activation bytes the ledger held at the end of any action
    (the micro-batches stashed for their backward, plus buffers in flight)."""
    activation_bytes_per_micro: int = 0
    """Measured: what one micro-batch's forward left stashed on this rank (the
    ledger's activations after the first forward of step 0, minus before it);
    summed over this rank's chunks for interleaved."""
    peak_in_flight: int = 0
    """Modelled: the most micro-batches (chunk activations for interleaved) this
    rank's schedule holds at once (``check.peak_activations``)."""
    p2p_bytes: int = 0
    """Bytes of one activation (or gradient) message: b/m x s x h x 4 (fp32)."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step: point-to-point counted (each send's tensor bytes; for
    torch, the tensors of the send ops its stage hands its schedule), plus the dp
    all-reduce modelled (``RankReport.comm_source`` says which)."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    comm_by_op: dict = field(default_factory=dict)
    """Bytes of the last step by operation ("send", "all_reduce")."""
    comm_sources: dict = field(default_factory=dict)
    """For each operation: "counted" or "modelled"."""
    micro_losses: list = field(default_factory=list)
    """Last stage only: per step, each micro-batch's loss (its mean over its
    sequences, before the 1/m scaling)."""
    params: dict | None = None
    """This rank's final parameters (name in the single-process GPT -> flat list)
    when ``return_params``."""


TINY = Config(world_size=2, steps=2, micro_batches=4, n_layers=4, batch_size=8)
"""What tests and CI run: 2 stages, 4 micro-batches of 2 sequences, a GPT of 4
blocks (55,488 parameters), a few seconds with the launch."""


# ------------------------------------------------------------------ the model
def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch's next-token predictions."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def micro_batches(cfg: Config, step: int, dp_rank: int):
    """This pipeline's share of the step's global batch, as m micro-batches."""
    x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
    x, y = shard_batch((x, y), dp_rank, cfg.dp_size)
    return list(x.chunk(cfg.micro_batches)), list(y.chunk(cfg.micro_batches))


# ------------------------------------------------------------ the two engines
class ScratchPipeline:
    """This rank's chunks as ``PipelineStage``s, run by the course's executor."""

    implementation = "utils.pipeline_parallel.executor"

    def __init__(self, cfg: Config, chunks: dict, pp_rank: int, mesh, meter):
        p, m, v = cfg.pp, cfg.micro_batches, cfg.v
        n_stages = p * v
        self.stages = {
            s: PipelineStage(
                [mod for _, mod in pieces],
                s,
                n_stages,
                micro_batches=m,
                loss_fn=loss_fn,
            )
            for s, pieces in chunks.items()
        }
        if cfg.mismatch and pp_rank == p - 1:  # the fault the tests inject
            m -= 1
        # messages in the order they come with a backward twice a forward
        self.program = timed_program(
            pp_rank, p, m, v, SCHEDULES[cfg.schedule], TIMES[cfg.schedule]
        )
        self.cfg, self.mesh, self.meter = cfg, mesh, meter
        self.device = next(self.stages[min(self.stages)].module.parameters()).device
        self.pad = UniformCompute(cfg.pads()) if cfg.uniform_compute else None

    def step(self, x, y, on_action, t0):
        """One step's actions; returns (actions, comm, micro losses)."""
        for stage in self.stages.values():
            stage.reset()
        record = run_step(
            self.program,
            self.stages,
            inputs=x,
            targets=y,
            shape=self.cfg.message_shape(),
            peers=self.mesh.group_ranks("pp"),
            device=self.device,
            meter=self.meter,
            pad=self.pad,
            on_action=on_action,
            t0=t0,
        )
        last = self.stages.get(self.cfg.pp * self.cfg.v - 1)
        losses = [last.losses[i] for i in sorted(last.losses)] if last else []
        return record.actions, record.comm, losses


class TorchPipeline:
    """This rank's chunks as torch's ``PipelineStage``s under torch's schedule."""

    def __init__(self, cfg: Config, chunks: dict, pp_rank: int, mesh, meter):
        from torch.distributed import pipelining

        self.implementation = (
            "torch.distributed.pipelining." + (TORCH_SCHEDULES[cfg.schedule])
        )
        n_stages = cfg.pp * cfg.v
        group = mesh.group("pp")
        device = next(chunks[min(chunks)][0][1].parameters()).device
        self.stages = [
            pipelining.PipelineStage(
                nn.Sequential(*[mod for _, mod in pieces]),
                s,
                n_stages,
                device,
                group=group,
            )
            for s, pieces in chunks.items()
        ]
        cls = getattr(pipelining, TORCH_SCHEDULES[cfg.schedule])
        single = cfg.schedule in ("gpipe", "1f1b")
        self.schedule = cls(
            self.stages[0] if single else self.stages,
            cfg.micro_batches,
            loss_fn=loss_fn,  # grads scaled by 1/m once (scale_grads=True)
        )
        self.cfg, self.meter, self.n_stages = cfg, meter, n_stages
        self.pad = UniformCompute(cfg.pads()) if cfg.uniform_compute else None
        self.events: list[dict] = []
        self.on_action, self.t0 = None, 0.0
        for stage in self.stages:
            self._instrument(stage)

    def _instrument(self, stage) -> None:
        """Time the stage's compute (and pad it), count the bytes it sends."""
        idx = stage.stage_index

        def timed(kind, fn):
            def run(micro, *args, **kw):
                action = Action(kind, idx, int(micro))
                start = time.perf_counter()
                if self.pad is not None:
                    self.pad.before(action, start)
                work_start = time.perf_counter()
                out = fn(micro, *args, **kw)
                if self.on_action is not None:
                    self.on_action(action)
                if self.pad is not None:
                    self.pad.after(action, start, work_start)
                self.events.append(
                    dict(action=str(action), kind=kind, stage=idx, micro=int(micro),
                         start=start - self.t0, end=time.perf_counter() - self.t0)
                )  # fmt: skip
                return out

            return run

        def counted(fn):
            def run(*args, **kw):
                ops = fn(*args, **kw)
                for op in ops:
                    self.meter.count(
                        "send", op.tensor.numel() * op.tensor.element_size()
                    )
                return ops

            return run

        stage.forward_one_chunk = timed("F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed("B", stage.backward_one_chunk)
        stage.backward_weight_one_chunk = timed("W", stage.backward_weight_one_chunk)
        stage.get_fwd_send_ops = counted(stage.get_fwd_send_ops)
        stage.get_bwd_send_ops = counted(stage.get_bwd_send_ops)

    def step(self, x, y, on_action, t0):
        self.events, self.on_action, self.t0 = [], on_action, t0
        holds = {s.stage_index for s in self.stages}
        args = (torch.cat(x),) if 0 in holds else ()
        kw = {}
        losses: list = []
        if self.n_stages - 1 in holds:
            kw = dict(target=torch.cat(y), losses=losses)
        self.schedule.step(*args, **kw)
        return self.events, [], [v.item() for v in losses]


# ------------------------------------------------------------------ the worker
def sync_gradients(params, group, meter) -> None:
    """Average the gradients over the data-parallel replicas: one all-reduce of
    one flat buffer, once per step, after the last backward."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    all_reduce(flat, meter=meter, group=group)
    flat /= dist.get_world_size(group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, split, pipeline ``cfg.steps`` steps, report."""
    cfg, rank, n, device = lab.join(cfg)
    p, v = cfg.pp, cfg.v
    mesh = ParallelDims(dp=cfg.dp_size, tp=1, pp=p, world_size=n).build(
        device.type, mesh=False
    )
    pp_rank, dp_rank = mesh.coords["pp"], mesh.coords["dp"]
    gpt = GPT(cfg.gpt(), seed=cfg.seed).to(device)  # every rank builds it all...
    all_chunks = gpt_groups(gpt, p * v)  # chapter 4's split, p v chunks
    mine = {s: all_chunks[s] for s in stages_of(pp_rank, p, v)}  # ...keeps its own
    params = {k: t for pieces in mine.values() for k, t in named_parameters(pieces)}
    holder = nn.ModuleList(mod for pieces in mine.values() for _, mod in pieces)
    del gpt, all_chunks
    meter = CommMeter()
    engine = (TorchPipeline if cfg.impl == "torch" else ScratchPipeline)(
        cfg, mine, pp_rank, mesh, meter
    )
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr)
    mem = MemoryTracker(device).watch(holder, opt) if cfg.track_memory else None
    per_micro: dict[int, int] = {}  # chunk -> activation bytes its first F stashed
    state = {"step": 0, "last": 0}

    def on_action(action):  # after each action, inside its span: mark the ledger
        if mem is None:
            return
        entry = mem.mark(action.kind, step=state["step"])
        now = entry["current"]["activations"]
        if state["step"] == 0 and action.kind == "F" and action.stage not in per_micro:
            per_micro[action.stage] = now - state["last"]
        state["last"] = now

    rec = dict(actions=[], comm=[], step=[], busy=[], wait=[], losses=[], micro=[])
    sent, wired = [], []
    with mem if mem is not None else nullcontext():
        if mem is not None:
            mem.mark("init")
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            x, y = micro_batches(cfg, step, dp_rank)
            opt.zero_grad()
            meter.reset()
            state["step"] = step
            if mem is not None:  # the baseline of the first forward's stash
                state["last"] = mem.current()["activations"]
            dist.barrier()
            t0 = time.perf_counter()
            wire = WireCounter().start()
            actions, comm, losses = engine.step(x, y, on_action, t0)
            flushed = pipeline_end(actions, mesh.group("pp"))
            sync_gradients(params.values(), mesh.group("dp"), meter)
            if mem is not None:
                mem.mark("sync", step=step)
            opt.step()
            if mem is not None:
                mem.mark("step", step=step)
            wired.append(wire.stop())
            sent.append(meter.total)
            busy = sum(a["end"] - a["start"] for a in actions)
            for key, value in (
                ("actions", actions), ("comm", comm), ("step", flushed), ("busy", busy),
                ("wait", sum(c["end"] - c["start"] for c in comm)),
                ("micro", losses),
                ("losses", statistics.fmean(losses) if losses else 0.0),
            ):  # fmt: skip
                rec[key].append(value)
            if losses:
                lab.check_finite(rec["losses"][-1], step)
    return _report(
        cfg, mesh, engine, mine, params, mem, meter, rec, sent, wired, per_micro
    )


def pipeline_end(actions: list[dict], group) -> float:
    """The step's length for the whole pipeline: the latest end of a last action
    over its ranks, each timed from its own start of the step (they leave the
    barrier that starts it within about a millisecond), by one all-reduce (MAX)."""
    end = torch.tensor([max((a["end"] for a in actions), default=0.0)])
    dist.all_reduce(end, op=dist.ReduceOp.MAX, group=group)
    return end.item()


def pipeline_losses(local: list[float], is_last: bool, dp_size: int) -> list[float]:
    """Every rank's copy of the global loss per step: the last stages' losses
    (one per pipeline) summed over the world by one all-reduce, over dp_size."""
    values = torch.tensor(local if is_last else [0.0] * len(local), dtype=torch.float64)
    dist.all_reduce(values)
    return (values / dp_size).tolist()


def _report(cfg, mesh, engine, mine, params, mem, meter, rec, sent, wired, per_micro):
    """The rank's report from what the loop recorded."""
    p, m, v = cfg.pp, cfg.micro_batches, cfg.v
    pp_rank = mesh.coords["pp"]
    schedule = SCHEDULES[cfg.schedule]
    planned = schedule(pp_rank, p, m, v)
    later = slice(1, None) if cfg.steps > 1 else slice(None)
    bubbles = [1 - b / s if s > 0 else 0.0 for b, s in zip(rec["busy"], rec["step"])]
    timeline = mem.timeline() if mem is not None else []
    in_actions = [e for e in timeline if e["phase"] in ("F", "B", "W")]
    times = TIMES[cfg.schedule]
    is_last = pp_rank == p - 1  # it holds chunk p v - 1, the loss
    n_params = count_params(nn.ParameterList(params.values()))
    return lab.rank_report(
        cfg,
        num_params=n_params,
        coords=mesh.coords,
        losses=pipeline_losses(rec["losses"], is_last, cfg.dp_size),
        memory=timeline,
        comm_bytes=sent[-1],
        comm_source=meter.kind,
        wire_bytes=wired[-1],
        timings={k: statistics.median(rec[k][later]) for k in ("step", "busy", "wait")},
        extra=PipelineData(
            config=asdict(cfg),
            schedule=cfg.schedule,
            implementation=engine.implementation,
            p=p,
            m=m,
            v=v,
            pp_rank=pp_rank,
            dp_rank=mesh.coords["dp"],
            stage_ids=stages_of(pp_rank, p, v),
            layers={
                str(s): [
                    type(mod).__name__ if not pre else pre.rstrip(".")
                    for pre, mod in pieces
                ]
                for s, pieces in mine.items()
            },  # fmt: skip
            schedule_table=" ".join(map(str, planned)),
            actions=rec["actions"],
            comm=rec["comm"],
            step_seconds=rec["step"],
            busy_seconds=rec["busy"],
            wait_seconds=rec["wait"],
            bubble=bubbles,
            bubble_expected=expected_bubble(schedule, p, m, v, times),
            peak_activation_bytes=max(
                (e["current"]["activations"] for e in in_actions), default=0
            ),
            activation_bytes_per_micro=sum(per_micro.values()),
            peak_in_flight=peak_activations(planned),
            p2p_bytes=shape_bytes(cfg.message_shape()),
            comm_bytes_per_step=sent,
            wire_bytes_per_step=wired,
            comm_by_op=dict(meter.by_op),
            comm_sources=dict(meter.source),
            micro_losses=rec["micro"] if is_last else [],
            params={k: t.detach().reshape(-1).tolist() for k, t in params.items()}
            if cfg.return_params
            else None,
        ),
    )


def run(cfg: Config, *, timeout: float = 60.0) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports;
    ``timeout`` bounds a rank waiting for a message that never comes."""
    if cfg.impl == "torch":  # torch's stages send CUDA tensors; gloo cannot
        check_cuda_p2p(cfg.backend, cfg.world_size, TORCH_P2P)
    return lab.run(worker, cfg, timeout=timeout)


def run_many(cfgs: list[Config], *, timeout: float = 120.0) -> list[list[RankReport]]:
    """Several configurations (same world size) in one launch: rank reports each."""
    if any(c.impl == "torch" for c in cfgs):
        check_cuda_p2p(cfgs[0].backend, cfgs[0].world_size, TORCH_P2P)
    return lab.run_many(worker, cfgs, timeout=timeout)


TORCH_P2P = "impl='torch' (torch.distributed.pipelining)"


def main(argv=None) -> None:
    run_from_cli(Config, run, argv)


if __name__ == "__main__":
    main()
