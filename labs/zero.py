"""Lab 2, ZeRO: optimizer states, gradients and parameters sharded over the ranks.

Chapter 2 ("ZeRO"). Every rank trains the course's small GPT (tied embeddings) with
AdamW on its 1/world_size of a fixed global batch, at ZeRO stage 0 (plain data
parallelism), 1, 2 or 3 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", SC 2020), in fp32 or in mixed precision, with
the course's from-scratch pieces or torch's own, and reports losses, memory by
category after every phase, bytes sent per step and step times::

    python -m labs.zero --world-size 4 --stage 3
    python -m labs.zero --world-size 4 --stage 2 --precision mixed
    python -m labs.zero --world-size 2 --stage 1 --impl torch
    torchrun --nproc-per-node 4 -m labs.zero --stage 3 --impl torch

scratch: ``utils.zero.optim`` (ReplicatedOptimizer, ShardedOptimizer,
ShardedGradOptimizer) and ``utils.zero.fsdp.FullyShardedModule``. torch:
DistributedDataParallel (stage 0),
ZeroRedundancyOptimizer over DDP (1), ``fully_shard(reshard_after_forward=False)``
(2) and ``fully_shard`` (3, FSDP2). Mixed precision keeps the paper's layout, 16-bit
parameters and gradients with an fp32 master copy, momentum and variance (2 + 2 + 12
bytes per parameter), in bf16 where the paper uses fp16 (section 3.1, after
Micikevicius et al., "Mixed Precision Training", ICLR 2018). fp16's 5 exponent bits
(smallest normal 6.1e-5, largest 65504) make small gradients underflow unless the
loss is scaled (Micikevicius et al. section 3.2; DeepSpeed scales it dynamically);
bf16 has fp32's 8 exponent bits (smallest normal 1.2e-38, as fp32), so no loss
scaling is needed here, at the price of 8 significant bits against fp16's 11.
torch's stages 2 and 3 get it from FSDP2's MixedPrecisionPolicy (fp32 sharded
parameters, bf16 compute and reduction), torch's stages 0 and 1 from
``torch.autocast`` (fp32 parameters and gradients, bf16 matmuls), because DDP's own
mixed precision (the private ``_MixedPrecision``) records CUDA events and fails on
CPU ("cpu backend doesn't support events").
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch.nn import functional as F

from utils import lab
from utils.checks import check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.comm import CollectiveCounter, CommMeter
from utils.memory import MemoryTracker
from utils.memory_model import model_state_bytes
from utils.models import GPT, GPTConfig, count_params, gpt_batch, shard_batch
from utils.report import RankReport, field_of, lab_data
from utils.wire import WireCounter
from utils.zero.fsdp import FullyShardedModule, default_units
from utils.zero.optim import ReplicatedOptimizer, ShardedGradOptimizer, ShardedOptimizer
from utils.zero.torch_impl import full_state

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "mixed")
IMPLS = ("scratch", "torch")
TORCH_STAGES = {
    0: "DistributedDataParallel",
    1: "ZeroRedundancyOptimizer + DistributedDataParallel",
    2: "fully_shard(reshard_after_forward=False)",
    3: "fully_shard",
}
"""torch's implementation of each stage (torch 2.13; all four run on gloo/CPU)."""


@dataclass(frozen=True)
class Config(LabConfig):
    """One ZeRO training run."""

    CHOICES = {
        **LabConfig.CHOICES,
        "stage": STAGES,
        "precision": PRECISIONS,
        "impl": IMPLS,
    }
    CLI_HIDDEN = ("return_params",)

    steps: int = 3
    """Optimizer steps; timings take the median of all but the first."""
    stage: int = 3
    """ZeRO stage: 0 replicate all, 1 shard optimizer states, 2 + grads, 3 + params."""
    precision: str = "fp32"
    """fp32 (4 + 4 + 8 B/param) or mixed (bf16 + fp32 master: 2 + 2 + 12)."""
    impl: str = "scratch"
    """scratch: utils.zero.optim/fsdp; torch: DDP, ZeroRedundancyOptimizer, FSDP2."""
    d_model: int = 64
    """GPT hidden size (GPTConfig.d_model)."""
    n_layers: int = 4
    """GPT blocks: stage 3 gathers one at a time."""
    batch_size: int = 8
    """Global batch (sequences) per step, split evenly over the ranks."""
    lr: float = 1e-3
    """AdamW's learning rate (small, so bf16 rounding stays visible but bounded)."""
    bucket_numel: int = 0
    """Scratch stage 2: most elements per gradient bucket; 0 means one block's worth."""
    track_memory: bool = True
    """Record the memory timeline (a dispatch mode; the benchmark turns it off)."""
    return_params: bool = False
    """Send the final full parameters back in ``extra["params"]`` (tests compare)."""

    def __post_init__(self):
        super().__post_init__()
        check_int("d_model", self.d_model, maximum=8192)
        check_int("n_layers", self.n_layers, maximum=256)
        check_int("batch_size", self.batch_size, maximum=2**16)
        if self.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 heads: {self.d_model}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} must divide evenly over "
                f"world_size={self.world_size} ranks"
            )
        check_int("bucket_numel", self.bucket_numel, minimum=0)
        if self.bucket_numel and (self.impl, self.stage) != ("scratch", 2):
            raise ValueError("bucket_numel applies to impl='scratch', stage=2 only")
        check_number("lr", self.lr, minimum=0, maximum=1e6)

    def gpt(self) -> GPTConfig:
        return GPTConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=4)

    def estimate_bytes(self) -> int:
        """Per rank, unsharded (an upper bound for every stage): 16 B per parameter
        of model states, a full copy for gathers, and the activations of this
        rank's sequences (about 34 s h bytes per layer in fp32, Korthikanti et al.
        2022, plus the logits)."""
        g = self.gpt()
        params = 12 * g.n_layers * g.d_model**2 + (g.vocab_size + g.seq_len) * g.d_model
        rows = self.batch_size // self.world_size
        acts = rows * g.seq_len * (34 * g.d_model * g.n_layers + 8 * g.vocab_size)
        return 20 * params + 4 * acts


