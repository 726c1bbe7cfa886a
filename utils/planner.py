"""The planner: a layout (dp x tp x pp, ZeRO, recompute, offload) -> memory per rank,
communication per axis, the pipeline bubble and an estimated step time.

Shared by the explorers of every chapter and by the combining chapter, which checks
it against measured runs. Everything here is *modelled*: formulas from the papers,
each cited where it is used, applied to a :class:`ModelSpec` and a
:class:`~utils.hardware.Cluster`. Nothing is measured; a figure drawn from this
module is labelled modelled.

    from utils.planner import ModelSpec, estimate, search, PRESETS
    from utils.hardware import CLUSTERS
    gpt3 = PRESETS["GPT-3 175B"]
    e = estimate(gpt3, dp=8, tp=8, pp=16, zero_stage=1, micro_batch=1,
                 micro_batches=64, recompute="selective")
    e.device["total"], e.fits(80e9), e.bubble, e.comm
    best = search(gpt3, CLUSTERS["DGX A100 x 128"], global_batch=1536)[:5]

Conventions, stated once:

* model states follow a bytes-per-parameter convention of
  ``utils.memory_model.BYTES_PER_PARAM_CONVENTIONS`` ("mixed-16", the ZeRO
  paper's 2 + 2 + 12, by default); ZeRO shards them over the data-parallel ranks
  only, the way ``convention_state_bytes`` does;
* activations are Korthikanti et al.'s (2022) accounting, Table 2: 16-bit
  activations and 1-byte dropout masks per transformer layer
  (``utils.memory_model.transformer_activation_bytes``); the embeddings' and the
  output layer's activations are left out, as that table leaves them out;
* "per rank" is the worst pipeline stage: the one with the most bytes on the
  device (with 1F1B the first stage, which holds the most micro-batches in flight
  and the embedding);
* bytes on the wire are what a bandwidth-optimal algorithm sends per rank
  (nccl-tests' bus factors, ``utils.comm.bus_factor``), in 16-bit elements.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

from utils.checks import check_bool, check_choice, check_int
from utils.comm import bus_factor
from utils.hardware import Cluster
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    convention_state_bytes,
    course_gpt_activation_bytes,
    course_gpt_outside_bytes,
    transformer_activation_bytes,
)
from utils.models import split_layers

__all__ = [
    "ACTIVATION_MODELS",
    "OFFLOADS",
    "PRESETS",
    "RECOMPUTES",
    "SCHEDULES",
    "Estimate",
    "LayoutError",
    "ModelSpec",
    "bubble_fraction",
    "estimate",
    "narayanan_eq2",
    "search",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb1p")
RECOMPUTES = ("none", "selective", "full")
OFFLOADS = ("none", "optimizer", "optimizer+grads", "params")
ACTIVATION_MODELS = ("korthikanti-16", "course-fp32")
"""How activations are counted: Korthikanti et al. 2022, Table 2 (16-bit, 1-byte
dropout masks, the blocks only), or the course GPT as its CPU labs run it (fp32,
no dropout, fused attention, and the embedding's output, the final norm's output
and the loss's softmax: ``utils.memory_model.course_gpt_activation_bytes`` and
``course_gpt_outside_bytes``)."""
ACTIVATION_BYTES = 2
"""Bytes of an activation or a gradient element on the wire (16-bit training)."""


class LayoutError(ValueError):
    """A layout that cannot run this model (the message says which value and why)."""


# ------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, enough to count its parameters.

    Defaults describe a GPT-2/GPT-3/Megatron-LM GPT: learned positions, biases in
    every linear layer, LayerNorm (weight and bias), a 4h GeLU MLP and the output
    layer tied to the token embedding. A LLaMA-style model sets ``gated_mlp`` (SwiGLU:
    three h x ffn matrices), ``kv_heads`` (grouped-query attention), ``biases=False``,
    ``norm="rms"`` (a weight only), ``learned_positions=False`` (rotary) and
    ``tied=False``.
    """

    layers: int
    hidden: int
    heads: int
    seq_len: int
    vocab: int
    ffn: int | None = None
    """MLP inner width; None: 4 x hidden."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None: as many as ``heads``."""
    gated_mlp: bool = False
    tied: bool = True
    learned_positions: bool = True
    biases: bool = True
    norm: str = "layer"
    """"layer" (LayerNorm: 2h parameters) or "rms" (RMSNorm: h)."""
    final_norm: bool = True
    """A norm after the last block (GPT-2's ``ln_f``). Narayanan et al.'s eq. 2
    leaves it out: :func:`narayanan_eq2` is ``num_params()`` of the same model
    without it."""
    name: str = "custom"

    def __post_init__(self):
        for key in ("layers", "hidden", "heads", "seq_len", "vocab"):
            check_int(f"ModelSpec.{key}", getattr(self, key), minimum=1)
        if self.ffn is not None:
            check_int("ModelSpec.ffn", self.ffn, minimum=1)
        if self.kv_heads is not None:
            check_int("ModelSpec.kv_heads", self.kv_heads, minimum=1)
            if self.heads % self.kv_heads:
                raise ValueError(
                    f"ModelSpec.kv_heads={self.kv_heads} must divide heads={self.heads}"
                )
        for key in ("gated_mlp", "tied", "learned_positions", "biases", "final_norm"):
            check_bool(f"ModelSpec.{key}", getattr(self, key))
        check_choice("ModelSpec.norm", self.norm, ("layer", "rms"))
        if self.hidden % self.heads:
            raise ValueError(
                f"ModelSpec.hidden={self.hidden} must divide by heads={self.heads}"
            )

    # the pieces, each (sharded by tensor parallelism, replicated) -----------------
    @property
    def ffn_size(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.hidden

    @property
    def kv_size(self) -> int:
        kv = self.kv_heads if self.kv_heads is not None else self.heads
        return kv * (self.hidden // self.heads)

    def _norm(self) -> int:
        return (2 if self.norm == "layer" else 1) * self.hidden

    def layer_params_split(self) -> tuple[int, int]:
        """(split by tensor parallelism, replicated on every tp rank) of one block.

        Megatron-LM's split (Shoeybi et al. 2019, section 3): the q, k, v and first
        MLP matrices by columns, with their biases; the attention output and second
        MLP matrices by rows, whose biases (added after the all-reduce) and the two
        norms stay whole on every rank."""
        h, f, kv, bias = self.hidden, self.ffn_size, self.kv_size, self.biases
        qkv = h * (h + 2 * kv) + bias * (h + 2 * kv)
        fc = (2 if self.gated_mlp else 1) * (h * f + bias * f)
        split = qkv + h * h + fc + f * h
        replicated = bias * 2 * h + 2 * self._norm()
        return split, replicated

    def layer_params(self) -> int:
        return sum(self.layer_params_split())

    def embedding_params(self) -> int:
        """Token embedding (split by tp along the vocabulary) and learned positions."""
        return self.vocab * self.hidden + self.learned_positions * (
            self.seq_len * self.hidden
        )

    def head_params(self) -> int:
        """The output layer's own parameters (none when tied) and the final norm."""
        return (not self.tied) * self.vocab * self.hidden + self.final_norm * (
            self._norm()
        )

    def num_params(self) -> int:
        """Every parameter once (a tied weight counted once)."""
        return (
            self.embedding_params()
            + self.layers * self.layer_params()
            + self.head_params()
        )


def narayanan_eq2(layers: int, hidden: int, vocab: int, seq_len: int) -> int:
    """Narayanan et al. 2021, eq. 2 (section 5.1), multiplied out:
    P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12lh)) = 12lh^2 + 13lh + (V + s)h.
    A GPT with learned positions, biases, LayerNorm, a 4h MLP and tied embeddings,
    without the final layer norm."""
    return 12 * layers * hidden**2 + 13 * layers * hidden + (vocab + seq_len) * hidden


PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1
        # (n_layers 96, d_model 12288, n_heads 96, n_ctx 2048); GPT-2's BPE
        # vocabulary of 50,257 tokens (Radford et al. 2019, section 2.2).
        ModelSpec(96, 12288, 96, 2048, 50257, name="GPT-3 175B"),
        # Narayanan et al. 2021, Table 1, first and last rows (vocabulary 51,200,
        # sequence 2048, section 5.1).
        ModelSpec(24, 2304, 24, 2048, 51200, name="GPT 1.7B (Narayanan)"),
        ModelSpec(128, 25600, 160, 2048, 51200, name="GPT 1T (Narayanan)"),
        # Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3: layers,
        # model dimension, FFN dimension, heads, key/value heads); vocabulary
        # 128,256 and untied embeddings as in the released config.json.
        ModelSpec(
            32,
            4096,
            32,
            8192,
            128256,
            ffn=14336,
            kv_heads=8,
            gated_mlp=True,
            tied=False,
            learned_positions=False,
            biases=False,
            norm="rms",
            name="Llama 3 8B",
        ),  # fmt: skip
        ModelSpec(
            80,
            8192,
            64,
            8192,
            128256,
            ffn=28672,
            kv_heads=8,
            gated_mlp=True,
            tied=False,
            learned_positions=False,
            biases=False,
            norm="rms",
            name="Llama 3 70B",
        ),  # fmt: skip
    )
}
"""Open model shapes, each from its paper (see the comments)."""


