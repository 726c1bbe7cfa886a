"""Lab 3, CPU offloading: optimizer, gradients, parameters or activations on the host.

Chapter 3 ("CPU offloading"). Every rank trains the course's small GPT with AdamW on
its 1/world_size of a fixed global batch, keeping on the host what the device does
not need right now, and reports per rank: losses; device and host memory by
category after every phase; the bytes copied host -> device and device -> host per
step (counted); and the step time split into compute, transfer and optimizer, with
the transfer time beside a modelled PCIe time::

    python -m labs.offload --world-size 4 --offload optimizer+grads --precision mixed
    python -m labs.offload --world-size 2 --offload params
    python -m labs.offload --world-size 2 --offload none --device-mem-mb 1.5
    python -m labs.offload --world-size 2 --offload activations --impl torch
    torchrun --nproc-per-node 4 -m labs.offload --offload optimizer+grads

Modes (``--offload``), the course's pieces (``--impl scratch``) and torch's:

=================  ===========================================  ======================
mode               scratch (``utils.offload``)                  torch
=================  ===========================================  ======================
none               ZeRO-2 (``ShardedGradOptimizer``)            ``fully_shard(reshard_
                                                                after_forward=False)``
optimizer          ``OffloadOptimizer(offload_grads=False)``    (none in torch)
optimizer+grads    ``OffloadOptimizer``: ZeRO-Offload           (none in torch)
params             ZeRO-3 + ``ParamOffload``: ZeRO-Infinity     ``fully_shard`` +
                                                                ``CPUOffloadPolicy``
activations        none + ``OffloadActivations`` per block      none + ``save_on_cpu``
recompute          none + ``recompute`` per block               none + ``checkpoint``
=================  ===========================================  ======================

torch 2.13 has no optimizer-only offload (DeepSpeed's ZeRO-Offload is not part of
it): ``CPUOffloadPolicy`` moves parameters, gradients and optimizer states together,
so ``--impl torch`` refuses "optimizer" and "optimizer+grads". On the CPU fallback
(gloo) device and host are both CPU memory: the memory ledger files each tensor in
the pool where the algorithm keeps it (``utils.memory``), ``--device-mem-mb`` gives
the device pool a budget (exceeding it raises ``torch.OutOfMemoryError``, as CUDA
does), and the copies are memcpys, counted and timed like PCIe transfers would be,
with the modelled PCIe time beside them. torch's pieces make no copy on CPU
(``utils.offload.transfer``): their counted bytes are 0 there.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn import functional as F

from utils import lab
from utils.checks import check_bool, check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.comm import CommMeter
from utils.memory import MemoryTracker
from utils.models import GPT, GPTConfig, count_params, gpt_batch, shard_batch
from utils.offload.accounting import MODES, bytes_moved, offload_state_bytes
from utils.offload.activations import apply_activations
from utils.offload.adam import HostAdamW
from utils.offload.optim import OffloadOptimizer
from utils.offload.params import ParamOffload, host_step
from utils.offload.transfer import PCIE, CrossDeviceCopies, Transfers, pcie_seconds
from utils.report import RankReport, field_of, format_bytes, lab_data
from utils.wire import WireCounter
from utils.zero.fsdp import FullyShardedModule, default_units
from utils.zero.optim import ShardedGradOptimizer
from utils.zero.torch_impl import full_state

PRECISIONS = ("fp32", "mixed")
IMPLS = ("scratch", "torch")
TORCH_MODES = {
    "none": "fully_shard(reshard_after_forward=False)",
    "params": "fully_shard(offload_policy=CPUOffloadPolicy(pin_memory=False))",
    "activations": "fully_shard(reshard_after_forward=False) + save_on_cpu",
    "recompute": "fully_shard(reshard_after_forward=False) + checkpoint",
}
"""torch's implementation of each mode (torch 2.13; all run on gloo/CPU)."""
MIB = 2**20


