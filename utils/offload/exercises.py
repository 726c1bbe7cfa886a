"""Checks for the exercises of chapter 3, "CPU offloading".

* :func:`check_device_bytes` (exercise 3.1): the smallest device memory that holds
  a model's states under each mode (mixed precision, per rank), against
  ``utils.offload.accounting``: ZeRO-2 for "none", ZeRO-Offload's rows, and ZeRO-3
  with the shards on the host plus two layers' gathered 16-bit parameters.
* :func:`check_bytes_moved` (exercise 3.2): the model-state bytes one rank copies
  per step, each direction, per mode.
* :func:`check_recompute_or_offload` (exercise 3.3): which of the two costs a
  layer less time, for a layer shape, a host link and a FLOP rate (modelled:
  offloading moves a layer's activations down and up, one after the other;
  recomputing runs its forward again).

A check prints one line when the answer is right and raises ``AssertionError``
with what was expected when it is not.
"""

from __future__ import annotations

from utils.offload.accounting import (
    MODES,
    bytes_moved,
    layer_activation_bytes,
    layer_forward_flops,
    offload_seconds,
    offload_state_bytes,
    recompute_seconds,
)

__all__ = [
    "bytes_moved_reference",
    "check_bytes_moved",
    "check_device_bytes",
    "check_recompute_or_offload",
    "device_bytes",
    "recompute_or_offload",
]

_SIZES = (1_000, 7_777, 1_300_000_000, 13_000_000_000, 175_000_000_000)
_WORLDS = (1, 3, 8, 64)


def device_bytes(num_params: int, layer_params: int, mode: str, world_size: int):
    """The reference for exercise 3.1: model-state bytes one rank's device must
    hold in mixed precision (a slice is ceil(Psi / N) elements), and for "params"
    the two layers' gathered 16-bit parameters on top."""
    states = offload_state_bytes(num_params, mode, world_size=world_size)
    need = sum(states["device"].values())
    if mode == "params":
        need += 2 * 2 * layer_params
    return need


def bytes_moved_reference(num_params, mode, world_size, mixed_precision):
    """The reference for exercise 3.2 (``accounting.bytes_moved``)."""
    return bytes_moved(
        num_params, mode, world_size=world_size, mixed_precision=mixed_precision
    )


def _cases_device():
    for psi in _SIZES:
        for n in _WORLDS:
            for mode in MODES:
                yield psi, max(1, psi // 40), mode, n


def check_device_bytes(fn) -> None:
    """Exercise 3.1: ``fn(num_params, layer_params, mode, world_size)`` -> bytes."""
    for psi, layer, mode, n in _cases_device():
        want = device_bytes(psi, layer, mode, n)
        try:
            got = fn(psi, layer, mode, n)
        except Exception as err:
            raise AssertionError(
                f"device_bytes({psi:,}, {layer:,}, {mode!r}, {n}) raised {err!r}"
            ) from err
        if got != want:
            hint = ""
            if mode in ("none", "activations", "recompute") and got == 16 * psi:
                hint = " ('none' is ZeRO-2 here: 14 of the 16 bytes are sharded)"
            elif mode == "params" and got == 0:
                hint = " (a layer must be gathered to run: two, with prefetch)"
            elif n > 1 and psi % n:
                hint = " (a slice holds ceil(Psi / N) elements)"
            raise AssertionError(
                f"device_bytes({psi:,}, {layer:,}, {mode!r}, {n}): expected "
                f"{want:,} bytes, got {got!r}{hint}"
            )
    print("correct: device bytes per rank match the formulas for every mode")


def check_bytes_moved(fn) -> None:
    """Exercise 3.2: ``fn(num_params, mode, world_size, mixed_precision)`` ->
    ``{"h2d": bytes, "d2h": bytes}`` per rank per step."""
    for psi in _SIZES:
        for n in _WORLDS:
            for mode in MODES:
                for mixed in (True, False):
                    want = bytes_moved_reference(psi, mode, n, mixed)
                    got = fn(psi, mode, n, mixed)
                    if not isinstance(got, dict) or set(got) != {"h2d", "d2h"}:
                        raise AssertionError(
                            f"bytes_moved must return {{'h2d': ..., 'd2h': ...}}, got "
                            f"{got!r}"
                        )
                    if got != want:
                        raise AssertionError(
                            f"bytes_moved({psi:,}, {mode!r}, {n}, mixed={mixed}): "
                            f"expected {want}, got {got}"
                        )
    print("correct: bytes moved per rank and step match the formulas")


def recompute_or_offload(seq_len, micro_batch, hidden, heads, bytes_per_s, flops_per_s):
    """The reference for exercise 3.3: "recompute" or "offload", whichever costs a
    layer less modelled time (a tie goes to "recompute", which needs no host
    memory)."""
    acts = layer_activation_bytes(seq_len, micro_batch, hidden, heads)["device"]
    moving = offload_seconds(acts, bytes_per_s)
    again = recompute_seconds(
        layer_forward_flops(seq_len, micro_batch, hidden), flops_per_s
    )
    return "recompute" if again <= moving else "offload"


def _ratio_cases():
    """Layer shapes and rates where recomputing costs ``r`` times offloading, for
    ratios on both sides of 1 and near the places where a slip would flip it."""
    shapes = ((2048, 1, 4096, 32), (1024, 4, 1024, 16), (8192, 1, 2048, 16))
    bandwidth = 32e9  # an A100's PCIe Gen4 x16, per direction
    for s, b, h, a in shapes:
        acts = layer_activation_bytes(s, b, h, a)["device"]
        moving = offload_seconds(acts, bandwidth)
        for r in (0.2, 0.45, 0.7, 0.95, 1.05, 1.4, 1.9, 3.5):
            flops = layer_forward_flops(s, b, h) / (moving * r)
            yield (s, b, h, a, bandwidth, flops), ("recompute" if r < 1 else "offload")


def check_recompute_or_offload(fn) -> None:
    """Exercise 3.3: ``fn(seq_len, micro_batch, hidden, heads, bytes_per_s,
    flops_per_s)`` -> "recompute" or "offload"."""
    for args, want in _ratio_cases():
        got = fn(*args)
        if got not in ("recompute", "offload"):
            raise AssertionError(f"answer 'recompute' or 'offload', got {got!r}")
        if got != want:
            s, b, h, a, bw, flops = args
            raise AssertionError(
                f"s={s}, b={b}, h={h}, a={a}, {bw / 1e9:g} GB/s, "
                f"{flops / 1e12:.4g} TFLOP/s: expected {want!r}, got {got!r} (offload "
                "moves a layer's sbh(34 + 5as/h) bytes down and back up; recompute "
                "runs its forward, 24bsh^2 + 4bs^2h FLOPs, once more)"
            )
    print("correct: the cheaper policy in every case")