# ----------------------------------------------------------------------- the bubble
def bubble_fraction(schedule: str, pp: int, micro_batches: int, v: int = 1) -> float:
    """The pipeline's idle fraction of the step, forward, backward and (ZB-H1) weight
    gradient passes taking equal time, communication free.

    * GPipe and 1F1B: (p - 1) / (m + p - 1) (Huang et al. 2019; Narayanan et al.
      2021, section 2.2.1, whose (p - 1)/m is the same idle time over the ideal
      time instead of the step);
    * interleaved with v chunks per rank: (p - 1) / (v m + p - 1) (Narayanan et
      al. 2021, section 2.2.2: (1/v)(p - 1)/m of the ideal time);
    * ZB-H1: idle (p - 1)(T_F + T_B - T_W) against busy m (T_F + T_B + T_W)
      (Qi et al. 2024, section 2.1), with equal times (p - 1) / (3m + p - 1).
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_int("pp", pp, minimum=1)
    check_int("micro_batches", micro_batches, minimum=1)
    check_int("v", v, minimum=1)
    p, m = pp, micro_batches
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb1p":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


# -------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """What :func:`estimate` returns (all modelled). Bytes are per rank."""

    layout: dict
    """The arguments it was given."""
    stage_layers: list[int]
    """Transformer blocks on each pipeline stage."""
    worst_stage: int
    """The stage whose device bytes are the figures below."""
    params_per_rank: int
    """Parameters of this rank before ZeRO shards them (its tp slice of its stage)."""
    device: dict[str, int]
    """Device bytes by category: params, grads, optimizer, activations, total."""
    host: dict[str, int]
    """Host (CPU) bytes by category, from offloading."""
    comm: dict[str, int]
    """Bytes each rank sends per step per axis: "tp", "pp", "dp", and "offload"
    (host <-> device, both directions)."""
    bubble: float
    """Pipeline idle fraction of the step (:func:`bubble_fraction`)."""
    in_flight: int
    """Micro-batches whose activations the worst stage holds at its peak."""
    convention: str
    notes: list[str] = field(default_factory=list)
    step_time: dict[str, float] | None = None
    """With a cluster: seconds of compute, of each axis' communication and in all."""
    stages: list[dict] = field(default_factory=list)
    """Every pipeline stage, first to last: {"stage", "layers", "params" (its
    parameters on one tp rank, before ZeRO), "in_flight", "device": {...},
    "host": {...}}: what ``device``/``host`` above are for the worst one. The
    combining chapter compares each with the measured rank at that stage."""

    def fits(self, device_bytes: float) -> bool:
        return self.device["total"] <= device_bytes


