"""What each offload mode keeps where, and what it moves: the chapter's formulas.

Part of chapter 3 ("CPU offloading"). Everything here is *modelled*: formulas,
checked against the measured ledger and the counted copies by
``tests/test_offload.py``. Psi is the number of parameters, N the data-parallel
ranks, s = ceil(Psi / N) a rank's slice, e the bytes of a parameter as computed (2
in mixed precision, 4 in fp32). Per rank:

=================  =====================  ==========================  ============
mode               device                 host                        moved/step
=================  =====================  ==========================  ============
none (ZeRO-2)      e Psi + e s + K s      0                           0
optimizer          e Psi + e s            K' s                        e s + e s
optimizer+grads    e Psi                  e s + K' s                  e s + e s
params (ZeRO-3)    0 (+ units in use)     e s + e s + K s             2 e s + e s
=================  =====================  ==========================  ============

with K = 12 (fp32 master, momentum, variance) in mixed precision and 8 in fp32
(no master: the fp32 parameters are updated in place), and K' = 12 in both: an
offloaded fp32 step needs a host copy of the parameters to update. "moved" is down
(device to host) + up. The activation modes ("activations", "recompute") keep the
model states of "none". In mixed precision at N = 1 the "optimizer+grads" row is
ZeRO-Offload's 16 Psi -> 2 Psi on the GPU and 14 Psi on the CPU, 4 Psi moved
(Ren et al. 2021, sections 3.3-3.4); its Table 1 prints "4M" for this row beside
an "8x" reduction, and 16M / 8 = 2M (:func:`paper_table1`).

Activations per layer (Korthikanti et al. 2022, section 4.1 and Table 2; what
``recompute`` keeps is Table 2's "full activation recomputation" row, 2sbh bytes per
layer at 2 bytes an element):
:func:`layer_activation_bytes`. Time: :func:`offload_seconds` and
:func:`recompute_seconds` for the choice between the two (exercise 3.3).
"""

from __future__ import annotations

import math

from utils.checks import check_bool, check_choice, check_int, check_number

__all__ = [
    "MODES",
    "MODEL_STATE_MODES",
    "bytes_moved",
    "gpt_block_saved_bytes",
    "layer_activation_bytes",
    "layer_forward_flops",
    "offload_seconds",
    "offload_state_bytes",
    "paper_table1",
    "recompute_seconds",
]

MODES = ("none", "optimizer", "optimizer+grads", "params", "activations", "recompute")
"""The lab's ``--offload`` choices."""

MODEL_STATE_MODES = ("none", "optimizer", "optimizer+grads", "params")
"""The modes that move model states (the activation modes keep "none"'s)."""