TINY = Config(steps=3, d_model=32, n_layers=2, batch_size=8)
"""What tests and CI run: 28,032 parameters, a second or two per configuration."""


def build_model(cfg: Config, device) -> GPT:
    """The GPT; in mixed precision its weights are rounded to bf16 first, so every
    implementation (bf16 params + fp32 master, or fp32 shards cast to bf16) starts
    from the same point."""
    model = GPT(cfg.gpt(), seed=cfg.seed).to(device)
    if cfg.precision == "mixed":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    return model


# [apply-scratch-start]
OPTIMIZERS = {0: ReplicatedOptimizer, 1: ShardedOptimizer, 2: ShardedGradOptimizer}


def apply_scratch(model, cfg: Config, meter, track=None, on_event=None):
    """The course's ZeRO: (model, optimizer) for ``cfg.stage``."""
    mixed = cfg.precision == "mixed"
    if cfg.stage == 3:
        compute = torch.bfloat16 if mixed else None  # 2-byte shards, gathers, grads
        model = FullyShardedModule(
            model, compute, meter=meter, track=track, on_event=on_event
        )
        return model, model.optimizer(torch.optim.AdamW, lr=cfg.lr)
    if mixed:
        model = model.to(torch.bfloat16)  # 2-byte params and grads
    kw = {}
    if cfg.stage == 2:  # reduce-scatter about one block's gradients at a time
        kw["bucket_numel"] = stage2_bucket_numel(model, cfg)
        kw["on_event"] = on_event  # each gradient copied, each bucket reduced
    opt = OPTIMIZERS[cfg.stage](
        model.parameters(),
        torch.optim.AdamW,
        lr=cfg.lr,
        master_dtype=torch.float32 if mixed else None,  # fp32 master: optimizer state
        meter=meter,
        track=track,
        **kw,
    )
    return model, opt


def stage2_bucket_numel(model, cfg: Config) -> int:
    """Stage 2's bucket: ``cfg.bucket_numel``, or the largest block's parameters."""
    block = max(sum(p.numel() for p in u.parameters()) for u in default_units(model))
    return cfg.bucket_numel or block


# [apply-scratch-end]


def stage2_layout(report):
    """(model, bucket elements) of a stage-2 run, rebuilt on the CPU from the
    report's config: what ``utils.zero.figures.stage2_gradient_peak`` reads."""
    cfg = Config(**field_of(field_of(report, "extra"), "config"))
    model = build_model(cfg, "cpu")
    return model, stage2_bucket_numel(model, cfg)