def _check_layout(model, dp, tp, pp, micro_batch, micro_batches, v, schedule):
    for name, value in (
        ("dp", dp),
        ("tp", tp),
        ("pp", pp),
        ("micro_batch", micro_batch),
        ("micro_batches", micro_batches),
        ("virtual_stages", v),
    ):
        check_int(name, value, minimum=1)
    check_choice("schedule", schedule, SCHEDULES)
    if model.heads % tp:
        raise LayoutError(f"tp={tp} must divide the {model.heads} attention heads")
    kv = model.kv_heads or model.heads
    if kv % tp:
        raise LayoutError(f"tp={tp} must divide the {kv} key/value heads")
    if model.ffn_size % tp:
        raise LayoutError(f"tp={tp} must divide the MLP width {model.ffn_size}")
    if pp * v > model.layers:
        raise LayoutError(
            f"pp x virtual_stages = {pp * v} stages for {model.layers} layers: "
            "at most one stage per layer"
        )
    if v > 1 and schedule != "interleaved":
        raise LayoutError(
            f"virtual_stages={v} needs schedule='interleaved', got {schedule!r}"
        )
    if schedule == "interleaved" and micro_batches % pp:
        raise LayoutError(
            f"the interleaved schedule needs micro_batches ({micro_batches}) to be "
            f"a multiple of pp ({pp}) (Narayanan et al. 2021, section 2.2.2)"
        )


