"""Lab 7, the three axes at once: data (ZeRO) x tensor x pipeline parallelism.

Chapter 7 ("DP x TP x PP, and planning a run"). ``dp x tp x pp`` ranks on
``utils.dims.ParallelDims`` (tp fastest, then dp, then pp). Every rank builds the
course GPT (untied) from one seed, rewrites it for its tp group, keeps its
pipeline stage's chunks and trains them with chapter 2's ZeRO optimizer over its
dp group (``utils.combined.parallelize``); each step runs chapter 5's schedule
through its executor, ``m`` micro-batches per pipeline. Each rank reports its
coordinates, losses, memory by category (measured on the ledger), bytes per step
on each axis (tp and dp modelled from the collectives' sizes, pp counted send by
send, and the sockets' bytes counted by the kernel), the measured bubble, and the
planner's prediction for its stage (``utils.planner.estimate`` in fp32, the
course GPT's activations), which the chapter and the tests compare with it::

    python -m labs.combined                         # 2 x 2 x 2 on 8 ranks
    python -m labs.combined --world-size 4 --dp-size 1 --tp-size 2 --pp-size 2
    python -m labs.combined --zero-stage 2 --schedule gpipe --micro-batches 8
    torchrun --nproc-per-node 8 -m labs.combined
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from labs.pipeline_parallel import TIMES, micro_batches, pipeline_end
from utils import lab
from utils.checks import check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.combined.parallelize import (
    ZERO_STAGES,
    apply_dp,
    apply_pp,
    apply_tp,
    full_parameters,
    loss_fn,
    parameters_of,
)
from utils.comm import CommMeter
from utils.dims import ParallelDims
from utils.memory import MemoryTracker
from utils.model_parallel.apply import check_tensor_parallel
from utils.models import GPT, GPTConfig, count_params
from utils.pipeline_parallel.executor import run_step, timed_program
from utils.pipeline_parallel.schedules import SCHEDULES, stages_of
from utils.pipeline_parallel.stage import PipelineStage
from utils.planner import ModelSpec, estimate
from utils.report import RankReport, lab_data
from utils.wire import WireCounter

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved")
AXES = ("tp", "pp", "dp")
STATES = ("params", "grads", "optimizer")


@dataclass(frozen=True)
class Config(LabConfig):
    """One dp x tp x pp training run."""

    CHOICES = {
        **LabConfig.CHOICES,
        "schedule": SCHEDULE_NAMES,
        "zero_stage": ZERO_STAGES,
    }
    CLI_HIDDEN = ("return_params",)

    world_size: int = 0
    """Ranks to start: dp_size x tp_size x pp_size (0: that product; under
    torchrun, the world it started, which must equal it)."""
    dp_size: int = 2
    """Data-parallel replicas (ZeRO shards over them)."""
    tp_size: int = 2
    """Tensor-parallel ranks per layer (must divide the 4 heads, d_model, 4 d_model
    and the vocabulary of 64)."""
    pp_size: int = 2
    """Pipeline stages."""
    zero_stage: int = 1
    """ZeRO on the data axis: 0 (all-reduce), 1 (optimizer states sharded) or 2
    (gradients too, reduce-scattered after every micro-batch's backward)."""
    schedule: str = "1f1b"
    """gpipe, 1f1b or interleaved (virtual_stages chunks per rank)."""
    micro_batches: int = 4
    """Micro-batches m per step and pipeline."""
    virtual_stages: int = 0
    """Model chunks per rank (interleaved only); 0 means 2 for interleaved, else 1."""
    d_model: int = 32
    """GPT hidden size h."""
    n_layers: int = 4
    """GPT blocks, split over the pp x virtual_stages chunks."""
    batch_size: int = 16
    """Global batch (sequences) per step: dp_size x m micro-batches."""
    lr: float = 1e-3
    """AdamW's learning rate."""
    track_memory: bool = True
    """Record the memory ledger after every action."""
    return_params: bool = False
    """Send this rank's final parameters (tp shards gathered) back in
    ``extra.params`` (tests compare them with one process)."""

    def __post_init__(self):
        check_int("world_size", self.world_size, minimum=0)
        if self.world_size == 0:  # the layout's own size
            product = self.dp_size * self.tp_size * self.pp_size
            object.__setattr__(self, "world_size", product)
        super().__post_init__()
        for name in ("dp_size", "tp_size", "pp_size"):
            check_int(name, getattr(self, name), maximum=64)
        check_int("micro_batches", self.micro_batches, maximum=4096)
        check_int("virtual_stages", self.virtual_stages, minimum=0, maximum=64)
        check_int("d_model", self.d_model, maximum=4096)
        check_int("n_layers", self.n_layers, maximum=256)
        check_int("batch_size", self.batch_size, maximum=2**16)
        check_number("lr", self.lr, minimum=0, maximum=1e6)
        product = self.dp_size * self.tp_size * self.pp_size
        if product != self.world_size:
            raise ValueError(
                f"dp_size={self.dp_size} x tp_size={self.tp_size} x pp_size="
                f"{self.pp_size} = {product} != world_size={self.world_size}: the "
                "three degrees must multiply to the world size"
            )
        if self.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 heads: {self.d_model}")
        check_tensor_parallel(self.gpt(), self.tp_size)
        p, v, m = self.pp_size, self.v, self.micro_batches
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ValueError(
                f"virtual_stages={self.virtual_stages} needs schedule='interleaved'"
            )
        if self.schedule == "interleaved" and m % p:
            raise ValueError(
                f"interleaved needs micro_batches a multiple of pp_size={p} "
                f"(Narayanan et al. 2021, section 2.2), got micro_batches={m}"
            )
        if p * v > self.n_layers:
            raise ValueError(
                f"pp_size={p} x virtual_stages={v} = {p * v} model chunks but "
                f"n_layers={self.n_layers}: every chunk needs a transformer block"
            )
        if self.batch_size % (self.dp_size * m):
            raise ValueError(
                f"batch_size={self.batch_size} must divide into dp_size="
                f"{self.dp_size} x micro_batches={m} = {self.dp_size * m} equal "
                "micro-batches"
            )

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
        """The GPT, untied: the embedding on the first stage, the head on the last."""
        return GPTConfig(
            d_model=self.d_model, n_layers=self.n_layers, n_heads=4, tie_weights=False
        )

    def spec(self) -> ModelSpec:
        """The same GPT as the planner describes it."""
        g = self.gpt()
        return ModelSpec(
            g.n_layers, g.d_model, g.n_heads, g.seq_len, g.vocab_size, tied=False,
            name="course GPT (untied)",
        )  # fmt: skip

    def plan(self):
        """The planner's estimate of this layout (modelled): fp32 AdamW (the
        "fp32-16" convention), the course GPT's fp32 activations."""
        return estimate(
            self.spec(), dp=self.dp_size, tp=self.tp_size, pp=self.pp_size,
            zero_stage=self.zero_stage, micro_batch=self.rows_per_micro,
            micro_batches=self.micro_batches, virtual_stages=self.v,
            schedule=self.schedule, convention="fp32-16", activations="course-fp32",
        )  # fmt: skip

    def message_shape(self) -> tuple[int, int, int]:
        """Every activation and gradient between stages: (b/m, s, h), whole."""
        return (self.rows_per_micro, self.gpt().seq_len, self.d_model)

    def estimate_bytes(self) -> int:
        """Per rank, an upper bound: the whole model's 16 B per parameter and every
        micro-batch's activations of the whole model, about 34 s h bytes per layer
        and sequence plus the logits (as ``labs.pipeline_parallel``)."""
        g = self.gpt()
        rows = self.batch_size // self.dp_size
        acts = rows * g.seq_len * (34 * g.d_model * g.n_layers + 8 * g.vocab_size)
        return 16 * self.spec().num_params() + acts


TINY = Config(steps=2, micro_batches=2, batch_size=8)
"""What tests and CI run: 2 x 2 x 2, 2 micro-batches of 2 sequences per pipeline."""


@lab_data
class CombinedData:
    """What the combined lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    stage_ids: list = field(default_factory=list)
    """The model chunks this rank holds (pp_rank, pp_rank + pp, ...)."""
    layers: dict = field(default_factory=dict)
    """Chunk id (as a string) -> the names of the modules it runs."""
    groups: dict = field(default_factory=dict)
    """Axis -> the global ranks of this rank's group along it."""
    states: dict = field(default_factory=dict)
    """Measured: params, grads, optimizer (and other) bytes on the ledger at the
    end of the last step's backward, before the optimizer step ("grads"), and after
    it (the rest): what the planner's model states count."""
    peak_activation_bytes: int = 0
    """Measured: the most activation bytes the ledger held at the end of any action."""
    predicted: dict = field(default_factory=dict)
    """Modelled, the planner for this rank's stage: params, grads, optimizer,
    activations (``Estimate.stages[pp_rank]["device"]``) and comm per axis."""
    comm_by_axis: dict = field(default_factory=dict)
    """Bytes this rank sent in the last step, per axis: tp (modelled), pp
    (counted), dp (modelled)."""
    comm_sources: dict = field(default_factory=dict)
    """Axis -> "counted" or "modelled"."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    step_seconds: list = field(default_factory=list)
    """Per step, measured on this rank: from the barrier that starts the step to
    the end of its optimizer step (the pipeline, the dp reduction, the update)."""
    bubble: list = field(default_factory=list)
    """Per step, measured: 1 - time in actions / the pipeline's step (the latest
    end of a last action over its ranks)."""
    bubble_expected: float = 0.0
    """The planner's bubble for (schedule, p, m, v) (modelled)."""
    params: dict | None = None
    """This rank's final parameters, whole (name -> flat list) when
    ``return_params``."""


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, apply tp, pp and ZeRO dp, train, report."""
    cfg, rank, n, device = lab.join(cfg)
    p, v, m = cfg.pp_size, cfg.v, cfg.micro_batches
    dims = ParallelDims(dp=cfg.dp_size, tp=cfg.tp_size, pp=p, world_size=n)
    mesh = dims.build(device.type, mesh=False)
    meters = {axis: CommMeter() for axis in AXES}
    gpt = GPT(cfg.gpt(), seed=cfg.seed).to(device)  # every rank builds it all...
    apply_tp(gpt, mesh, meter=meters["tp"])
    mine = apply_pp(gpt, mesh, virtual_stages=v)  # ...and keeps its stage's chunks
    params = parameters_of(mine)
    holder = nn.ModuleList(mod for pieces in mine.values() for _, mod in pieces)
    del gpt
    mem = MemoryTracker(device) if cfg.track_memory else None
    opt = apply_dp(
        params.values(), mesh, zero_stage=cfg.zero_stage, lr=cfg.lr,
        meter=meters["dp"], track=mem and mem.assign,
    )  # fmt: skip
    stages = {
        s: PipelineStage(
            [mod for _, mod in pieces],
            s,
            p * v,
            micro_batches=m,
            loss_fn=loss_fn(mesh, meter=meters["tp"]),
        )  # fmt: skip
        for s, pieces in mine.items()
    }
    pp_rank = mesh.coords["pp"]
    program = timed_program(
        pp_rank, p, m, v, SCHEDULES[cfg.schedule], TIMES[cfg.schedule]
    )
    if mem is not None:
        mem.watch(holder, opt)
    rec = dict(step=[], flushed=[], busy=[], losses=[], wired=[], comm=[])
    peak = {"acts": 0}
    states: dict = {}

    def on_action(action):
        if mem is not None:
            entry = mem.mark(action.kind, step=rec_step[0])
            peak["acts"] = max(peak["acts"], entry["current"]["activations"])

    rec_step = [0]
    with mem if mem is not None else nullcontext():
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            rec_step[0] = step
            x, y = micro_batches(cfg, step, mesh.coords["dp"])
            opt.zero_grad()
            for meter in meters.values():
                meter.reset()
            for stage in stages.values():
                stage.reset()
            dist.barrier()
            t0 = time.perf_counter()
            wire = WireCounter().start()
            record = run_step(
                program, stages, inputs=x, targets=y, shape=cfg.message_shape(),
                peers=mesh.group_ranks("pp"), device=device, meter=meters["pp"],
                on_action=on_action, t0=t0,
            )  # fmt: skip
            flushed = pipeline_end(record.actions, mesh.group("pp"))
            if mem is not None:
                states["grads"] = mem.mark("backward", step=step)["current"]["grads"]
            opt.step()  # ZeRO over dp: reduce(-scatter), update, (all-gather)
            if mem is not None:
                now = mem.mark("step", step=step)["current"]
                states.update({k: now[k] for k in ("params", "optimizer", "other")})
            rec["step"].append(time.perf_counter() - t0)
            rec["busy"].append(sum(a["end"] - a["start"] for a in record.actions))
            rec["wired"].append(wire.stop())
            last = stages.get(p * v - 1)
            local = [last.losses[i] for i in sorted(last.losses)] if last else []
            rec["losses"].append(statistics.fmean(local) if local else 0.0)
            rec["comm"].append({a: meters[a].total for a in AXES})
            if local:
                lab.check_finite(rec["losses"][-1], step)
            rec["flushed"].append(flushed)
    timeline = mem.timeline() if mem is not None else []
    return _report(cfg, mesh, mine, params, states, peak["acts"], meters, rec, timeline)


def global_losses(local: list[float], mesh, is_last: bool) -> list[float]:
    """The global loss per step on every rank: one copy per pipeline (the last
    stage's tp rank 0; its tp peers computed the same loss), summed over the world
    by one all-reduce, over dp."""
    mine = is_last and mesh.coords["tp"] == 0
    values = torch.tensor(local if mine else [0.0] * len(local), dtype=torch.float64)
    dist.all_reduce(values)
    return (values / mesh.dims.dp).tolist()


def _report(cfg, mesh, mine, params, states, peak, meters, rec, timeline):
    p, v = cfg.pp_size, cfg.v
    pp_rank = mesh.coords["pp"]
    plan = cfg.plan()
    stage_plan = plan.stages[pp_rank]
    predicted = {k: stage_plan["device"][k] for k in (*STATES, "activations")}
    predicted["comm"] = dict(plan.comm)
    bubbles = [1 - b / s if s > 0 else 0.0 for b, s in zip(rec["busy"], rec["flushed"])]
    later = slice(1, None) if cfg.steps > 1 else slice(None)
    whole = full_parameters(params, mesh) if cfg.return_params else None
    n_params = count_params(nn.ParameterList(params.values()))
    return lab.rank_report(
        cfg,
        num_params=n_params,
        coords=mesh.coords,
        losses=global_losses(rec["losses"], mesh, pp_rank == p - 1),
        memory=timeline,
        comm_bytes=sum(rec["comm"][-1].values()),
        comm_source="counted+modelled",
        wire_bytes=rec["wired"][-1],
        timings={"step": statistics.median(rec["step"][later])},
        extra=CombinedData(
            config=asdict(cfg),
            stage_ids=stages_of(pp_rank, p, v),
            layers={
                str(s): [
                    type(mod).__name__ if not pre else pre.rstrip(".")
                    for pre, mod in pieces
                ]
                for s, pieces in mine.items()
            },  # fmt: skip
            groups={a: mesh.group_ranks(a) for a in AXES},
            states=dict(states),
            peak_activation_bytes=peak,
            predicted=predicted,
            comm_by_axis=dict(rec["comm"][-1]),
            comm_sources={a: meters[a].kind for a in AXES},
            wire_bytes_per_step=rec["wired"],
            step_seconds=rec["step"],
            bubble=bubbles,
            bubble_expected=plan.bubble,
            params={k: t.reshape(-1).tolist() for k, t in whole.items()}
            if whole is not None
            else None,
        ),
    )


def run(cfg: Config, *, timeout: float = 120.0) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports."""
    return lab.run(worker, cfg, timeout=timeout)


def run_many(cfgs: list[Config], *, timeout: float | None = None) -> list[list]:
    """Several configurations (same world size) in one launch: rank reports each."""
    return lab.run_many(worker, cfgs, timeout=timeout)


def main(argv=None) -> None:
    run_from_cli(Config, run, argv)


if __name__ == "__main__":
    main()
