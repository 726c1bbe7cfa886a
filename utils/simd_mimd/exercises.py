"""Checks for the exercises of chapter 6, "SIMD and MIMD".

* :func:`check_classification` (exercise 6.1): the Flynn class of each program in
  :data:`PROGRAMS`, and SPMD or MPMD for the MIMD ones.
* :func:`check_speedup_bound` (exercise 6.2): Amdahl's speedup from a serial
  fraction and a number of workers, the limit of infinitely many included.
* :func:`check_vectorised` (exercise 6.3): :func:`leaky_scale_loop` rewritten
  without a Python loop; checked against the loop on fresh random inputs, then
  timed against it on this machine (medians of interleaved runs, measured) and
  required to be :data:`SPEEDUP_TARGET` times faster.

A check prints one line when the answer is right and raises ``AssertionError``
saying what was expected when it is not.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from utils.simd_mimd.amdahl import amdahl_speedup

# ------------------------------------------------------------ 6.1 classify
PROGRAMS: dict[str, str] = {
    "python_sum": "total = 0.0; for v in values: total += v   (a list of floats, "
    "one core)",
    "vector_add": "torch.add(x, y) on two float32 tensors of a million elements, "
    "on one core where torch.backends.cpu.get_cpu_capability() is 'AVX512'",
    "gpu_kernel": "one warp (32 threads) of a CUDA kernel adding two vectors, one "
    "thread per element (the whole GPU runs many warps, each at its own pace)",
    "ddp": "torchrun --nproc-per-node 4 -m labs.data_parallel   (every rank: the "
    "same step on its slice of the batch)",
    "zero3": "python -m labs.zero --world-size 8 --stage 3   (each rank owns one "
    "eighth of every state)",
    "pipeline": "a 4-stage pipeline: rank 0 reads the batch, runs layers 1-8 and "
    "sends; ranks 1-2 receive, run their layers and send; rank 3 receives, runs "
    "the last layers and the loss, and sends gradients back",
    "parameter_server": "a parameter server: rank 0 loops receiving gradients and "
    "applying the optimizer; ranks 1-7 compute gradients on their batches and send "
    "them to rank 0",
    "voting": "three independently written programs compute a flight-control "
    "output from the same sensor readings; a voter keeps the majority",
}
"""The programs of exercise 6.1, by name."""

_ANSWERS = {
    "python_sum": "SISD",
    "vector_add": "SIMD",
    "gpu_kernel": "SIMD",
    "ddp": "MIMD/SPMD",
    "zero3": "MIMD/SPMD",
    "pipeline": "MIMD/MPMD",
    "parameter_server": "MIMD/MPMD",
    "voting": "MISD",
}

_HINTS = {
    "gpu_kernel": "a warp of 32 threads executes one common instruction at a time "
    "on 32 data (SIMT: SIMD-like)",
    "ddp": "the ranks run the same program but not in lockstep: each process has "
    "its own instruction stream (MIMD), all from one program (SPMD). SIMD would "
    "be one instruction stream driving many lanes",
    "zero3": "which shard a rank owns is data, not code: one program (SPMD)",
    "pipeline": "each stage runs different layers and a different sequence of "
    "sends and receives: several programs (MPMD), even if one script holds them",
    "parameter_server": "the server and the workers run different programs (MPMD)",
    "voting": "several instruction streams on one data stream: MISD",
    "vector_add": "one vector instruction adds 16 float32 lanes at once: SIMD",
    "python_sum": "one instruction stream, one element at a time: SISD",
}


def normalise(label: str) -> str:
    """ "mimd-spmd", "MIMD / SPMD" and "SPMD" all read as "MIMD/SPMD"."""
    text = str(label).upper().replace(" ", "").replace("-", "/").replace("_", "/")
    if text in ("SPMD", "MPMD"):
        return f"MIMD/{text}"
    return text


def check_classification(answers: dict[str, str]) -> None:
    """``answers`` maps every name of :data:`PROGRAMS` to "SISD", "SIMD", "MISD",
    "MIMD/SPMD" or "MIMD/MPMD"."""
    missing = sorted(set(PROGRAMS) - set(answers))
    if missing:
        raise AssertionError(f"no answer for {missing}; classify all {len(PROGRAMS)}")
    unknown = sorted(set(answers) - set(PROGRAMS))
    if unknown:
        raise AssertionError(
            f"unknown programs {unknown}; the names are {list(PROGRAMS)}"
        )
    allowed = ("SISD", "SIMD", "MISD", "MIMD/SPMD", "MIMD/MPMD")
    wrong = []
    for name, want in _ANSWERS.items():
        got = normalise(answers[name])
        if got not in allowed:
            raise AssertionError(f"{name}: {answers[name]!r} is not one of {allowed}")
        if got != want:
            wrong.append(f"{name}: you said {got}; hint: {_HINTS[name]}")
    if wrong:
        raise AssertionError(
            f"{len(wrong)} of {len(PROGRAMS)} wrong:\n  " + "\n  ".join(wrong)
        )
    print(f"correct: all {len(PROGRAMS)} programs classified")


# --------------------------------------------------------- 6.2 Amdahl bound
_CASES = [(s, n) for s in (0.0, 0.01, 0.05, 0.3, 1.0)
          for n in (1, 2, 8, 1024, math.inf)]  # fmt: skip


def check_speedup_bound(fn) -> None:
    """``fn(serial_fraction, workers)`` must be Amdahl's speedup for every case of a
    grid, ``workers=math.inf`` giving the bound ``1/s`` (infinite for s = 0)."""
    for s, n in _CASES:
        want = amdahl_speedup(s, n)
        try:
            got = fn(s, n)
        except (ArithmeticError, ValueError, TypeError) as err:
            raise AssertionError(
                f"fn({s}, {n}) raised {type(err).__name__}: {err}; expected {want!r}"
                + (
                    " (with s = 0 nothing is serial: the bound is math.inf)"
                    if s == 0 and math.isinf(n)
                    else ""
                )
            ) from None
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise AssertionError(f"fn({s}, {n}) returned {got!r}: a number, please")
        same = (
            got == want if math.isinf(want) else math.isclose(got, want, rel_tol=1e-9)
        )
        if not same:
            raise AssertionError(
                f"fn({s}, {n}) = {got!r}, expected {want!r}: the one-worker time is "
                f"s + (1 - s); on n workers it is s + (1 - s)/n; the speedup is the "
                f"ratio (with n infinite, 1/s)"
            )
    print(f"correct: Amdahl's speedup on all {len(_CASES)} cases")


# --------------------------------------------------------- 6.3 vectorise
# [loop-start]
def leaky_scale_loop(x: torch.Tensor, slope: float, scale: float) -> torch.Tensor:
    """The loop of exercise 6.3: scale * x where x > 0, else slope * scale * x."""
    out = []
    for v in x.tolist():
        if v > 0:
            out.append(scale * v)
        else:
            out.append(slope * scale * v)
    return torch.tensor(out, dtype=x.dtype)


# [loop-end]

SPEEDUP_TARGET = 5.0
"""How many times faster than the loop the vectorised version must be, measured on
the reader's machine on one thread. Any version that still loops over the elements
in Python is at best about as fast as the loop (a list comprehension) or far slower
(one-element torch ops); whole-tensor versions are tens of times faster."""
NUMEL = 1 << 16
REPEATS = 5


def _inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUMEL, generator=g)
    x[::97] = 0.0  # the branch's edge: zero takes the else path
    return x


def _median_seconds(fn, x, slope, scale, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, slope, scale)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def check_vectorised(fn, target: float = SPEEDUP_TARGET) -> float:
    """``fn(x, slope, scale)`` must equal :func:`leaky_scale_loop` (a float32 tensor
    of the same shape; ``x`` left unchanged) on fresh random inputs, and be at least
    ``target`` times faster, measured here: medians of interleaved runs of the loop
    and of ``fn`` on the same 65,536 elements, on one thread (so the speedup is the
    vector lanes', not intra-op threads'). Returns the measured speedup."""
    for seed, (slope, scale) in enumerate(((0.01, 1.0), (0.2, -3.0), (0.0, 2.5))):
        x = _inputs(seed + 11)
        before = x.clone()
        want = leaky_scale_loop(x, slope, scale)
        got = fn(x, slope, scale)
        if not torch.equal(x, before):
            raise AssertionError(
                "your function changed its input x: return a new tensor"
            )
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise AssertionError(
                f"expected a tensor of shape {tuple(want.shape)}, got "
                f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}"
            )
        if got.dtype != want.dtype:
            raise AssertionError(f"expected dtype {want.dtype}, got {got.dtype}")
        try:
            torch.testing.assert_close(got, want)
        except AssertionError as err:
            raise AssertionError(
                f"with slope={slope}, scale={scale} your result differs from the "
                f"loop's (both branches: scale * x where x > 0, slope * scale * x "
                f"elsewhere, zeros included):\n{err}"
            ) from None
    x = _inputs(0)
    loop_t, fn_t = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the vector lanes' speedup, not the threads'
    try:
        for _ in range(REPEATS):  # interleaved: a busy moment slows both alike
            loop_t.append(_median_seconds(leaky_scale_loop, x, 0.01, 1.0, 1))
            fn_t.append(_median_seconds(fn, x, 0.01, 1.0, 3))
    finally:
        torch.set_num_threads(threads)
    speedup = statistics.median(loop_t) / statistics.median(fn_t)
    if speedup < target:
        raise AssertionError(
            f"correct, but only {speedup:.1f}x faster than the loop on this machine "
            f"(measured: loop {statistics.median(loop_t) * 1e3:.2f} ms, yours "
            f"{statistics.median(fn_t) * 1e3:.2f} ms); the target is {target:g}x: "
            f"one whole-tensor operation per step, no Python loop over elements"
        )
    print(
        f"correct, and {speedup:.0f}x faster than the loop on this machine "
        f"(measured, medians: loop {statistics.median(loop_t) * 1e3:.2f} ms, yours "
        f"{statistics.median(fn_t) * 1e6:.0f} us for {NUMEL:,} elements)"
    )
    return speedup