def _slice(num_params: int, world_size: int) -> int:
    return -(-num_params // world_size)


def offload_state_bytes(
    num_params: int,
    mode: str,
    *,
    world_size: int = 1,
    mixed_precision: bool = True,
) -> dict[str, dict[str, int]]:
    """Model-state bytes per rank: ``{"device": {...}, "host": {...}}``, each by
    category ("params", "grads", "optimizer"), as the module's table says.

    "params" counts nothing on the device: the gathered units in use are working
    memory, not states (two layers' 16-bit parameters with prefetch).
    """
    check_int("num_params", num_params, minimum=0)
    check_int("world_size", world_size, minimum=1)
    check_choice("mode", mode, MODES)
    check_bool("mixed_precision", mixed_precision)
    e = 2 if mixed_precision else 4
    k = 12 if mixed_precision else 8
    s = _slice(num_params, world_size)
    zero = {"params": 0, "grads": 0, "optimizer": 0}
    device, host = dict(zero), dict(zero)
    if mode in ("none", "activations", "recompute"):
        device.update(params=e * num_params, grads=e * s, optimizer=k * s)
    elif mode == "optimizer":
        device.update(params=e * num_params, grads=e * s)
        host.update(optimizer=12 * s)
    elif mode == "optimizer+grads":
        device.update(params=e * num_params)
        host.update(grads=e * s, optimizer=12 * s)
    else:  # params: ZeRO-3 with every shard on the host
        host.update(params=e * s, grads=e * s, optimizer=k * s)
    return {"device": device, "host": host}


def bytes_moved(
    num_params: int,
    mode: str,
    *,
    world_size: int = 1,
    mixed_precision: bool = True,
) -> dict[str, int]:
    """Model-state bytes copied per rank per step: ``{"h2d", "d2h"}``.

    optimizer and optimizer+grads: the slice's gradients down, its parameters up
    (ZeRO-Offload's 2 + 2 bytes per parameter in mixed precision, section 3.3);
    params: the slice up before each of the two all-gathers (forward, backward)
    and its gradients down. The activation modes move activations, which depend on
    the model (measured), not model states: 0 here.
    """
    check_choice("mode", mode, MODES)
    check_int("num_params", num_params, minimum=0)
    check_int("world_size", world_size, minimum=1)
    check_bool("mixed_precision", mixed_precision)
    e = 2 if mixed_precision else 4
    s = _slice(num_params, world_size)
    if mode in ("optimizer", "optimizer+grads"):
        return {"h2d": e * s, "d2h": e * s}
    if mode == "params":
        return {"h2d": 2 * e * s, "d2h": e * s}
    return {"h2d": 0, "d2h": 0}


def paper_table1() -> dict:
    """ZeRO-Offload's Table 1, last row (the strategy it adopts), recomputed.

    With M parameters the 16 bytes per parameter of mixed-precision Adam are 16M;
    the GPU keeps only the fp16 parameters (2M) once the gradients, fp32 master
    weights, momentum and variance are on the CPU. The table prints "4M" in the
    memory column beside "8x" in the reduction column; 16M / 8 = 2M, so the
    reduction is right and the memory is a misprint (4M would be 4x).
    """
    total = 16
    row = offload_state_bytes(1, "optimizer+grads", world_size=1)
    device = sum(row["device"].values())
    return {
        "total": total,
        "device": device,
        "host": sum(row["host"].values()),
        "reduction": total / device,
        "printed_device": 4,
        "printed_reduction": 8,
        "printed_device_reduction": total / 4,
    }


# --------------------------------------------------------------------- activations
def layer_activation_bytes(
    seq_len: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    policy: str = "none",
    *,
    bytes_per_element: int = 2,
) -> dict[str, int]:
    """Device and host activation bytes one transformer layer keeps in forward.

    Korthikanti et al. 2022, section 4.1 and Table 2 ("no parallelism" and "full
    activation recomputation" rows), for 16-bit activations and
    1-byte dropout masks: sbh(34 + 5as/h) with no recompute, 2sbh with full
    recompute (the layer's input). ``policy``: "none" keeps it all on the device;
    "recompute" keeps 2sbh; "offload" keeps it all on the host. Scaled by
    ``bytes_per_element`` / 2 (4 for fp32; the masks too, as a simplification).
    """
    for name, value in (
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("hidden", hidden),
        ("heads", heads),
        ("bytes_per_element", bytes_per_element),
    ):
        check_int(name, value, minimum=1)
    check_choice("policy", policy, ("none", "offload", "recompute"))
    s, b, h, a = seq_len, micro_batch, hidden, heads
    scale = bytes_per_element / 2
    full = math.ceil((34 * s * b * h + 5 * a * s * s * b) * scale)
    if policy == "recompute":
        return {"device": math.ceil(2 * s * b * h * scale), "host": 0}
    if policy == "offload":
        return {"device": 0, "host": full}
    return {"device": full, "host": 0}


def gpt_block_saved_bytes(
    seq_len: int, micro_batch: int, hidden: int, heads: int, *, bytes_per_element: int
) -> int:
    """What autograd keeps for one block of the course's GPT (``utils.models``) on
    CPU, in bytes: 16 sbh elements, the layer norms' statistics (mean and
    1/std per token, two norms: 4sb elements) and the fused attention's fp32
    log-sum-exp (one per token and head: 4asb bytes).

    This is Korthikanti et al.'s per-layer count (Table 2, sbh(34 + 5as/h) bytes
    at 2 bytes an element) for a block without dropout and with fused attention:
    their 34 sbh less the two dropout masks (1 byte per element each) is 32 sbh
    bytes, 16 elements: the two layer-norm inputs (2), the first norm's output,
    read by q, k and v (1), q, k, v (3), the attention output, which
    ``scaled_dot_product_attention`` saves and which, reshaped, is the projection's
    input too (1), the second norm's output (1), the MLP's pre- and post-GELU
    activations (4 + 4). The 5as^2 b softmax term is gone: the flash kernel
    recomputes the attention matrix in backward from the log-sum-exp it keeps.
    ``tests/test_offload.py`` holds the measured increments per block to this.
    """
    s, b, h, a = seq_len, micro_batch, hidden, heads
    e = bytes_per_element
    return 16 * s * b * h * e + 4 * s * b * e + 4 * a * s * b


def layer_forward_flops(seq_len: int, micro_batch: int, hidden: int) -> int:
    """Forward FLOPs of one transformer layer: 24bsh^2 + 4bs^2h, the matmuls at 2
    FLOPs per multiply-add (Narayanan et al., "Efficient Large-Scale Language
    Model Training on GPU Clusters Using Megatron-LM", SC 2021: the per-layer
    count behind their F = 96Bslh^2(1 + s/6h + V/16lh) per iteration, which is
    four such passes, forward, backward (twice) and recomputation)."""
    s, b, h = seq_len, micro_batch, hidden
    return 24 * b * s * h * h + 4 * b * s * s * h


def offload_seconds(activation_bytes: float, bytes_per_s: float) -> float:
    """Modelled seconds of offloading one layer's activations: down in forward
    and up again in backward, one after another over a link of ``bytes_per_s``
    per direction (no overlap with compute: the worst case)."""
    check_number("bytes_per_s", bytes_per_s, minimum=0)
    return 2 * float(activation_bytes) / bytes_per_s


def recompute_seconds(forward_flops: float, flops_per_s: float) -> float:
    """Modelled seconds of recomputing one layer: its forward once more."""
    check_number("flops_per_s", flops_per_s, minimum=0)
    return float(forward_flops) / flops_per_s
