"""Lab 4, model parallelism: the model itself split across ranks, by layers or by
tensors (Megatron-LM), alone or times data parallelism.

Chapter 4 ("Model parallelism: layers and tensors"). Every rank builds the course's
GPT from the same seed and keeps only its part, trains ``steps`` AdamW (or SGD)
steps on its data-parallel replica's share of a fixed global batch, and reports
losses, its coordinates, memory by category after every phase, bytes per step by
collective and by phase (modelled, and counted on its sockets), timings and, in
layers mode, the per-rank timeline of compute, waits and sends::

    python -m labs.model_parallel --world-size 4 --mode tensor
    python -m labs.model_parallel --world-size 4 --mode tensor --sequence-parallel
    python -m labs.model_parallel --world-size 4 --mode tensor --tp-size 2 --dp-size 2
    python -m labs.model_parallel --world-size 2 --mode tensor --impl torch
    python -m labs.model_parallel --world-size 4 --mode layers
    python -m labs.model_parallel --world-size 4 --mode layers --dp-size 2 --impl torch
    torchrun --nproc-per-node 4 -m labs.model_parallel --mode tensor

``--mode layers`` (inter-layer model parallelism): rank k of a replica holds the
k-th contiguous group of blocks (the first also the embedding, the last the final
norm, head and loss); one batch goes forward through the chain with blocking
sends and its gradients back (``utils.model_parallel.layer_split``). torch:
``torch.distributed.pipelining``'s ``PipelineStage`` with ``ScheduleGPipe`` and
one micro-batch, which is the same computation. The groups are the layout's "pp"
axis (``utils.dims.ParallelDims``; the coordinate "pp" is the group's index).

``--mode tensor`` (Shoeybi et al. 2019, "Megatron-LM", sec. 3): every block's
attention and MLP split over the t ranks of a tensor-parallel group, the
embedding and the head split along the vocabulary, the loss computed from the
vocabulary slices; ``--sequence-parallel`` adds Korthikanti et al. 2022's split of
the layer norms and residuals along the sequence. scratch:
``utils.model_parallel.apply_tensor_parallel``; torch: ``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel`` / ``SequenceParallel`` /
``PrepareModuleInput`` and ``loss_parallel`` (``utils.model_parallel.torch_impl``;
all of them run on gloo and the CPU in torch 2.13).

``--dp-size d``: d replicas of the split model (the layout's "dp" axis), each on
``batch_size / d`` sequences; after the backward every gradient (a shard, for a
sharded parameter) is averaged over the rank's dp group in one all-reduce.

Bytes: the scratch layers record each collective's modelled bytes (nccl-tests'
accounting, ``utils.comm``) and the layer groups count each send; torch's
collectives are recorded by ``torch_impl.TPCollectiveCounter`` (modelled too).
Every phase and every block is also counted on the rank's TCP sockets
(``utils.wire``, ``probes``): gloo's real traffic, whose reduce-scatter is a full
all-reduce (twice the model's bytes).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn import functional as F

from utils import lab
from utils.checks import check_int, check_number
from utils.cli import LabConfig, progress, run_from_cli
from utils.comm import CommMeter, nbytes
from utils.dims import ParallelDims
from utils.launch import check_cuda_p2p
from utils.memory import MemoryTracker
from utils.memory_model import course_gpt_activation_bytes, course_gpt_outside_bytes
from utils.model_parallel.apply import (
    apply_tensor_parallel,
    check_tensor_parallel,
    full_parameters,
    sync_sequence_parallel_grads,
)
from utils.model_parallel.layer_split import (
    LayerGroup,
    gpt_groups,
    named_parameters,
)
from utils.model_parallel.layers import vocab_parallel_cross_entropy
from utils.model_parallel.torch_impl import (
    TorchLayerGroup,
    TPCollectiveCounter,
    full_state,
    parallel_cross_entropy,
    torch_tp,
)
from utils.models import (
    GPT,
    GPTConfig,
    count_params,
    gpt_batch,
    shard_batch,
    split_layers,
)
from utils.report import RankReport, lab_data
from utils.wire import WireCounter

MODES = ("layers", "tensor")
IMPLS = ("scratch", "torch")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class Config(LabConfig):
    """One model-parallel training run."""

    CHOICES = {
        **LabConfig.CHOICES,
        "mode": MODES,
        "impl": IMPLS,
        "precision": PRECISIONS,
        "optimizer": OPTIMIZERS,
    }
    CLI_HIDDEN = ("return_params",)

    world_size: int = 4
    """Ranks to start: tp_size x dp_size (tensor), layer groups x dp_size (layers)."""
    steps: int = 3
    """Optimizer steps; timings take the median of all but the first."""
    mode: str = "tensor"
    """layers: each rank a contiguous group of blocks; tensor: every layer split."""
    tp_size: int = 0
    """Tensor-parallel degree t (tensor mode); 0 means world_size / dp_size."""
    dp_size: int = 1
    """Data-parallel replicas of the split model; gradients averaged over them."""
    sequence_parallel: bool = False
    """Tensor mode: layer norms and residuals split along the sequence (Korthikanti)."""
    impl: str = "scratch"
    """scratch: utils.model_parallel; torch: parallelize_module / pipelining."""
    precision: str = "fp32"
    """fp32 (4-byte parameters, gradients, activations) or bf16 (2 bytes, pure bf16)."""
    n_layers: int = 4
    """GPT blocks L (layers mode: cut into world_size / dp_size contiguous groups)."""
    d_model: int = 64
    """GPT hidden size h."""
    n_heads: int = 4
    """Attention heads a (tensor mode: t must divide them)."""
    vocab_size: int = 64
    """Vocabulary v (tensor mode: embedding and head split into v / t rows)."""
    seq_len: int = 32
    """Tokens per sequence s (with sequence_parallel, t must divide it)."""
    batch_size: int = 8
    """Global batch b (sequences) per step, split over the dp_size replicas."""
    tie_weights: bool = False
    """Share the embedding and head matrices (tensor mode only; untied by default)."""
    optimizer: str = "adamw"
    """adamw (two states per parameter) or sgd (plain, no state: what the equality
    tests use, since AdamW's elementwise step turns a gradient that is zero up to
    rounding into a step of +-lr whose sign is the rounding's)."""
    lr: float = 1e-3
    """The optimizer's learning rate."""
    track_memory: bool = True
    """Record the memory ledger after every phase (the benchmark turns it off)."""
    probes: bool = True
    """Count socket bytes per phase and per block, and each block's saved
    activations (the benchmark turns it off)."""
    return_params: bool = False
    """Send the final parameters back in ``extra.params`` (tests compare them)."""

    def __post_init__(self):
        super().__post_init__()
        check_int("dp_size", self.dp_size, maximum=self.world_size)
        check_int("tp_size", self.tp_size, minimum=0, maximum=self.world_size)
        check_int("n_layers", self.n_layers, maximum=256)
        check_int("d_model", self.d_model, maximum=8192)
        check_int("n_heads", self.n_heads, maximum=256)
        check_int("vocab_size", self.vocab_size, maximum=2**20)
        check_int("seq_len", self.seq_len, maximum=2**16)
        check_int("batch_size", self.batch_size, maximum=2**16)
        check_number("lr", self.lr, minimum=0, maximum=1e6)
        gpt = self.gpt()  # GPTConfig refuses d_model not divisible by n_heads
        if self.world_size % self.dp_size:
            raise ValueError(
                f"dp_size={self.dp_size} does not divide world_size="
                f"{self.world_size}: world_size = {self._other} x dp_size"
            )
        if self.batch_size % self.dp_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not divide into dp_size="
                f"{self.dp_size} equal shares"
            )
        if self.mode == "layers":
            self._check_layers()
        else:
            self._check_tensor(gpt)

    @property
    def _other(self) -> str:
        return "layer groups" if self.mode == "layers" else "tp_size"

    def _check_layers(self) -> None:
        for name, bad in (
            ("tp_size", self.tp_size > 1),
            ("sequence_parallel", self.sequence_parallel),
            ("tie_weights", self.tie_weights),
        ):
            if bad:
                raise ValueError(
                    f"{name}={getattr(self, name)} is for mode='tensor': in "
                    "mode='layers' each rank holds whole layers (the embedding on "
                    "the first, the head on the last, so they cannot be tied)"
                )
        if self.layer_groups > self.n_layers:
            raise ValueError(
                f"{self.layer_groups} layer groups (world_size={self.world_size} / "
                f"dp_size={self.dp_size}) but n_layers={self.n_layers}: every "
                "group needs at least one block"
            )

    def _check_tensor(self, gpt: GPTConfig) -> None:
        if self.tp_size and self.tp_size * self.dp_size != self.world_size:
            raise ValueError(
                f"dp_size={self.dp_size} x tp_size={self.tp_size} = "
                f"{self.dp_size * self.tp_size} != world_size={self.world_size}: "
                "give tp_size = world_size / dp_size, or 0"
            )
        check_tensor_parallel(gpt, self.tp, sequence_parallel=self.sequence_parallel)
        if self.impl == "torch" and self.tie_weights:
            raise ValueError(
                "impl='torch' needs tie_weights=False: parallelize_module gives "
                "the embedding and the head a new parameter each, so the tied "
                "pair would silently come apart"
            )

    @property
    def tp(self) -> int:
        """Tensor-parallel degree t: ``tp_size``, or world_size / dp_size (tensor
        mode); 1 in layers mode."""
        if self.mode == "layers":
            return 1
        return self.tp_size or self.world_size // self.dp_size

    @property
    def layer_groups(self) -> int:
        """Layers mode: ranks one model is cut across (world_size / dp_size); 1 in
        tensor mode."""
        return self.world_size // self.dp_size if self.mode == "layers" else 1

    @property
    def rows_per_rank(self) -> int:
        """Sequences each rank computes per step: batch_size / dp_size."""
        return self.batch_size // self.dp_size

    @property
    def bytes_per_element(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def gpt(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            tie_weights=self.tie_weights,
        )

    def estimate_bytes(self) -> int:
        """Per rank, unsplit (an upper bound): 16 B per parameter of model states
        and the fp32 activations of this rank's sequences (about 34 s h per layer,
        Korthikanti et al. 2022, plus the logits), twice over for temporaries."""
        g = self.gpt()
        params = 12 * g.n_layers * g.d_model**2 + (2 * g.vocab_size + g.seq_len) * (
            g.d_model
        )
        tokens = self.rows_per_rank * g.seq_len
        acts = tokens * (34 * g.d_model * g.n_layers + 8 * g.vocab_size)
        return 20 * params + 2 * 4 * acts


TINY = Config(steps=3, n_layers=2, d_model=32, seq_len=16, batch_size=4)
"""What tests and CI run: a second or two per configuration."""


@lab_data
class ModelParallelData:
    """What the model-parallel lab reports besides the common fields. "Last step"
    means the figures of the final step (all steps are alike)."""

    config: dict
    """The Config, as a dict."""
    implementation: str = ""
    """What split the model: the scratch function or class, or torch's API."""
    holds: list = field(default_factory=list)
    """Names of the model's modules this rank holds (whole or a shard), in order:
    "tok", "pos", "blocks.0", ..., "ln_f", "head"."""
    blocks: list = field(default_factory=list)
    """Indices of the transformer blocks this rank runs (all of them in tensor
    mode; its contiguous group in layers mode)."""
    shards: dict = field(default_factory=dict)
    """Per parameter this rank holds (full-model name): {"shape": local shape,
    "full_shape": the whole parameter's, "dim": the dimension cut into tp chunks
    or None when replicated, "index": this rank's chunk}."""
    timeline: list = field(default_factory=list)
    """Per step, measured intervals {"kind": "compute" | "wait" | "comm", "name",
    "start", "end"}, seconds from the step's start (all ranks start the step
    together after a barrier). Tensor mode: forward, loss, backward and step
    (compute, their collectives inside them), sync and dp (comm). Layers mode:
    forward, backward and step (compute), each blocking receive (wait) and send
    (comm), and dp; the rest of the step is idle."""
    comm_bytes_per_step: list = field(default_factory=list)
    """Bytes sent per step (as ``RankReport.comm_source`` says: modelled for
    collectives, counted for the layers mode's sends)."""
    wire_bytes_per_step: list = field(default_factory=list)
    """Bytes this rank's TCP sockets sent per step, counted (``utils.wire``)."""
    comm_by_phase: dict = field(default_factory=dict)
    """Last step: {phase: {kind: bytes}}, phases "forward" (the model; in layers
    mode the last group's loss too, and every activation sent), "loss" (tensor
    mode), "backward" (and every gradient sent), "sync" (the sequence-parallel
    sum of replicated gradients), "dp" (the data-parallel average), "step" (the
    optimizer: torch sums its Partial gradients there), "other" (outside every
    phase); kinds "all_reduce", "all_gather", "reduce_scatter", "send"."""
    calls_by_phase: dict = field(default_factory=dict)
    """Last step: {phase: {kind: number of calls}}, the same phases and kinds."""
    wire_by_phase: dict = field(default_factory=dict)
    """Last step: {phase: bytes counted on this rank's sockets}."""
    comm_sources: dict = field(default_factory=dict)
    """For each kind: "counted" (our sends) or "modelled" (collectives)."""
    block_wire_bytes: list = field(default_factory=list)
    """Last step, per block this rank runs: {"block": i, "forward": bytes,
    "backward": bytes} counted on the sockets while that block ran."""
    block_activation_bytes: list = field(default_factory=list)
    """Last step, per block this rank runs: activation bytes its forward left for
    the backward (the distinct storages autograd saved in it, parameters and its
    input left out, plus its output), measured (``BlockProbes``)."""
    activation_bytes: int = 0
    """Last step: activation bytes alive at the end of forward (after the loss),
    measured by the ledger."""
    state_bytes: dict = field(default_factory=dict)
    """After the last step, measured: {"params", "grads", "optimizer"} bytes."""
    predicted: dict = field(default_factory=dict)
    """The analytic model for this rank: {"params", "grads", "optimizer"} bytes,
    "activations_per_layer" (``activation_bytes_per_layer``), "activations_layers"
    (times the layers this rank runs), "activations" (plus what lives outside the
    layers: bytes at the end of forward), "comm_per_layer" (8 b s h (t-1)/t x
    element size, Narayanan et al. 2021, modelled)."""
    sharded_numel: int = 0
    """Parameters of the full model that tensor parallelism cuts into t shards."""
    replicated_numel: int = 0
    """Parameters of the full model every tensor-parallel rank holds whole."""
    bytes_per_element: int = 4
    """Bytes of one parameter or activation element (4 fp32, 2 bf16)."""
    params: dict | None = None
    """With ``return_params``: the final parameters (full-model name -> nested
    lists); tensor mode all of them (shards gathered), layers mode this rank's."""


IMPLEMENTATIONS = {
    ("tensor", "scratch"): "utils.model_parallel.apply_tensor_parallel",
    ("tensor", "torch"): "parallelize_module (ColwiseParallel, RowwiseParallel, "
    "SequenceParallel, PrepareModuleInput) + loss_parallel",
    ("layers", "scratch"): "utils.model_parallel.layer_split.LayerGroup",
    ("layers", "torch"): "torch.distributed.pipelining (PipelineStage, "
    "ScheduleGPipe, 1 micro-batch)",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def layout(cfg: Config) -> ParallelDims:
    """The rank layout: dp x tp (tensor mode) or dp x layer groups on "pp"."""
    return ParallelDims(
        dp=cfg.dp_size, tp=cfg.tp, pp=cfg.layer_groups, world_size=cfg.world_size
    )


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The single-process loss: mean cross-entropy over every token, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# [apply-tensor-start]
def apply_tensor(model: GPT, cfg: Config, pm, meter: CommMeter):
    """Tensor mode: the GPT split in place over this rank's tp group, and the loss
    that reads the vocabulary-split logits."""
    sp = cfg.sequence_parallel
    if cfg.impl == "scratch":
        group = pm.group("tp")
        apply_tensor_parallel(model, group, sequence_parallel=sp, meter=meter)

        def loss_fn(logits, targets):
            return vocab_parallel_cross_entropy(
                logits.float(), targets, group, meter=meter
            )

        return model, loss_fn
    torch_tp(model, pm.submesh("tp"), sequence_parallel=sp)
    return model, lambda logits, targets: parallel_cross_entropy(
        logits.float(), targets
    )


# [apply-tensor-end]


# [apply-layers-start]
def apply_layers(model: GPT, cfg: Config, pm, meter: CommMeter, phase):
    """Layers mode: this rank's contiguous group of the GPT's layers (embedding
    first, head last), as a module that sends and receives. Returns it and the
    group's (full-model name, parameter) pairs."""
    k, n = pm.coords["pp"], cfg.layer_groups
    mine = gpt_groups(model, n)[k]
    chain = pm.group_ranks("pp")  # global ranks of this replica's groups, in order
    shape = (cfg.rows_per_rank, cfg.seq_len, cfg.d_model)
    if cfg.impl == "scratch":
        group = LayerGroup(
            [m for _, m in mine],
            k,
            n,
            prev_rank=chain[k - 1] if k > 0 else None,
            next_rank=chain[k + 1] if k < n - 1 else None,
            recv_shape=shape,
            dtype=DTYPES[cfg.precision],
            loss_fn=cross_entropy,
            meter=meter,
            clock=phase,
        )
    else:
        group = TorchLayerGroup(
            [m for _, m in mine],
            k,
            n,
            pm.group("pp"),
            loss_fn=cross_entropy,
            meter=meter,
            clock=phase,
        )
    return group, dict(named_parameters(mine))


# [apply-layers-end]


# [train-step-start]
def train_step(model, loss_fn, opt, batch, cfg: Config, pm, phase, meter):
    """One optimizer step of this rank's part; returns its loss (None on a layer
    group that is not the last)."""
    x, y = batch
    if cfg.mode == "tensor":
        with phase("forward"):
            logits = model(x)  # this rank's vocabulary slice of them
        with phase("loss"):
            loss = loss_fn(logits, y)
            del logits  # the loss keeps what its backward needs
        torch_loss = cfg.impl == "torch"  # loss_parallel's backward is its own
        with phase("backward"), loss_parallel() if torch_loss else nullcontext():
            loss.backward()
        if cfg.sequence_parallel and cfg.impl == "scratch":
            with phase("sync", kind="comm"):  # replicated params saw s/t tokens
                sync_sequence_parallel_grads(model, pm.group("tp"), meter=meter)
    elif cfg.impl == "scratch":  # a LayerGroup: receive, compute, send, and back
        loss = model(x if model.is_first else None, y if model.is_last else None)
        model.backward()
    else:
        loss = model.run(x, y)
    if cfg.dp_size > 1:
        with phase("dp", kind="comm"):  # the replicas' gradients averaged
            average_gradients(model, pm.group("dp"), meter, cfg.impl == "scratch")
    with phase("step"):
        opt.step()
    return loss


# [train-step-end]


@torch.no_grad()
def average_gradients(model: nn.Module, group, meter, record: bool) -> None:
    """Average every gradient (a DTensor's local shard) over the dp ``group``: one
    all-reduce of them flattened together, recorded on ``meter`` if ``record``
    (torch's runs are recorded by the dispatch counter instead)."""
    grads = []
    for p in {id(p): p for p in model.parameters()}.values():
        if p.grad is not None:
            grads.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
    flat = _flatten_dense_tensors(grads)
    if record:
        meter.add("all_reduce", nbytes(flat), group, label="all_reduce.dp")
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for g, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(new)


# ------------------------------------------------------------ instrumentation
class Phases:
    """Each phase of a step timed (``utils.lab.PhaseClock``, with its memory mark)
    and the bytes sent in it filed under it: the meter's by collective, and the
    sockets' (counted) when ``wire``. A layer group's sends and waits are filed
    under "forward" or "backward"; what is recorded outside every phase (torch's
    pipelining sends) under the direction its label says."""

    ALIASES = {
        "recv activation": "forward",
        "send activation": "forward",
        "recv gradient": "backward",
        "send gradient": "backward",
    }

    def __init__(self, clock: lab.PhaseClock, meter: CommMeter, wire: bool):
        self.clock, self.meter, self.wire = clock, meter, wire
        self.new_step(None)

    def new_step(self, step) -> None:
        self.clock.new_step(step)
        self.filed: dict[str, dict[str, list[int]]] = defaultdict(dict)
        self.wire_bytes: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str, kind: str = "compute", mark: bool = True):
        where = self.ALIASES.get(name, name)
        before = {
            k: (self.meter.by_op[k], self.meter.calls[k]) for k in self.meter.by_op
        }
        wire = WireCounter().start() if self.wire else None
        with self.clock(name, kind=kind, mark=mark):
            yield
        if wire is not None:
            self.wire_bytes[where] += wire.stop() or 0
        for label in list(self.meter.by_op):
            b0, c0 = before.get(label, (0, 0))
            got = self.filed[where].setdefault(label, [0, 0])
            got[0] += self.meter.by_op[label] - b0
            got[1] += self.meter.calls[label] - c0

    def by_phase(self) -> tuple[dict, dict]:
        """This step's ({phase: {kind: bytes}}, {phase: {kind: calls}})."""
        filed = {p: dict(v) for p, v in self.filed.items()}
        for label in self.meter.by_op:  # recorded outside every phase
            done = [
                sum(v.get(label, [0, 0])[i] for v in filed.values()) for i in (0, 1)
            ]
            left = (
                self.meter.by_op[label] - done[0],
                self.meter.calls[label] - done[1],
            )
            if left[1]:
                suffix = label.partition(".")[2]
                where = {"fwd": "forward", "bwd": "backward"}.get(suffix, "other")
                got = filed.setdefault(where, {}).setdefault(label, [0, 0])
                got[0], got[1] = got[0] + left[0], got[1] + left[1]
        sizes: dict = defaultdict(lambda: defaultdict(int))
        calls: dict = defaultdict(lambda: defaultdict(int))
        for where, labels in filed.items():
            for label, (b, c) in labels.items():
                if c:
                    kind = label.partition(".")[0]
                    sizes[where][kind] += b
                    calls[where][kind] += c
        return (
            {p: dict(v) for p, v in sizes.items()},
            {p: dict(v) for p, v in calls.items()},
        )


class BlockProbes:
    """Per transformer block: the activation bytes its forward leaves for the
    backward, and the bytes its forward and its backward send (counted on the
    sockets).

    Activations: the distinct storages autograd saves while the block runs
    (``saved_tensors_hooks``; a DTensor counts its local shard), parameters and
    the block's input left out, plus its output (which stands for the next
    block's input). Why not the ledger's difference across the block: gloo's
    worker thread drops its reference to a collective's tensor a moment after
    the collective returns, so a buffer is now and then seen freed a block late.
    The backward of block i runs from the moment its output's gradient is ready
    to the moment its input's is.
    """

    def __init__(self, blocks: dict[int, nn.Module], params):
        self.on = False
        self.rows = {i: {"block": i} for i in blocks}
        self._params = {st.data_ptr() for p in params for st in _storages(p)}
        self._open: dict = {}
        for i, block in blocks.items():
            block.register_forward_pre_hook(partial(self._before, i))
            block.register_forward_hook(partial(self._after, i))

    def _before(self, i, module, args):
        if not self.on:
            return
        x = args[0]
        if x.requires_grad:
            x.register_hook(partial(self._backward_done, i))
        saved: dict[int, int] = {}
        skip = self._params | {st.data_ptr() for st in _storages(x)}

        def pack(t):
            for st in _storages(t):
                if st.data_ptr() not in skip:
                    saved[st.data_ptr()] = st.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        hooks.__enter__()
        self._open[("fwd", i)] = (saved, hooks, WireCounter().start())

    def _after(self, i, module, args, out):
        if not self.on:
            return
        saved, hooks, wire = self._open.pop(("fwd", i))
        hooks.__exit__(None, None, None)
        self.rows[i]["forward"] = wire.stop()
        for st in _storages(out):
            saved[st.data_ptr()] = st.nbytes()
        self.rows[i]["activations"] = sum(saved.values())
        if out.requires_grad:
            out.register_hook(partial(self._backward_starts, i))

    def _backward_starts(self, i, grad):
        self._open[("bwd", i)] = WireCounter().start()

    def _backward_done(self, i, grad):
        wire = self._open.pop(("bwd", i), None)
        self.rows[i]["backward"] = wire.stop() if wire is not None else None


def _storages(t: torch.Tensor):
    """The storages behind ``t``: its own, or a DTensor's local shard's."""
    if isinstance(t, DTensor):
        t = t._local_tensor  # not to_local(): no autograd op inside a pack hook
    return [t.untyped_storage()]


def shards_of(named: dict[str, torch.Tensor], cfg: Config, pm) -> dict:
    """{name: {"shape", "full_shape", "dim", "index"}} for this rank's parameters."""
    out = {}
    t, index = cfg.tp, pm.coords["tp"]
    for name, p in named.items():
        if isinstance(p, DTensor):
            local, full = tuple(p.to_local().shape), tuple(p.shape)
            dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
            dim = dims[0] if dims else None
        else:
            local = tuple(p.shape)
            dim = getattr(p, "tensor_parallel_dim", None)
            full = tuple(s * t if d == dim else s for d, s in enumerate(local))
        out[name] = {
            "shape": list(local),
            "full_shape": list(full),
            "dim": dim,
            "index": index if dim is not None else None,
        }
    return out


# ------------------------------------------------------------ the worker
def worker(cfg: Config) -> RankReport:
    """Runs in every rank: build, split, train ``cfg.steps`` steps, report."""
    cfg, rank, n, device = lab.join(cfg)
    pm = layout(cfg).build(device.type)
    dtype = DTYPES[cfg.precision]
    mem = MemoryTracker(device) if cfg.track_memory else None
    meter = CommMeter()
    phase = Phases(lab.PhaseClock(device, mem), meter, wire=cfg.probes)
    model = GPT(cfg.gpt(), seed=cfg.seed).to(device=device, dtype=dtype)
    num_params = count_params(model)
    if cfg.mode == "tensor":
        model, loss_fn = apply_tensor(model, cfg, pm, meter)
        named = dict(model.named_parameters())
        blocks = dict(enumerate(model.blocks))
    else:
        kept = model
        model, named = apply_layers(kept, cfg, pm, meter, phase)
        loss_fn = None
        rows = gpt_groups(kept, cfg.layer_groups)[pm.coords["pp"]]
        blocks = {int(p.split(".")[1]): m for p, m in rows if p.startswith("blocks")}
        del kept, rows
    probes = BlockProbes(blocks, model.parameters())
    opt = make_optimizer(model.parameters(), cfg)
    counter = TPCollectiveCounter(meter) if cfg.impl == "torch" else nullcontext()
    dp_rank = pm.coords["dp"]
    batches = [
        shard_batch(
            [
                t.to(device)
                for t in gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=s)
            ],
            dp_rank,
            cfg.dp_size,
        )
        for s in range(cfg.steps)
    ]
    if mem is not None:
        mem.watch(model, opt)
    losses, sent, wired, timeline, times = [], [], [], [], []
    with mem if mem is not None else nullcontext():
        if mem is not None:
            mem.mark("init")
        for step in progress(range(cfg.steps), rank=rank, total=cfg.steps):
            batch = batches.pop(0)
            opt.zero_grad()  # before the step: the ledger's "step" phase has grads
            meter.reset()
            phase.new_step(step)
            probes.on = cfg.probes and step == cfg.steps - 1
            dist.barrier()  # every rank starts the step together: one time axis
            wire = WireCounter().start()
            t0 = time.perf_counter()
            with counter:
                loss = train_step(model, loss_fn, opt, batch, cfg, pm, phase, meter)
            t1 = time.perf_counter()
            wired.append(wire.stop())
            sent.append(meter.total)
            losses.append(_value(loss))
            if loss is not None:
                lab.check_finite(losses[-1], step)
            events = phase.clock.events
            timeline.append(
                [{**e, "start": e["start"] - t0, "end": e["end"] - t0} for e in events]
            )
            times.append(_times(timeline[-1], t1 - t0))
            del loss, batch
    comm_by_phase, calls_by_phase = phase.by_phase()
    wire_by_phase = dict(phase.wire_bytes)
    if cfg.probes and wired[-1] is not None:
        wire_by_phase["other"] = wired[-1] - sum(wire_by_phase.values())
    mem_timeline = mem.timeline() if mem is not None else []
    end = "loss" if cfg.mode == "tensor" else "forward"
    fwd = [e for e in mem_timeline if e["phase"] == end]
    last = mem_timeline[-1]["current"] if mem_timeline else {}
    params = None
    if cfg.return_params:
        params = {
            k: v.float().cpu().tolist()
            for k, v in gathered(model, cfg, pm, named).items()
        }
    later = times[1:] or times
    return lab.rank_report(
        cfg,
        num_params=num_params,
        coords=pm.coords,
        losses=global_losses(losses, cfg),
        memory=mem_timeline,
        comm_bytes=sent[-1],
        comm_source=meter.kind,
        wire_bytes=wired[-1],
        timings={k: statistics.median(t[k] for t in later) for k in later[0]},
        extra=ModelParallelData(
            config=asdict(cfg),
            implementation=IMPLEMENTATIONS[cfg.mode, cfg.impl],
            holds=holds(named),
            blocks=sorted(blocks),
            shards=shards_of(named, cfg, pm),
            timeline=timeline,
            comm_bytes_per_step=sent,
            wire_bytes_per_step=wired,
            comm_by_phase=comm_by_phase,
            calls_by_phase=calls_by_phase,
            wire_by_phase=wire_by_phase,
            comm_sources={k.partition(".")[0]: v for k, v in meter.source.items()},
            block_wire_bytes=[
                {k: probes.rows[i][k] for k in ("block", "forward", "backward")}
                for i in sorted(blocks)
            ]
            if cfg.probes
            else [],
            block_activation_bytes=[
                probes.rows[i]["activations"] for i in sorted(blocks)
            ]
            if cfg.probes
            else [],
            activation_bytes=fwd[-1]["current"]["activations"] if fwd else 0,
            state_bytes={k: last.get(k, 0) for k in ("params", "grads", "optimizer")},
            predicted=predicted(cfg, pm.coords, device),
            sharded_numel=param_split(cfg.gpt())[0],
            replicated_numel=param_split(cfg.gpt())[1],
            bytes_per_element=cfg.bytes_per_element,
            params=params,
        ),
    )