@dataclass(frozen=True)
class Config(LabConfig):
    """One offloading run."""

    CHOICES = {
        **LabConfig.CHOICES,
        "offload": MODES,
        "precision": PRECISIONS,
        "impl": IMPLS,
    }
    CLI_HIDDEN = ("return_params",)

    steps: int = 3
    """Optimizer steps; timings take the median of all but the first."""
    offload: str = "optimizer+grads"
    """What lives on the host: none, optimizer, optimizer+grads, params,
    activations (saved tensors) or recompute (activations not kept at all)."""
    precision: str = "mixed"
    """fp32 (4-byte parameters and gradients) or mixed (bf16 + fp32 master)."""
    impl: str = "scratch"
    """scratch: utils.offload; torch: FSDP2's CPUOffloadPolicy, save_on_cpu,
    checkpoint."""
    device_mem_mb: float = 0.0
    """Device memory budget per rank in MiB (2**20 bytes) for the memory ledger;
    0: no budget. Past it a rank raises torch.OutOfMemoryError."""
    delayed_update: bool = False
    """optimizer modes: the one-step delayed parameter update (host step
    overlapped with the next forward and backward)."""
    d_model: int = 64
    """GPT hidden size (GPTConfig.d_model)."""
    n_layers: int = 4
    """GPT blocks: the activation policies apply to each."""
    batch_size: int = 8
    """Global batch (sequences) per step, split evenly over the ranks."""
    lr: float = 1e-3
    """AdamW's learning rate."""
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
        check_number("lr", self.lr, minimum=0, maximum=1e6)
        check_number("device_mem_mb", self.device_mem_mb, minimum=0, strict=False)
        check_bool("delayed_update", self.delayed_update)
        if self.impl == "torch" and self.offload not in TORCH_MODES:
            raise ValueError(
                f"impl='torch' has no offload={self.offload!r}: torch 2.13 offloads "
                "the optimizer only together with the parameters and gradients "
                "(FSDP2's CPUOffloadPolicy: offload='params'); use impl='scratch' "
                f"or one of {tuple(TORCH_MODES)}"
            )
        if self.delayed_update and (
            self.impl != "scratch"
            or self.offload not in ("optimizer", "optimizer+grads")
        ):
            raise ValueError(
                "delayed_update applies to impl='scratch' with offload='optimizer' "
                f"or 'optimizer+grads', not impl={self.impl!r} "
                f"offload={self.offload!r}"
            )
        if self.device_mem_mb and not self.track_memory:
            raise ValueError("device_mem_mb needs track_memory=True (the ledger)")

    @property
    def device_budget(self) -> int | None:
        """The budget in bytes (rounded up: any positive budget is one), or None."""
        return math.ceil(self.device_mem_mb * MIB) or None

    def gpt(self) -> GPTConfig:
        return GPTConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=4)

    def estimate_bytes(self) -> int:
        """Per rank, both pools (one machine's memory here): 20 B per parameter of
        model states and copies, a full copy for gathers, and the activations of
        this rank's sequences twice (device and host copies; about 34 s h bytes
        per layer in fp32, Korthikanti et al. 2022, plus the logits)."""
        g = self.gpt()
        params = 12 * g.n_layers * g.d_model**2 + (g.vocab_size + g.seq_len) * g.d_model
        rows = self.batch_size // self.world_size
        acts = rows * g.seq_len * (34 * g.d_model * g.n_layers + 8 * g.vocab_size)
        return 24 * params + 8 * acts


TINY = Config(steps=3, d_model=32, n_layers=2, batch_size=8)
"""What tests and CI run: 28,032 parameters, a second or two per configuration."""


def build_model(cfg: Config, device) -> GPT:
    """The GPT; in mixed precision its weights are rounded to bf16 first, so every
    mode starts from the same point (as in ``labs.zero``)."""
    model = GPT(cfg.gpt(), seed=cfg.seed).to(device)
    if cfg.precision == "mixed":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    return model