# [apply-torch-start]
def apply_torch(model, cfg: Config):
    """torch's own implementation of ``cfg.stage``: (model, optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if cfg.stage < 2:
        ddp = DistributedDataParallel(
            model, device_ids=None if device.index is None else [device.index]
        )
        if cfg.stage == 0:
            return ddp, torch.optim.AdamW(ddp.parameters(), lr=cfg.lr)
        opt = ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=cfg.lr
        )
        return ddp, opt
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if cfg.precision == "mixed":
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16
        )
    for unit in [*default_units(model), model]:  # the same units as the scratch one
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.stage == 3)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr)


# [apply-torch-end]


@lab_data
class ZeroData:
    """What the ZeRO lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    implementation: str = ""
    """The class (scratch) or torch API (torch) that ran the stage."""
    predicted: dict = field(default_factory=dict)
    """``utils.memory_model.model_state_bytes`` for this run, by category."""
    padding_bytes: int = 0
    """Bytes of padding the flat shards add (so every rank's shard is equal)."""
    unit_bytes: dict = field(default_factory=dict)
    """Stage 3: bytes of each unit's full (gathered) parameters."""
    bytes_per_element: int = 4
    """Bytes of one parameter element as communicated (2 in bf16, 4 in fp32)."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step (as ``RankReport.comm_source`` says)."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    comm_by_op: dict = field(default_factory=dict)
    """Bytes of the last step by operation."""
    comm_sources: dict = field(default_factory=dict)
    """For each operation: "counted" or "modelled"."""
    events: list = field(default_factory=list)
    """Scratch stages 2 and 3: each event (stage 2: every gradient copied into its
    bucket and every bucket reduce-scattered; stage 3: every gather, free and
    reduce-scatter), with the memory by category then."""
    params: dict | None = None
    """The final full parameters (name -> flat list) when ``return_params``."""


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, apply ZeRO, train ``cfg.steps`` steps, report."""
    cfg, rank, n, device = lab.join(cfg)
    mem = MemoryTracker(device) if cfg.track_memory else None
    meter, events, clock = CommMeter(), [], lab.PhaseClock(device, mem)

    def on_event(event, unit, phase):  # stage 3's gathers and frees, with memory
        if mem is not None and clock.step is not None:
            now = mem.current()
            events.append(
                dict(event=event, unit=unit, phase=phase, step=clock.step, current=now)
            )

    model = build_model(cfg, device)
    num_params = count_params(model)
    counter = nullcontext
    if cfg.impl == "scratch":
        model, opt = apply_scratch(model, cfg, meter, mem and mem.assign, on_event)
    else:
        model, opt = apply_torch(model, cfg)
        counter = partial(CollectiveCounter, meter)
    amp = cfg.impl == "torch" and cfg.stage < 2 and cfg.precision == "mixed"
    autocast = partial(torch.autocast, device.type, torch.bfloat16, enabled=amp)
    if mem is not None:
        mem.watch(model, opt)
    losses, sent, wired, times = [], [], [], []
    with mem if mem is not None else nullcontext():
        if mem is not None:
            mem.mark("init")
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
            x, y = shard_batch((x.to(device), y.to(device)), rank, n)
            opt.zero_grad()  # here, not after the step: "after the step" has grads
            meter.reset()
            dist.barrier()
            clock.new_step(step)
            wire = WireCounter().start()
            with counter():
                with clock("forward"), autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                with clock("backward"):
                    loss.backward()
                with clock("step"):
                    opt.step()
            wired.append(wire.stop())
            clock.step = None
            s = clock.seconds
            times.append(
                dict(
                    forward=s["forward"],
                    backward=s["backward"],
                    optimizer=s["step"],
                    step=sum(s.values()),
                )
            )
            sent.append(meter.total)
            losses.append(loss.item())
            lab.check_finite(losses[-1], step)
            del logits, loss
    params = None
    if cfg.return_params:
        params = {
            k: v.float().cpu().reshape(-1).tolist()
            for k, v in full_state(model).items()
        }
    later = times[1:] or times
    sharded = model if cfg.stage == 3 else opt
    return lab.rank_report(
        cfg,
        num_params=num_params,
        losses=lab.global_losses(losses),
        memory=mem.timeline() if mem is not None else [],
        comm_bytes=sent[-1],
        comm_source=meter.kind,
        wire_bytes=wired[-1],
        timings={k: statistics.median(t[k] for t in later) for k in later[0]},
        extra=ZeroData(
            config=asdict(cfg),
            implementation=TORCH_STAGES[cfg.stage]
            if cfg.impl == "torch"
            else type(sharded).__name__,
            predicted=model_state_bytes(
                num_params,
                world_size=n,
                zero_stage=cfg.stage,
                mixed_precision=cfg.precision == "mixed",
            ).as_dict(),
            padding_bytes=getattr(sharded, "padding_bytes", 0),
            unit_bytes=model.unit_bytes() if hasattr(model, "unit_bytes") else {},
            bytes_per_element=2 if cfg.precision == "mixed" and not amp else 4,
            comm_bytes_per_step=sent,
            wire_bytes_per_step=wired,
            comm_by_op=dict(meter.by_op),
            comm_sources=dict(meter.source),
            events=events,
            params=params,
        ),
    )


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports."""
    return lab.run(worker, cfg)


def run_many(cfgs: list[Config]) -> list[list[RankReport]]:
    """Several configurations (same world size) in one launch: rank reports each."""
    return lab.run_many(worker, cfgs, timeout=60.0)


def main(argv=None) -> None:
    run_from_cli(Config, run, argv)


if __name__ == "__main__":
    main()