def _value(loss) -> float:
    if loss is None:
        return 0.0
    if isinstance(loss, DTensor):
        loss = loss.to_local()
    return float(loss.detach())


def _times(events: list[dict], step: float) -> dict[str, float]:
    """Seconds: the step, its compute (forward, backward, optimizer step), its
    collectives outside compute (sync, dp), its sends, and the rest: idle (waits
    in receives, or nothing to do)."""
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[e["kind"]] += e["end"] - e["start"]
    compute, comm = by_kind["compute"], by_kind["comm"]
    return {
        "step": step,
        "compute": compute,
        "comm": comm,
        "idle": step - compute - comm,
    }


def global_losses(local: list[float], cfg: Config) -> list[float]:
    """The global-batch loss per step: the mean over the dp replicas. In tensor
    mode every rank of a replica holds it; in layers mode only its last group."""
    values = lab.global_losses(local)  # the mean over all ranks
    scale = cfg.layer_groups  # layers: the others contributed 0
    return [v * scale for v in values]


def holds(named: dict) -> list[str]:
    """The model's modules these parameters belong to, in model order."""
    out: list[str] = []
    for name in named:
        parts = name.split(".")
        module = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        if module not in out:
            out.append(module)
    return out


def gathered(model, cfg: Config, pm, named) -> dict[str, torch.Tensor]:
    """This rank's final parameters whole (tensor mode: shards gathered over the tp
    group, every rank must call it), by full-model name."""
    if cfg.mode == "layers":
        return {k: p.detach().clone() for k, p in named.items()}
    if cfg.impl == "torch":
        return full_state(model)
    return full_parameters(model, pm.group("tp"))