def _in_flight(schedule: str, pp: int, stage: int, m: int, v: int) -> Fraction:
    """Micro-batches of a stage's activations alive at its peak, in units of one
    micro-batch through all the stage's layers.

    GPipe stashes all m; 1F1B and ZB-H1 at most p - stage (Narayanan et al. 2021,
    section 2.2.1; the first stage holds p, so p micro-batches of L/p layers: the
    activations of the whole model's L layers, Korthikanti et al. 2022, section
    4.2.3); interleaved 1F1B holds its warm-up's chunk-micro-batches plus the one in
    flight, 2(p - stage - 1) + (v - 1) p + 1 chunks of L/(p v) layers (Megatron-LM's
    ``num_warmup_microbatches`` in ``get_pp_rank_microbatches``,
    ``megatron/core/pipeline_parallel/schedules.py``, with its default micro-batch
    group of p), so
    (v p + p - 1) / v at the first stage: p times 1 + (p - 1)/(p v), the factor
    Megatron-LM's own estimator applies to that stage
    (``interleaved_schedule_memory_penalty`` in
    ``megatron/training/theoretical_memory_usage.py``). Never more than m."""
    if schedule == "gpipe":
        return Fraction(m)
    if schedule == "interleaved":
        chunks = 2 * (pp - stage - 1) + (v - 1) * pp + 1
        return Fraction(min(m * v, chunks), v)
    return Fraction(min(m, pp - stage))