def bucket_numel(model) -> int:
    """ZeRO-2's bucket (and ZeRO-Offload's): the largest block's parameters."""
    return max(sum(p.numel() for p in u.parameters()) for u in default_units(model))


# [apply-scratch-start]
def apply_scratch(model, cfg: Config, transfers, meter, track=None):
    """The course's pieces for ``cfg.offload``: (model, optimizer)."""
    mixed = cfg.precision == "mixed"
    master = torch.float32 if mixed else None
    if cfg.offload == "params":  # ZeRO-3, every shard on the host
        offload = ParamOffload(transfers, track)
        compute = torch.bfloat16 if mixed else None
        model = FullyShardedModule(
            model, compute, meter=meter, track=track, offload=offload
        )
        return model, offload.optimizer(model, HostAdamW, lr=cfg.lr)
    if mixed:
        model = model.to(torch.bfloat16)  # 2-byte params and grads on the device
    bucket = bucket_numel(model)
    if cfg.offload in ("optimizer", "optimizer+grads"):  # ZeRO-Offload
        opt = OffloadOptimizer(
            model.parameters(),
            HostAdamW,
            lr=cfg.lr,
            offload_grads=cfg.offload == "optimizer+grads",
            master_dtype=torch.float32,
            bucket_numel=bucket,
            delayed_update=cfg.delayed_update,
            meter=meter,
            transfers=transfers,
            track=track,
        )
        return model, opt
    policy = {"activations": "offload", "recompute": "recompute"}.get(cfg.offload)
    if policy:  # on each block; the model states stay as in "none"
        apply_activations(model, policy, transfers=transfers)
    opt = ShardedGradOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        lr=cfg.lr,
        master_dtype=master,
        bucket_numel=bucket,
        meter=meter,
        track=track,
    )
    return model, opt


# [apply-scratch-end]


