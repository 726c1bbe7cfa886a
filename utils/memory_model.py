"""Analytic memory models: model states under ZeRO, and activations.

Introduced in chapter 0 ("Why one device is not enough"), where the bytes per
parameter of mixed-precision Adam first appear; the ZeRO chapter adds the stages,
the tensor-parallel chapter the activation variants. Every measured memory figure
in the course is drawn next to one of these predictions (``utils.memory`` measures,
this module predicts; ``utils.memory`` re-exports everything here).

Sources:

* Rajbhandari, Rasley, Ruwase, He (2020), "ZeRO: Memory Optimizations Toward
  Training Trillion Parameter Models", SC20, arXiv:1910.02054 (section 3.1 and
  Figure 1 give the bytes per parameter and the per-device formulas, Table 1 the
  worked examples);
* Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
  Transformer Models", arXiv:2205.05198 (section 4 and Table 2: activation bytes
  per transformer layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from utils.checks import check_bool, check_int

__all__ = [
    "BYTES_PER_PARAM_CONVENTIONS",
    "PAPER_EXAMPLES",
    "Convention",
    "ModelStateBytes",
    "PaperExample",
    "StateComponent",
    "convention_state_bytes",
    "course_gpt_activation_bytes",
    "course_gpt_outside_bytes",
    "mlp_activation_bytes",
    "model_state_bytes",
    "paper_examples",
    "shard_numel",
    "transformer_activation_bytes",
]


def _check_stage(zero_stage) -> int:
    if (
        not isinstance(zero_stage, int)
        or isinstance(zero_stage, bool)
        or not (0 <= zero_stage <= 3)
    ):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    return int(zero_stage)


def shard_numel(num_params: int, world_size: int) -> int:
    """Elements of one rank's shard: ``ceil(num_params / world_size)``.

    A sharded state lives in a flat buffer padded with zeros until it divides evenly
    by ``world_size`` (what the course's from-scratch ZeRO and torch's FSDP2 do), so
    every rank holds the same number of elements, the last ones partly padding.
    """
    check_int("num_params", num_params, minimum=0)
    check_int("world_size", world_size, minimum=1)
    return -(-num_params // world_size)


# ------------------------------------------------------------- bytes per parameter
@dataclass(frozen=True)
class StateComponent:
    """One kind of per-parameter state: how many bytes, which category, when sharded."""

    category: str
    """"params", "grads" or "optimizer" (the categories of ``utils.report``)."""
    what: str
    """What the bytes hold, e.g. "fp32 master weights"."""
    bytes_per_param: int
    """Bytes per model parameter."""
    sharded_from_stage: int
    """The first ZeRO stage that splits this state over the data-parallel ranks."""


@dataclass(frozen=True)
class Convention:
    """A bytes-per-parameter convention for model states, and who uses it."""

    key: str
    """Short name, the key in ``BYTES_PER_PARAM_CONVENTIONS``."""
    label: str
    """What a widget shows, e.g. "16 B/param: ZeRO paper (2+2+12)"."""
    used_by: str
    """Who counts this way, with the place in their paper, docs or code."""
    components: tuple[StateComponent, ...]

    @property
    def bytes_per_param(self) -> int:
        """Total bytes per parameter with nothing sharded."""
        return sum(c.bytes_per_param for c in self.components)

    def split(self) -> dict[str, int]:
        """Unsharded bytes per parameter: {"params", "grads", "optimizer"}."""
        out = {"params": 0, "grads": 0, "optimizer": 0}
        for c in self.components:
            out[c.category] += c.bytes_per_param
        return out


def _c(category: str, what: str, nbytes: int, stage: int) -> StateComponent:
    return StateComponent(category, what, nbytes, stage)


BYTES_PER_PARAM_CONVENTIONS: dict[str, Convention] = {
    c.key: c
    for c in (
        Convention(
            key="mixed-16",
            label="16 B/param: ZeRO paper (2 + 2 + 12)",
            used_by=(
                "Rajbhandari et al. 2020, section 3.1 and Figure 1: fp16 parameters "
                "and gradients, Adam keeps an fp32 master copy, momentum and "
                "variance (K = 12). What model_state_bytes(mixed_precision=True) uses."
            ),
            components=(
                _c("params", "16-bit parameters", 2, 3),
                _c("grads", "16-bit gradients", 2, 2),
                _c("optimizer", "fp32 master weights", 4, 1),
                _c("optimizer", "fp32 Adam momentum", 4, 1),
                _c("optimizer", "fp32 Adam variance", 4, 1),
            ),
        ),
        Convention(
            key="mixed-18",
            label="18 B/param: fp32 gradients (2 + 4 + 12)",
            used_by=(
                "Megatron-LM's distributed-optimizer docs, row 'bf16 param, fp32 "
                "grads': 18 B/param, 6 + 12/d with the distributed optimizer (grads "
                "accumulated in fp32, not sharded by it); DeepSpeed's ZeRO-3 estimator "
                "estimate_zero3_model_states_mem_needs: 18 * params / gpus (its CPU-"
                "offload branch shows the split: 2 B fp16 params stay on the GPU, "
                "16 B = fp32 grads + master + moments go to the CPU)."
            ),
            components=(
                _c("params", "16-bit parameters", 2, 3),
                _c("grads", "fp32 gradients (accumulated in fp32)", 4, 2),
                _c("optimizer", "fp32 master weights", 4, 1),
                _c("optimizer", "fp32 Adam momentum", 4, 1),
                _c("optimizer", "fp32 Adam variance", 4, 1),
            ),
        ),
        Convention(
            key="mixed-20",
            label="20 B/param: 16-bit grads plus an fp32 copy (2 + 6 + 12)",
            used_by=(
                "Megatron-LM's distributed-optimizer docs, row 'fp16 param, fp16 "
                "grads': 20 B/param, 4 + 16/d with the distributed optimizer, which "
                "shards the fp32 main grads with the optimizer states; DeepSpeed's "
                "ZeRO-2 estimator estimate_zero2_model_states_mem_needs: 2 * params "
                "+ 18 * params / gpus, commented '18 = 2_grads_16bit + 4_grads_32bit "
                "+ 4_params_32bit + 8_optimizer_states_32bit'."
            ),
            components=(
                _c("params", "16-bit parameters", 2, 3),
                _c("grads", "16-bit gradients", 2, 2),
                _c("grads", "fp32 gradient copy for the optimizer", 4, 1),
                _c("optimizer", "fp32 master weights", 4, 1),
                _c("optimizer", "fp32 Adam momentum", 4, 1),
                _c("optimizer", "fp32 Adam variance", 4, 1),
            ),
        ),
        Convention(
            key="fp32-16",
            label="16 B/param: fp32 training (4 + 4 + 8)",
            used_by=(
                "Plain fp32 Adam, as the course's CPU labs run it: fp32 parameters "
                "and gradients, momentum and variance, no master copy (Megatron-LM "
                "docs row 'fp32 param, fp32 grads': 16, 8 + 8/d). What "
                "model_state_bytes(mixed_precision=False) uses."
            ),
            components=(
                _c("params", "fp32 parameters", 4, 3),
                _c("grads", "fp32 gradients", 4, 2),
                _c("optimizer", "fp32 Adam momentum", 4, 1),
                _c("optimizer", "fp32 Adam variance", 4, 1),
            ),
        ),
    )
}
"""Bytes-per-parameter conventions for Adam, keyed by a short name.