def estimate(
    model: ModelSpec,
    *,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    zero_stage: int = 0,
    micro_batch: int = 1,
    micro_batches: int = 1,
    virtual_stages: int = 1,
    schedule: str = "1f1b",
    sequence_parallel: bool = False,
    recompute: str = "none",
    offload: str = "none",
    convention: str = "mixed-16",
    activations: str = "korthikanti-16",
    cluster: Cluster | None = None,
) -> Estimate:
    """Memory, communication and bubble of one layout, per rank (all modelled).

    Model states: the stage's parameters on this tp rank (``ModelSpec``'s split;
    the first stage also holds the vocabulary-parallel embedding, 1/tp of it, and
    the learned positions whole; the last the output layer, and with pp > 1 and
    tied embeddings a copy of the embedding, as Megatron-LM keeps one on the last
    stage), at the convention's bytes per parameter, ZeRO ``zero_stage`` sharding
    them over the ``dp`` ranks (Rajbhandari et al. 2020, section 5).

    Offload (Ren et al. 2021, "ZeRO-Offload", section 4): "optimizer" moves the
    optimizer states (master weights included) to the host; "optimizer+grads" also
    the gradients (device keeps the 16-bit parameters: 2 of the 16 bytes, host 14);
    "params" (ZeRO-Infinity style, needs ZeRO-3) also the parameter shards, the
    device holding two layers' gathered 16-bit parameters (one computing, one
    prefetched).

    Activations: Korthikanti et al. 2022, Table 2, for the stage's layers times the
    micro-batches in flight (:func:`_in_flight`); with ZeRO-3 the device also
    holds two layers' gathered parameters (FSDP's unit in use and the prefetched
    one), counted under "params".

    Communication per step, per rank (bandwidth-optimal collectives, 16-bit):
    tp: 8 b s h (t-1)/t elements per layer per micro-batch (Narayanan et al. 2021,
    section 3.2: two all-reduces forward, two backward; full recompute repeats the
    forward's two: 12); with sequence parallelism the same volume as all-gathers
    and reduce-scatters (Korthikanti et al., section 4.2.2). pp: what the stage
    sends, b s h per micro-batch: its activation to the next stage and its input's
    gradient to the previous one, v times with interleaving (section 2.2.2),
    divided by t with the scatter/gather optimisation when tp > 1 (section 4.1).
    dp: the gradients' all-reduce, 2 (d-1)/d of the stage's gradient elements;
    ZeRO-1 the same as a reduce-scatter plus an all-gather; ZeRO-2 (m + 1)
    (d-1)/d, as each of the m backward passes reduce-scatters the gradients it
    made (they are not kept whole: that is the point) before one all-gather of
    the parameters (DeepSpeed's pipeline engine refuses ZeRO-2 for this cost);
    ZeRO-3 3 m (d-1)/d: two all-gathers of the parameters (forward, backward) and
    one reduce-scatter per micro-batch. offload: each step's gradients to
    the host and parameters back, 2 + 2 bytes per parameter of the rank's shard.
    """
    v = virtual_stages
    _check_layout(model, dp, tp, pp, micro_batch, micro_batches, v, schedule)
    check_int("zero_stage", zero_stage, minimum=0, maximum=3)
    check_bool("sequence_parallel", sequence_parallel)
    check_choice("recompute", recompute, RECOMPUTES)
    check_choice("offload", offload, OFFLOADS)
    check_choice("convention", convention, tuple(BYTES_PER_PARAM_CONVENTIONS))
    check_choice("activations", activations, ACTIVATION_MODELS)
    if activations == "course-fp32" and recompute != "none":
        raise LayoutError(
            "activations='course-fp32' counts the course GPT without recomputation;"
            f" got recompute={recompute!r}"
        )
    if offload == "params" and zero_stage != 3:
        raise LayoutError("offload='params' keeps parameter shards on the host: "
                          f"it needs zero_stage=3, got {zero_stage}")  # fmt: skip
    conv = BYTES_PER_PARAM_CONVENTIONS[convention]
    split, replicated = model.layer_params_split()
    per_layer = -(-split // tp) + replicated
    emb_split = -(-(model.vocab * model.hidden) // tp)
    positions = model.learned_positions * model.seq_len * model.hidden
    head_own = (not model.tied) * emb_split + model.final_norm * model._norm()
    layers = [len(r) for r in split_layers(model.layers, pp, what="stage")]
    s, b, h, m = model.seq_len, micro_batch, model.hidden, micro_batches
    param16 = next(c.bytes_per_param for c in conv.components if c.category == "params")

    best, per_stage = None, []
    for stage, n_layers in enumerate(layers):
        params = n_layers * per_layer
        if stage == 0:
            params += emb_split + positions
        if stage == pp - 1:
            params += head_own + (pp > 1 and model.tied) * emb_split
        states = convention_state_bytes(
            conv, params, world_size=dp, zero_stage=zero_stage
        ).as_dict()
        host = {"params": 0, "grads": 0, "optimizer": 0}
        gathered = 0
        if zero_stage == 3:  # two layers' full 16-bit parameters, gathered
            gathered = min(2, n_layers) * per_layer * param16
        if offload in ("optimizer", "optimizer+grads", "params"):
            host["optimizer"], states["optimizer"] = states["optimizer"], 0
        if offload in ("optimizer+grads", "params"):
            host["grads"], states["grads"] = states["grads"], 0
        if offload == "params":
            host["params"], states["params"] = states["params"], 0
        flight = _in_flight(schedule, pp, stage, m, v)
        if activations == "course-fp32":
            tps = dict(tp_size=tp, sequence_parallel=sequence_parallel)
            per_mb = course_gpt_activation_bytes(
                s, b, h, model.heads, n_layers, **tps
            ) + course_gpt_outside_bytes(
                s, b, h, model.vocab, first=stage == 0, last=stage == pp - 1, **tps
            )
        else:
            per_mb = transformer_activation_bytes(
                s, b, h, model.heads, n_layers, tp_size=tp,
                sequence_parallel=sequence_parallel, recompute=recompute,
            )  # fmt: skip
        acts = math.ceil(per_mb * flight)
        device = {**states, "activations": acts}
        device["params"] += gathered
        device["total"] = sum(device.values())
        host["total"] = sum(host.values())
        per_stage.append(dict(
            stage=stage, layers=n_layers, params=params,
            in_flight=math.ceil(flight), device=device, host=host,
        ))  # fmt: skip
        if best is None or device["total"] > best[1]["total"]:
            best = (stage, device, host, params, flight)
    stage, device, host, params, flight = best

    tp_factor = 12 if recompute == "full" else 8
    tp_bytes = tp_factor * b * s * h * (tp - 1) // tp * layers[stage] * m
    boundaries = (stage > 0) + (stage < pp - 1)
    pp_elems = boundaries * b * s * h * m * v
    if tp > 1:
        pp_elems //= tp  # Narayanan et al. section 4.1, scatter/gather
    grad_elems = params
    dp_factor = {2: m + 1, 3: 3 * m}.get(zero_stage, 2)
    dp_bytes = dp_factor * bus_factor("all_gather", dp) * grad_elems * ACTIVATION_BYTES
    shard = -(-params // dp) if zero_stage >= 2 else params
    offload_bytes = 4 * shard if offload != "none" else 0
    comm = {
        "tp": int(tp_bytes * ACTIVATION_BYTES),
        "pp": int(pp_elems * ACTIVATION_BYTES),
        "dp": int(dp_bytes),
        "offload": int(offload_bytes),
    }
    notes = [
        f"model states at {conv.label}",
        "activations: Korthikanti et al. 2022 Table 2 (16-bit, 1-byte masks), "
        "embedding and output activations left out"
        if activations == "korthikanti-16"
        else "activations: the course GPT in fp32 (course_gpt_activation_bytes), "
        "with the stage's input and the last stage's norm output and softmax",
    ]
    layout = dict(
        dp=dp, tp=tp, pp=pp, zero_stage=zero_stage, micro_batch=micro_batch,
        micro_batches=micro_batches, virtual_stages=v, schedule=schedule,
        sequence_parallel=sequence_parallel, recompute=recompute, offload=offload,
    )  # fmt: skip
    if activations != "korthikanti-16":
        layout["activations"] = activations
    est = Estimate(
        layout=layout,
        stage_layers=layers,
        worst_stage=stage,
        params_per_rank=params,
        device=device,
        host=host,
        comm=comm,
        bubble=bubble_fraction(schedule, pp, m, v),
        in_flight=math.ceil(flight),
        convention=convention,
        notes=notes,
        stages=per_stage,
    )
    if cluster is not None:
        est.step_time = step_time(model, est, cluster)
    return est


def step_time(model: ModelSpec, est: Estimate, cluster: Cluster) -> dict[str, float]:
    """Seconds per step, modelled: compute and the communication no overlap hides.

    Compute: 6 x parameters x tokens FLOPs for forward and backward (Kaplan et al.
    2020, section 2.1; Narayanan et al. 2021, section 5.1 gives the full count with
    attention, which this leaves out), 8 x with full recomputation, spread over all
    GPUs at ``cluster.mfu`` of peak, stretched by 1 / (1 - bubble). Communication:
    each axis over the links inside a node when its groups fit in one, across nodes
    otherwise, with ranks in ``ParallelDims`` order (tp fastest, then dp, then pp: a
    tp group spans tp consecutive ranks, a dp group tp x dp, a pp group all of them;
    ``utils.combined.figures.link_rows`` counts the same from the groups). Nothing is
    hidden behind compute: every axis's bytes count whole (no overlap is modelled).
    """
    lay = est.layout
    gpus = lay["dp"] * lay["tp"] * lay["pp"]
    tokens = lay["dp"] * lay["micro_batch"] * lay["micro_batches"] * model.seq_len
    flops = (8 if lay["recompute"] == "full" else 6) * model.num_params() * tokens
    compute = flops / (gpus * cluster.peak_flops * cluster.mfu)
    compute /= 1 - est.bubble
    intra, inter = cluster.intra_node_bytes_per_s, cluster.inter_node_bytes_per_s
    tp_link = intra if lay["tp"] <= cluster.gpus_per_node else inter
    dp_link = intra if lay["tp"] * lay["dp"] <= cluster.gpus_per_node else inter
    pp_link = intra if gpus <= cluster.gpus_per_node else inter
    out = {
        "compute": compute,
        "tp": est.comm["tp"] / tp_link,
        "pp": est.comm["pp"] / pp_link,
        "dp": est.comm["dp"] / dp_link,
        "offload": est.comm["offload"] / cluster.host_bytes_per_s,
    }
    out["total"] = sum(out.values())
    return out


def search(
    model: ModelSpec,
    cluster: Cluster,
    *,
    global_batch: int,
    micro_batch_sizes=(1, 2, 4),
    zero_stages=(0, 1, 2, 3),
    recomputes=RECOMPUTES,
    offloads=("none",),
    schedules=("1f1b",),
    sequence_parallel=(False, True),
    convention: str = "mixed-16",
    limit: int | None = None,
) -> list[Estimate]:
    """Every layout of ``cluster``'s GPUs that fits, fastest (modelled) first.

    dp x tp x pp = all the GPUs; tp at most a node and dividing the heads (tensor
    parallelism stays inside a node: it is on every layer's critical path,
    Narayanan et al. 2021, takeaway #1); the global batch of sequences split into
    dp x micro_batch x micro_batches exactly; sequence parallelism only with tp > 1.
    """
    check_int("global_batch", global_batch, minimum=1)
    gpus = cluster.gpus
    out = []
    for tp in _divisors(cluster.gpus_per_node):
        if model.heads % tp or (model.kv_heads or model.heads) % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > model.layers:
                continue
            dp = gpus // (tp * pp)
            for b, z, r, o, sch, sp in itertools.product(
                micro_batch_sizes, zero_stages, recomputes, offloads, schedules,
                sequence_parallel,
            ):  # fmt: skip
                if sp and tp == 1 or global_batch % (dp * b):
                    continue
                if o == "params" and z != 3:
                    continue
                m = global_batch // (dp * b)
                try:
                    e = estimate(
                        model, dp=dp, tp=tp, pp=pp, zero_stage=z, micro_batch=b,
                        micro_batches=m, schedule=sch, sequence_parallel=sp,
                        recompute=r, offload=o, convention=convention,
                        cluster=cluster,
                    )  # fmt: skip
                except LayoutError:
                    continue
                if e.fits(cluster.memory_bytes):
                    out.append(e)
    out.sort(key=lambda e: e.step_time["total"])
    return out[:limit] if limit else out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def as_row(e: Estimate) -> dict:
    """One flat dict for a table: the layout, device GB, bubble, step seconds."""
    row = dict(e.layout)
    row.update({f"device_{k}": v for k, v in e.device.items()})
    row["bubble"] = e.bubble
    if e.step_time:
        row["step_s"] = e.step_time["total"]
    return row


def _spec_dict(model: ModelSpec) -> dict:  # used by explorers to show a preset
    return asdict(model)


def with_layers(model: ModelSpec, layers: int) -> ModelSpec:
    """The same model with another depth (the explorers' slider)."""
    return replace(model, layers=layers)