# ------------------------------------------------------------ the analytic model
def param_split(g: GPTConfig) -> tuple[int, int]:
    """(sharded, replicated) parameters of the course GPT under Megatron-LM's cut
    (Shoeybi et al. 2019, sec. 3). Per block of hidden size h: q, k, v and fc
    (weights and biases) and the two row layers' weights are cut, 12 h^2 + 7 h;
    the two layer norms and the two row biases stay whole, 6 h. The embedding and
    the head (v h each, one matrix when tied) are cut along the vocabulary; the
    positions (s h) and the final norm (2 h) stay whole."""
    h, L = g.d_model, g.n_layers
    sharded = L * (12 * h * h + 7 * h) + g.vocab_size * h * (1 if g.tie_weights else 2)
    replicated = L * 6 * h + g.seq_len * h + 2 * h
    return sharded, replicated


def held_numel(cfg: Config, coords: dict) -> tuple[int, int]:
    """(parameters, parameter tensors) this rank holds: 1/t of the sharded ones
    plus the replicated ones (tensor mode), or its group's layers (layers mode:
    the embedding v h + s h, each block 12 h^2 + 13 h, the head 2 h + v h)."""
    g = cfg.gpt()
    h, v, s = g.d_model, g.vocab_size, g.seq_len
    if cfg.mode == "tensor":
        sharded, replicated = param_split(g)
        tensors = 2 + 16 * g.n_layers + 3 - (1 if g.tie_weights else 0)
        return sharded // cfg.tp + replicated, tensors
    k, n = coords["pp"], cfg.layer_groups
    blocks = len(split_layers(g.n_layers, n)[k])
    numel, tensors = blocks * (12 * h * h + 13 * h), 16 * blocks
    if k == 0:
        numel, tensors = numel + v * h + s * h, tensors + 2
    if k == n - 1:
        numel, tensors = numel + 2 * h + v * h, tensors + 3
    return numel, tensors