The totals people quote (16, 18, 20) differ by which gradient copies they count; the
split into categories also differs between write-ups (the HF "model memory anatomy"
page files the fp32 master copy under weights, 6 + 4 + 8 = 18). Here the fp32
master copy is always optimizer state, as in the ZeRO paper.
"""


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state bytes held by one rank."""

    params: int
    grads: int
    optimizer: int
    total: int

    def as_dict(self) -> dict[str, int]:
        """{"params", "grads", "optimizer"}: the categories of ``utils.report``."""
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer}


def convention_state_bytes(
    convention: str | Convention,
    num_params: int,
    *,
    world_size: int = 1,
    zero_stage: int = 0,
) -> ModelStateBytes:
    """Per-rank model-state bytes for a convention at a ZeRO stage (the ZeRO chapter).

    Each state of the convention is replicated below its ``sharded_from_stage`` and
    split over ``world_size`` ranks from it on; a split state holds
    ``ceil(num_params / world_size)`` elements per rank (see :func:`shard_numel`).
    """
    if isinstance(convention, str):
        if convention not in BYTES_PER_PARAM_CONVENTIONS:
            raise ValueError(
                f"convention must be one of {sorted(BYTES_PER_PARAM_CONVENTIONS)}, "
                f"got {convention!r}"
            )
        convention = BYTES_PER_PARAM_CONVENTIONS[convention]
    elif not isinstance(convention, Convention):
        raise ValueError(
            f"convention must be a name or a Convention, got {convention!r}"
        )
    check_int("num_params", num_params, minimum=0)
    check_int("world_size", world_size, minimum=1)
    _check_stage(zero_stage)
    shard = shard_numel(num_params, world_size)
    out = {"params": 0, "grads": 0, "optimizer": 0}
    for c in convention.components:
        numel = shard if zero_stage >= c.sharded_from_stage else num_params
        out[c.category] += c.bytes_per_param * numel
    return ModelStateBytes(**out, total=sum(out.values()))