# [apply-torch-start]
def apply_torch(model, cfg: Config, track=None):
    """torch's own pieces for ``cfg.offload``: (model, optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    device = next(model.parameters()).device
    policy = {"activations": "offload", "recompute": "recompute"}.get(cfg.offload)
    if policy:  # save_on_cpu / checkpoint around each block, before sharding
        apply_activations(model, policy, impl="torch", track=track)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if cfg.precision == "mixed":
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16
        )
    on_host = cfg.offload == "params"
    # pin_memory=False: pinning needs CUDA; on a GPU, pinned copies overlap compute.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if on_host else None
    for unit in [*default_units(model), model]:  # the same units as the scratch one
        fully_shard(
            unit,
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=on_host,
            offload_policy=offload or OffloadPolicy(),
        )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    if on_host:  # FSDP2 keeps its shards, gradients and states on the CPU
        shards = list(model.parameters())
        if track is not None:
            track("params", shards, pool="host")
            track("grads", lambda: [p.grad for p in shards], pool="host")
            track("optimizer", lambda: list(opt.state.values()), pool="host")
        host_step(opt)
    return model, opt


# [apply-torch-end]


@lab_data
class OffloadData:
    """What the offload lab reports besides the common fields."""

    config: dict
    """The Config, as a dict."""
    implementation: str = ""
    """The classes (scratch) or torch API (torch) that ran the mode."""
    predicted: dict = field(default_factory=dict)
    """``offload_state_bytes`` for this run: {"device": {...}, "host": {...}}."""
    moved_predicted: dict = field(default_factory=dict)
    """``bytes_moved`` for this run (model states only): {"h2d", "d2h"}."""
    moved_per_step: list = field(default_factory=list)
    """Per step, counted bytes {"h2d", "d2h"} (see ``moved_source``)."""
    copies_per_step: list = field(default_factory=list)
    """Per step, how many copies {"h2d", "d2h"} were made."""
    moved_source: str = ""
    """What ``moved_per_step`` counts: the course's pieces' copies, or the
    cross-device copies torch made (none on CPU)."""
    times_per_step: list = field(default_factory=list)
    """Per step, seconds: forward, backward, optimizer (the step less its
    transfers), transfer (all copies), compute (forward + backward less their
    transfers), step (all), modelled_transfer (bytes / PCIe bandwidth),
    host_update (the last host update that finished: with the delayed update it
    runs in a thread during the next step, so step k reports step k - 1's)."""
    pcie_bytes_per_s: float = 0.0
    """The per-direction bandwidth of the modelled transfer time (utils.hardware)."""
    layer_activations: list = field(default_factory=list)
    """Last step: device and host activation bytes before the first block's
    forward, then after each block's."""
    padding_bytes: int = 0
    """Bytes of padding the flat buffers add on this rank."""
    device_budget: int | None = None
    """The device pool's budget in bytes (None: none)."""
    out_of_memory: str | None = None
    """The torch.OutOfMemoryError message if this rank ran out of device memory."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step by the collectives (modelled, ``utils.comm``)."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    params: dict | None = None
    """The final full parameters (name -> flat list) when ``return_params``."""


class _StepTimes:
    """Splits a step's measured time: transfers within each phase set apart."""

    def __init__(self, transfers: Transfers):
        self.transfers, self.marks = transfers, {}

    def __call__(self, phase: str) -> None:
        self.marks[phase] = sum(self.transfers.seconds.values())


def _full_params(model, cfg) -> dict:
    """Every parameter whole, as the model computes with it: bf16 in mixed precision.
    The course's other modes keep bf16 parameters (fp32 masters in the optimizer),
    while ZeRO-3 and FSDP2 hand back their fp32 masters: round those, to compare like
    with like."""
    dtype = torch.bfloat16 if cfg.precision == "mixed" else torch.float32
    if cfg.impl == "scratch" and cfg.offload == "params":
        state = model.full_state_dict()
    elif cfg.impl == "torch":
        state = full_state(model)
    else:
        state = model.state_dict()
    return {k: v.to(dtype).float().cpu().reshape(-1).tolist() for k, v in state.items()}


def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, apply the offload mode, train, report."""
    cfg, rank, n, device = lab.join(cfg)
    mem = MemoryTracker(device, cfg.device_budget) if cfg.track_memory else None
    track = mem.assign if mem is not None else None
    meter, transfers = CommMeter(), Transfers(device)
    clock, split = lab.PhaseClock(device, mem), _StepTimes(transfers)
    torch_copies = CrossDeviceCopies(device) if cfg.impl == "torch" else None
    model = build_model(cfg, device)
    num_params = count_params(model)
    blocks = default_units(model)
    if cfg.impl == "scratch":
        model, opt = apply_scratch(model, cfg, transfers, meter, track)
    else:
        model, opt = apply_torch(model, cfg, track)
    layer_acts: list[dict] = []

    def after_block(module, args, output):  # activations held after each block
        if mem is not None and clock.step == cfg.steps - 1:
            layer_acts.append(
                {p: mem.current(p)["activations"] for p in ("device", "host")}
            )

    for block in blocks:
        block.register_forward_hook(after_block)
    blocks[0].register_forward_pre_hook(lambda m, args: after_block(m, args, None))
    losses, moved, copies, times, sent, wired = [], [], [], [], [], []
    oom = None
    counting = torch_copies if torch_copies is not None else nullcontext()
    try:
        if mem is not None:
            mem.watch(model, opt)
        with mem if mem is not None else nullcontext(), counting:
            if mem is not None:
                mem.mark("init")
            for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
                x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
                x, y = shard_batch((x.to(device), y.to(device)), rank, n)
                opt.zero_grad()
                dist.barrier()
                transfers.reset()
                meter.reset()
                if torch_copies is not None:
                    torch_copies.reset()
                clock.new_step(step)
                wire = WireCounter().start()
                split("start")
                with clock("forward"):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                split("forward")
                with clock("backward"):
                    loss.backward()
                split("backward")
                with clock("step"):
                    opt.step()
                split("step")
                wired.append(wire.stop())
                clock.step = None
                counted = torch_copies.reset() if torch_copies else transfers.totals()
                moved.append(counted["bytes"])
                copies.append(counted["copies"])
                times.append(_times(clock.seconds, split.marks, counted, opt))
                sent.append(meter.total)
                losses.append(loss.item())
                lab.check_finite(losses[-1], step)
                del logits, loss
            if hasattr(opt, "finish"):
                opt.finish()  # a delayed update still in flight
                if mem is not None:
                    mem.mark("finish")
    except torch.OutOfMemoryError as err:
        oom = str(err)
        _every_rank_ran_out(err)
    params = None
    if cfg.return_params and oom is None:
        params = _full_params(model, cfg)
    later = times[1:] or times
    return lab.rank_report(
        cfg,
        num_params=num_params,
        losses=lab.global_losses(losses) if oom is None else [],
        memory=mem.timeline() if mem is not None else [],
        comm_bytes=sent[-1] if sent else 0,
        comm_source=meter.kind,
        wire_bytes=wired[-1] if wired else None,
        timings={k: statistics.median(t[k] for t in later) for k in later[0]}
        if later
        else {},
        extra=OffloadData(
            config=asdict(cfg),
            implementation=_implementation(cfg, opt),
            predicted=offload_state_bytes(
                num_params,
                cfg.offload,
                world_size=n,
                mixed_precision=cfg.precision == "mixed",
            ),
            moved_predicted=bytes_moved(
                num_params,
                cfg.offload,
                world_size=n,
                mixed_precision=cfg.precision == "mixed",
            ),
            moved_per_step=moved,
            copies_per_step=copies,
            moved_source="counted: cross-device copies torch made"
            if cfg.impl == "torch"
            else "counted: the copies the course's pieces made",
            times_per_step=times,
            pcie_bytes_per_s=PCIE.host_bytes_per_s,
            layer_activations=layer_acts,
            padding_bytes=getattr(opt, "padding_bytes", 0)
            + getattr(model, "padding_bytes", 0),
            device_budget=cfg.device_budget,
            out_of_memory=oom,
            comm_bytes_per_step=sent,
            wire_bytes_per_step=wired,
            params=params,
        ),
    )


OOM_WAIT_S = 10.0
"""How long a rank that ran out of device memory waits for the others to do so."""
_ooms = 0  # out-of-memory events so far in this process: one store key each


def _every_rank_ran_out(err: torch.OutOfMemoryError) -> None:
    """Return if every rank ran out of device memory (the symmetric runs of the
    chapter run out at the same op, and each then reports it). A rank that ran out
    alone would leave the others blocked in a collective it never joins, so it
    raises, with the out-of-memory message, and the launcher stops the rest. The
    ranks count themselves in the rendezvous store, not by a collective: the
    blocked ones are inside one."""
    global _ooms
    _ooms += 1
    world = dist.get_world_size()
    if world == 1:
        return
    store, key = dist.distributed_c10d._get_default_store(), f"course/oom/{_ooms}"
    arrived, deadline = store.add(key, 1), time.monotonic() + OOM_WAIT_S
    while arrived < world and time.monotonic() < deadline:
        time.sleep(0.05)
        arrived = store.add(key, 0)
    if arrived < world:
        raise torch.OutOfMemoryError(
            f"rank {dist.get_rank()}: {err} ({world - arrived} of {world} ranks did "
            f"not run out of memory at the same point within {OOM_WAIT_S:g} s, so "
            "the run stops)"
        )


def _times(seconds: dict, marks: dict, counted: dict, opt) -> dict:
    """One step's time split (see ``OffloadData.times_per_step``)."""
    in_fwd = marks["forward"] - marks["start"]
    in_bwd = marks["backward"] - marks["forward"]
    in_step = marks["step"] - marks["backward"]
    moved = sum(counted["bytes"].values())
    return dict(
        forward=seconds["forward"],
        backward=seconds["backward"],
        optimizer=max(0.0, seconds["step"] - in_step),
        transfer=in_fwd + in_bwd + in_step,
        compute=max(0.0, seconds["forward"] + seconds["backward"] - in_fwd - in_bwd),
        step=sum(seconds.values()),
        modelled_transfer=pcie_seconds(moved),
        host_update=getattr(opt, "host_step_seconds", 0.0),
    )


def _implementation(cfg: Config, opt) -> str:
    if cfg.impl == "torch":
        return TORCH_MODES[cfg.offload]
    return {
        "none": "ShardedGradOptimizer",
        "optimizer": "OffloadOptimizer(offload_grads=False)",
        "optimizer+grads": "OffloadOptimizer",
        "params": "FullyShardedModule(offload=ParamOffload)",
        "activations": "ShardedGradOptimizer + OffloadActivations",
        "recompute": "ShardedGradOptimizer + recompute",
    }[cfg.offload]


def check_fits(reports) -> None:
    """Raise the ranks' ``torch.OutOfMemoryError`` if any rank ran out."""
    for r in reports:
        message = field_of(field_of(r, "extra"), "out_of_memory")
        if message:
            raise torch.OutOfMemoryError(f"rank {field_of(r, 'rank')}: {message}")


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports;
    raises ``torch.OutOfMemoryError`` if a rank ran out of its device budget."""
    reports = lab.run(worker, cfg)
    check_fits(reports)
    return reports


def run_many(cfgs: list[Config]) -> list[list[RankReport]]:
    """Several configurations (same world size) in one launch: rank reports each.
    A run that ran out of device memory comes back with ``out_of_memory`` set."""
    return lab.run_many(worker, cfgs)


def describe(reports) -> str:
    """What the lab prints after the shared summary: bytes moved, time split,
    and rank 0's device and host memory at the end of each phase of the last step."""
    r = reports[0]
    x = r.extra
    moved = x.moved_per_step[-1] if x.moved_per_step else {"h2d": 0, "d2h": 0}
    t = r.timings
    lines = [
        f"mode {x.config['offload']} ({x.implementation}), {x.config['precision']}",
        f"moved per step, rank 0 ({x.moved_source}): host->device "
        f"{format_bytes(moved['h2d'])}, device->host {format_bytes(moved['d2h'])}"
        f" (model-state formula: {format_bytes(x.moved_predicted['h2d'])} + "
        f"{format_bytes(x.moved_predicted['d2h'])})",
    ]
    if t:
        lines.append(
            f"step {t['step'] * 1e3:.1f} ms = compute {t['compute'] * 1e3:.1f} + "
            f"transfer {t['transfer'] * 1e3:.2f} (measured; PCIe "
            f"{PCIE.host_gbps:g} GB/s would take {t['modelled_transfer'] * 1e3:.3f}, "
            f"modelled) + optimizer {t['optimizer'] * 1e3:.1f} (rank 0, median)"
        )
    last = [m for m in r.memory if m["step"] == len(r.losses) - 1]
    lines.append("rank 0, last step, by phase (device | host):")
    for m in last:
        cells = []
        for pool in ("device", "host"):
            values = m["pools"][pool]["current"]
            cells.append(
                " ".join(f"{c} {format_bytes(v)}" for c, v in values.items() if v)
                or "-"
            )
        lines.append(f"  {m['phase']:>8}: {cells[0]} | {cells[1]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    try:
        reports, args = run_from_cli(Config, run, argv)
    except torch.OutOfMemoryError as err:  # the budget's verdict, not a bug
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json is None and int(os.environ.get("RANK", "0")) == 0:
        print(describe(reports))


if __name__ == "__main__":
    main()