def activation_bytes_per_layer(cfg: Config) -> int:
    """Activation bytes one transformer layer leaves for its backward on one rank,
    at the end of forward: ``utils.memory_model.course_gpt_activation_bytes`` (the
    paper's Table 2 adapted to the course GPT; its docstring derives it) for this
    rank's ``b`` sequences (batch_size / dp_size) at the lab's dtype; t is 1 in
    layers mode."""
    return course_gpt_activation_bytes(
        cfg.seq_len, cfg.rows_per_rank, cfg.d_model, cfg.n_heads,
        tp_size=cfg.tp, sequence_parallel=cfg.sequence_parallel,
        bytes_per_element=cfg.bytes_per_element,
    )  # fmt: skip


def predicted(cfg: Config, coords: dict, device) -> dict:
    """The analytic model of this rank (see ``ModelParallelData.predicted``)."""
    numel, tensors = held_numel(cfg, coords)
    e = cfg.bytes_per_element
    # AdamW: exp_avg and exp_avg_sq in the parameters' dtype, and one fp32 "step"
    # tensor per parameter, kept on the CPU (torch/optim/adamw.py, capturable=False);
    # plain SGD keeps nothing
    steps = 4 * tensors if torch.device(device).type == "cpu" else 0
    states = 2 if cfg.optimizer == "adamw" else 0
    if cfg.mode == "tensor":
        layers = cfg.n_layers
    else:
        layers = len(split_layers(cfg.n_layers, cfg.layer_groups)[coords["pp"]])
    per_layer = activation_bytes_per_layer(cfg)
    s, b, h, t, v = cfg.seq_len, cfg.rows_per_rank, cfg.d_model, cfg.tp, cfg.vocab_size
    last = cfg.mode == "tensor" or coords["pp"] == cfg.layer_groups - 1
    outside = course_gpt_outside_bytes(
        s, b, h, v, first=coords["pp"] == 0, last=last, tp_size=t,
        sequence_parallel=cfg.sequence_parallel, bytes_per_element=e,
    )  # fmt: skip
    return {
        "params": e * numel,
        "grads": e * numel,
        "optimizer": states * e * numel + (steps if states else 0),
        "activations_per_layer": per_layer,
        "activations_layers": layers * per_layer,
        "activations": layers * per_layer + outside,
        # Narayanan et al. 2021, sec. 3.2: per layer per micro-batch, 2 all-reduces
        # forward and 2 backward of b s h elements, each 2 (t-1)/t of it per rank
        "comm_per_layer": 8 * b * s * h * (t - 1) // t * e,
    }