def model_state_bytes(
    num_params: int,
    *,
    world_size: int = 1,
    zero_stage: int = 0,
    mixed_precision: bool = True,
) -> ModelStateBytes:
    """Bytes of params, grads and Adam states per rank (chapter 0; the ZeRO chapter).

    With ``mixed_precision`` (the ZeRO paper's setting): 2 + 2 + 12 bytes per
    parameter (16-bit params and grads; fp32 master copy, momentum and variance);
    without: 4 + 4 + 8 (fp32 params, grads, momentum, variance). Stage 1 shards the
    optimizer states over ``world_size`` ranks, stage 2 also the gradients, stage 3
    also the parameters. These are the per-device formulas of the ZeRO paper
    (section 3.1, Figure 1; Psi = num_params, K = 12, N_d = world_size):

    * stage 0: (2 + 2 + K) Psi
    * stage 1 (P_os): 2 Psi + 2 Psi + K Psi / N_d
    * stage 2 (P_os+g): 2 Psi + (2 + K) Psi / N_d
    * stage 3 (P_os+g+p): (2 + 2 + K) Psi / N_d

    except that a shard is ``ceil(Psi / N_d)`` elements: the flat buffer is padded
    to divide evenly, as the course's from-scratch ZeRO does, so the numbers are the
    bytes a rank really allocates. Raises ValueError on a negative or non-integer
    count (bools and floats included), a stage outside 0..3 or ``world_size < 1``.
    """
    check_bool("mixed_precision", mixed_precision)
    key = "mixed-16" if mixed_precision else "fp32-16"
    return convention_state_bytes(
        key, num_params, world_size=world_size, zero_stage=zero_stage
    )


# ---------------------------------------------------------------- paper examples
@dataclass(frozen=True)
class PaperExample:
    """One per-device figure printed in the ZeRO paper, and where."""

    source: str
    num_params: int
    world_size: int
    zero_stage: int
    printed_gb: float
    """The number as printed (GB = 1e9 bytes)."""
    decimals: int
    """Decimals printed: the formula's value rounds (half up) to ``printed_gb``."""

    def exact_gb(self) -> float:
        """What :func:`model_state_bytes` gives, in GB (1e9 bytes)."""
        b = model_state_bytes(
            self.num_params, world_size=self.world_size, zero_stage=self.zero_stage
        )
        return b.total / 1e9

    def rounded_gb(self) -> float:
        """``exact_gb`` rounded half up to the printed number of decimals."""
        q = Decimal(1).scaleb(-self.decimals)
        return float(Decimal(str(self.exact_gb())).quantize(q, rounding=ROUND_HALF_UP))


_PSI = 7_500_000_000
_FIG1 = "ZeRO paper, Figure 1 (Psi = 7.5B, N_d = 64, K = 12)"
_TAB1 = "ZeRO paper, Table 1, 7.5B-parameter column"
PAPER_EXAMPLES: tuple[PaperExample, ...] = (
    PaperExample(_FIG1, _PSI, 64, 0, 120.0, 0),
    PaperExample(_FIG1, _PSI, 64, 1, 31.4, 1),
    PaperExample(_FIG1, _PSI, 64, 2, 16.6, 1),
    PaperExample(_FIG1, _PSI, 64, 3, 1.9, 1),
    # Table 1 (DP degree -> P_os, P_os+g, P_os+g+p), the 7.5B model; its printed
    # values are the formulas rounded to the digits shown (41.25 is printed 41.3).
    PaperExample(_TAB1, _PSI, 1, 1, 120.0, 0),
    PaperExample(_TAB1, _PSI, 1, 2, 120.0, 0),
    PaperExample(_TAB1, _PSI, 1, 3, 120.0, 0),
    PaperExample(_TAB1, _PSI, 4, 1, 52.5, 1),
    PaperExample(_TAB1, _PSI, 4, 2, 41.3, 1),
    PaperExample(_TAB1, _PSI, 4, 3, 30.0, 0),
    PaperExample(_TAB1, _PSI, 16, 1, 35.6, 1),
    PaperExample(_TAB1, _PSI, 16, 2, 21.6, 1),
    PaperExample(_TAB1, _PSI, 16, 3, 7.5, 1),
    PaperExample(_TAB1, _PSI, 64, 1, 31.4, 1),
    PaperExample(_TAB1, _PSI, 64, 2, 16.6, 1),
    PaperExample(_TAB1, _PSI, 64, 3, 1.88, 2),
    PaperExample(_TAB1, _PSI, 256, 1, 30.4, 1),
    PaperExample(_TAB1, _PSI, 256, 2, 15.4, 1),
    PaperExample(_TAB1, _PSI, 256, 3, 0.47, 2),
    PaperExample(_TAB1, _PSI, 1024, 1, 30.1, 1),
    PaperExample(_TAB1, _PSI, 1024, 2, 15.1, 1),
    PaperExample(_TAB1, _PSI, 1024, 3, 0.12, 2),
)
"""The ZeRO paper's worked examples for the 7.5B model (mixed precision, K = 12)."""