# ------------------------------------------------------------ one process, and runs
def reference(cfg: Config) -> dict:
    """The same training in this process, unsplit: the GPT on the whole global
    batch (the mean over the dp replicas' equal shares is the whole batch's mean)
    with the same optimizer. {"losses": [...], "params": {name: tensor}}: what
    the lab's runs must equal."""
    dtype = DTYPES[cfg.precision]
    model = GPT(cfg.gpt(), seed=cfg.seed).to(dtype=dtype)
    opt = make_optimizer(model.parameters(), cfg)
    losses = []
    for step in range(cfg.steps):
        x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
        opt.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return {"losses": losses, "params": params}


def run(cfg: Config) -> list[RankReport]:
    """Start ``cfg.world_size`` ranks (or join torchrun's) and collect reports."""
    _check_p2p([cfg])
    return lab.run(worker, cfg, timeout=120.0)


def _check_p2p(cfgs: list[Config]) -> None:
    """torch's layer split sends CUDA tensors through pipelining: not over gloo."""
    if any((c.mode, c.impl) == ("layers", "torch") for c in cfgs):
        what = "mode='layers' impl='torch' (torch.distributed.pipelining)"
        check_cuda_p2p(cfgs[0].backend, cfgs[0].world_size, what)


def run_many(cfgs: list[Config]) -> list[list[RankReport]]:
    """Several configurations (same world size) in one launch: rank reports each."""
    _check_p2p(cfgs)
    return lab.run_many(worker, cfgs)


def main(argv=None) -> None:
    run_from_cli(Config, run, argv)


if __name__ == "__main__":
    main()