def paper_examples() -> list[dict]:
    """The ZeRO paper's examples as plain dicts, with what the formula gives.

    Keys: source, num_params, world_size, zero_stage, printed_gb, exact_gb.
    """
    return [
        {
            "source": e.source,
            "num_params": e.num_params,
            "world_size": e.world_size,
            "zero_stage": e.zero_stage,
            "printed_gb": e.printed_gb,
            "exact_gb": e.exact_gb(),
        }
        for e in PAPER_EXAMPLES
    ]


# ------------------------------------------------------------------- activations
_RECOMPUTE = ("none", "selective", "full")


def transformer_activation_bytes(
    seq_len: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    layers: int = 1,
    *,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
) -> int:
    """Activation bytes one rank stores for ``layers`` transformer layers.

    Korthikanti et al. 2022, section 4 and Table 2, with s = ``seq_len``,
    b = ``micro_batch``, h = ``hidden``, a = ``heads``, t = ``tp_size``; 16-bit
    activations and 1-byte dropout masks. Per layer:

    * no parallelism (section 4.1): sbh (34 + 5as/h); the 5as/h term is the
      softmax output (2as^2 b), its dropout mask (as^2 b) and the dropout output
      (2as^2 b); the scores QK^T themselves are not stored;
    * tensor parallel (section 4.2): sbh (10 + 24/t + 5as/(ht)); the 10 are what
      every rank keeps whole: the two layer-norm inputs, the two dropout masks and
      the inputs of each block's first linear layer;
    * tensor + sequence parallel (section 4.2): sbh (34/t + 5as/(ht));
    * selective recompute (section 5) drops the 5as/h term: sbh (10 + 24/t),
      or sbh (34/t) with sequence parallelism;
    * full recompute keeps only each layer's input: sbh * 2 (Table 2's last row).

    Returns an int, rounded up where t does not divide the terms. Pipeline
    parallelism changes how many layers a rank holds and how many micro-batches
    are in flight: pass that product as ``layers``.
    """
    for name, value in (
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("hidden", hidden),
        ("heads", heads),
        ("tp_size", tp_size),
    ):
        check_int(name, value, minimum=1)
    check_int("layers", layers, minimum=0)
    check_bool("sequence_parallel", sequence_parallel)
    if recompute not in _RECOMPUTE:
        raise ValueError(f"recompute must be one of {_RECOMPUTE}, got {recompute!r}")
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, Fraction(tp_size)
    attention = 5 * a * s / (h * t)  # 5as/(ht)
    if recompute == "full":
        per_token = Fraction(2)
    else:
        linear = 34 / t if sequence_parallel else 10 + 24 / t
        per_token = linear + (attention if recompute == "none" else 0)
    return math.ceil(s * b * h * per_token * layers)


def course_gpt_activation_bytes(
    seq_len: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    layers: int = 1,
    *,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    bytes_per_element: int = 4,
) -> int:
    """Activation bytes the course GPT (``utils.models.GPT``) leaves for its backward
    on one rank, for ``layers`` transformer blocks: Korthikanti et al. 2022, Table 2
    (:func:`transformer_activation_bytes`), adapted to this model and dtype
    (``e = bytes_per_element``). Chapter 4 measures it (``tests/test_model_
    parallel.py``), the combining chapter's planner uses it for the CPU labs.

    The course GPT differs from the paper's in three ways: it has no dropout (the
    paper's two s b h masks, and the attention's dropout mask and output, are
    absent); its attention is torch's fused ``scaled_dot_product_attention``, whose
    CPU kernel (as FlashAttention) keeps only its output and a per-row log-sum-exp
    (a s b / t numbers, fp32 in both precisions), never the a s^2 b scores and
    softmax (the paper's 5 a s / (h t) term); and with sequence parallelism the
    all-gathered inputs of the attention's q, k, v and of the MLP's fc are kept
    whole, as torch's ``ColwiseParallel`` keeps its replicated input, where
    Megatron-LM keeps the sequence shard and all-gathers again in backward
    (``megatron/core/tensor_parallel/layers.py``,
    ``LinearWithGradAccumulationAndAsyncCommunication``). In elements, with the
    layer norms' mean and 1/std (b s each, two norms), per block:

    * tensor parallel: s b h (4 + 12/t) + 4 s b + a s b / t: the block input and
      its layer norm's output, the residual after attention and its norm's output
      (whole); q, k, v, the attention output (the projection's input: the same
      tensor), the MLP's 4h GELU input and output (split);
    * + sequence parallel: s b h (2 + 14/t) + 4 s b / t + a s b / t: the two
      residuals are split too, the two gathered inputs whole.

    So with e = 2 the paper's 10 + 24/t becomes 8 + 24/t (no masks) and its 34/t
    becomes 4 + 28/t.
    """
    for name, value in (
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("hidden", hidden),
        ("heads", heads),
        ("tp_size", tp_size),
        ("bytes_per_element", bytes_per_element),
    ):
        check_int(name, value, minimum=1)
    check_int("layers", layers, minimum=0)
    check_bool("sequence_parallel", sequence_parallel)
    s, b, h, a, t, e = seq_len, micro_batch, hidden, heads, tp_size, bytes_per_element
    lse = 4 * a * s * b // t  # fp32 in both precisions
    if sequence_parallel:
        block = e * (2 * s * b * h + 14 * s * b * h // t + 4 * s * b // t) + lse
    else:
        block = e * (4 * s * b * h + 12 * s * b * h // t + 4 * s * b) + lse
    return layers * block


def course_gpt_outside_bytes(
    seq_len: int,
    micro_batch: int,
    hidden: int,
    vocab: int,
    *,
    first: bool,
    last: bool,
    tp_size: int = 1,
    sequence_parallel: bool = False,
    bytes_per_element: int = 4,
) -> int:
    """The course GPT's activations outside its blocks, on one rank: the first
    block's input (the embedding's output on the first stage, the received
    activation on a later one; split along the sequence with sequence
    parallelism), and on the last stage the final norm's output (the head's input,
    whole) and the loss's fp32 softmax of this rank's ``vocab / tp`` logits. Left
    out: index tensors, masks and the norms' statistics, under 64 bytes per token
    (measured in ``tests/test_model_parallel.py``). ``first`` is accepted for
    symmetry: every stage keeps its input."""
    del first
    s, b, h, t, e = seq_len, micro_batch, hidden, tp_size, bytes_per_element
    out = e * s * b * h // (t if sequence_parallel else 1)
    if last:
        out += e * s * b * h + 4 * s * b * vocab // t
    return out


def mlp_activation_bytes(batch: int, sizes, *, bytes_per_element: int = 4) -> int:
    """Activation bytes autograd saves in forward for the course's MLP (chapter 0).

    The MLP is ``nn.Sequential(Linear(sizes[0], sizes[1]), ReLU(), Linear(sizes[1],
    sizes[2]), ReLU(), ..., Linear(sizes[-2], sizes[-1]))``: a ReLU after every
    Linear but the last. What torch keeps for backward:

    * each Linear (``addmm``) saves its input, to form the weight gradient (the
      weight it also saves is a parameter, not an activation);
    * each ReLU saves its *output* (``threshold_backward`` reads the result), and
      that output is the next Linear's input: one tensor, counted once;
    * the pre-ReLU outputs and the last Linear's output are not saved.

    So the total is ``batch * (sizes[0] + sizes[1] + ... + sizes[-2])`` elements.
    The model's output and the loss, while the caller still holds them, come on top.
    """
    check_int("batch", batch, minimum=1)
    check_int("bytes_per_element", bytes_per_element, minimum=1)
    try:
        sizes = list(sizes)
    except TypeError:
        raise ValueError(
            f"sizes must be a list of layer widths, got {sizes!r}"
        ) from None
    if len(sizes) < 2:
        raise ValueError(
            f"sizes needs at least an input and an output width, got {sizes}"
        )
    for i, width in enumerate(sizes):
        check_int(f"sizes[{i}]", width, minimum=1)
    return batch * sum(sizes[:-1]) * bytes_per_element
