"""The same work done three ways on a CPU, and one GPU kernel whose lanes disagree:
chapter 6, "SIMD and MIMD", sections "SIMD on a CPU" and "SIMT on a GPU".

CPU (``labs/simd_mimd.py``, part ``simd``): two operations, each written three ways.

* ``axpy``, ``out = a x + y`` (2 floating-point operations per element, one fused
  multiply-add where the hardware has it), and ``sum``, the sum of ``x`` (one
  addition per element);
* ``python``: a ``for`` loop over Python floats (always IEEE binary64, whatever
  the tensor's dtype): one interpreted bytecode sequence per element, SISD;
* ``scalar``: the same loop over one-element torch ops (``x[i]``, ``a * x[i]``...):
  every element pays torch's dispatch, as a tensor of one element;
* ``vector``: one torch call over the whole tensor, which runs a loop compiled to
  the vector instructions torch reports (``torch.backends.cpu.get_cpu_capability``):
  SIMD.

:func:`measure_simd` times each (medians of repeated runs) and returns rows of
measured throughput.

GPU (part ``divergence``, where CUDA or ROCm is available): :data:`DIVERGENCE_SOURCE`
is a kernel compiled at run time (NVRTC, or hipRTC on ROCm, through torch's
``torch.cuda._compile_kernel``: a private API of torch 2.13, used because it needs
no compiler installed). Each thread takes path A or path B of an ``if`` according
to a mask; :data:`PATTERNS` set the mask so that every thread takes A, every thread
takes B, whole warps alternate (``by_warp``: no warp disagrees), or neighbouring
lanes alternate (``by_lane``: every warp holds both). A warp executes one common
instruction at a time, so a warp whose lanes disagree runs both paths one after the
other with the other lanes masked off (NVIDIA, CUDA C++ Programming Guide, "SIMT
Architecture"; AMD, HIP documentation, "Hardware implementation"). The model
(:func:`divergence_model`): ``by_lane`` costs ``t_A + t_B``, ``by_warp`` about
``(t_A + t_B) / 2``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OPS = ("axpy", "sum")
IMPLS = ("python", "scalar", "vector")
FLOPS_PER_ELEMENT = {"axpy": 2, "sum": 1}
"""Floating-point operations per element: a multiply and an add; one add."""
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
AXPY_A = 0.5
"""The scalar ``a`` of axpy (exact in every dtype)."""


# [simd-impls-start]
def python_axpy(a: float, xs: list, ys: list, out: list) -> None:
    for i in range(len(xs)):  # one element per trip through the interpreter
        out[i] = a * xs[i] + ys[i]


def python_sum(xs: list) -> float:
    total = 0.0
    for v in xs:
        total += v
    return total


def scalar_axpy(a: float, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor):
    for i in range(x.numel()):  # x[i] is a one-element tensor: 4 torch ops each
        out[i] = a * x[i] + y[i]


def scalar_sum(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=x.dtype)
    for i in range(x.numel()):
        total += x[i]
    return total


def vector_axpy(a: float, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor):
    torch.add(y, x, alpha=a, out=out)  # one call: y + a x over every element


def vector_sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum()


# [simd-impls-end]


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``samples``, linearly interpolated."""
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones
    (``time.perf_counter``; CPU work, so no device sync is needed)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile of ``samples`` (seconds)."""
    return {
        "median_s": statistics.median(samples),
        "p10_s": percentile(samples, 0.1),
        "p90_s": percentile(samples, 0.9),
        "repeats": len(samples),
    }


def _inputs(numel: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    return x, y


def workloads(impl: str, op: str, numel: int, dtype: torch.dtype, seed: int = 0):
    """``(fn, result)``: a zero-argument callable doing ``op`` the ``impl`` way on
    ``numel`` elements of ``dtype``, and a callable giving its last result as a
    float64 tensor (for checking that the three ways agree)."""
    x, y = _inputs(numel, dtype, seed)
    if impl == "python":
        xs, ys, out = x.double().tolist(), y.double().tolist(), [0.0] * numel
        if op == "axpy":
            return (lambda: python_axpy(AXPY_A, xs, ys, out)), (
                lambda: torch.tensor(out, dtype=torch.float64)
            )
        box = {}
        return (lambda: box.update(v=python_sum(xs))), (
            lambda: torch.tensor(box["v"], dtype=torch.float64)
        )
    out = torch.empty_like(x)
    axpy = scalar_axpy if impl == "scalar" else vector_axpy
    reduce = scalar_sum if impl == "scalar" else vector_sum
    if op == "axpy":
        return (lambda: axpy(AXPY_A, x, y, out)), (lambda: out.double())
    box = {}
    return (lambda: box.update(v=reduce(x))), (lambda: box["v"].double())


def measure_simd(
    dtypes: Sequence[str],
    *,
    loop_numel: int,
    vector_numel: int,
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Measured throughput of every (op, impl, dtype): the loops on ``loop_numel``
    elements, the vectorised op on ``vector_numel`` (large enough that its call
    overhead is small against its work). ``python`` runs once, in float64 (Python
    floats). Run with the threads the caller set (the lab uses one)."""
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        for op in OPS:
            for impl in IMPLS:
                if impl == "python" and dtype != torch.float64:
                    continue  # a Python float is binary64, whatever the tensor was
                numel = vector_numel if impl == "vector" else loop_numel
                fn, _ = workloads(impl, op, numel, dtype, seed)
                stats = summary(time_calls(fn, repeats, warmup))
                per_s = numel / stats["median_s"]
                rows.append(
                    {
                        "op": op,
                        "impl": impl,
                        "dtype": name,
                        "numel": numel,
                        **stats,
                        "elements_per_s": per_s,
                        "flops_per_s": per_s * FLOPS_PER_ELEMENT[op],
                    }
                )
    return rows


# ------------------------------------------------------------- GPU divergence
PATTERNS = ("all_a", "all_b", "by_warp", "by_lane")
"""Which threads take path A: all, none, every other warp, every other lane."""

# [divergence-kernel-start]
DIVERGENCE_SOURCE = r"""
extern "C" __global__ void branchy(float* x, const int* take_a, int n, int iters) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    if (take_a[i]) {                      // path A: a chain of multiply-adds
        for (int k = 0; k < iters; ++k) v = v * 0.999f + 0.001f;
    } else {                              // path B: a chain of square roots
        for (int k = 0; k < iters; ++k) v = sqrtf(v * v + 1.0f) * 0.5f;
    }
    x[i] = v;
}
"""
# [divergence-kernel-end]


def lane_mask(pattern: str, n: int, warp_size: int) -> torch.Tensor:
    """int32 mask, 1 where thread i takes path A, for ``pattern``."""
    i = torch.arange(n)
    if pattern == "all_a":
        mask = torch.ones(n, dtype=torch.bool)
    elif pattern == "all_b":
        mask = torch.zeros(n, dtype=torch.bool)
    elif pattern == "by_warp":
        mask = (i // warp_size) % 2 == 0  # whole warps agree
    elif pattern == "by_lane":
        mask = i % 2 == 0  # every warp holds both paths
    else:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return mask.to(torch.int32)


def divergence_model(times: dict[str, float]) -> dict[str, float]:
    """Modelled times from the uniform ones: a warp whose lanes disagree runs both
    paths (``t_A + t_B``); warps that each agree split the work (``(t_A + t_B)/2``)."""
    both = times["all_a"] + times["all_b"]
    return {"by_lane": both, "by_warp": both / 2}


def measure_divergence(
    device=None,
    *,
    n: int = 1 << 22,
    iters: int = 2048,
    block: int = 256,
    repeats: int = 20,
    warmup: int = 3,
) -> dict:
    """Time :data:`DIVERGENCE_SOURCE` under each pattern on a CUDA (or ROCm)
    device: median milliseconds of ``repeats`` launches (CUDA events), with the
    device's name and warp size. Raises RuntimeError where there is no GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("measure_divergence needs a CUDA or ROCm GPU; none here")
    device = (
        torch.device("cuda", torch.cuda.current_device()) if device is None else device
    )
    props = torch.cuda.get_device_properties(device)
    warp = int(props.warp_size)
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(DIVERGENCE_SOURCE, "branchy")
        grid = ((n + block - 1) // block, 1, 1)
        times, spread = {}, {}
        for pattern in PATTERNS:
            mask = lane_mask(pattern, n, warp).to(device)
            x = torch.rand(n, device=device)
            samples = []
            for k in range(warmup + repeats):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                kernel(grid=grid, block=(block, 1, 1), args=[x, mask, n, iters])
                end.record()
                end.synchronize()
                if k >= warmup:
                    samples.append(start.elapsed_time(end))
            times[pattern] = statistics.median(samples)
            spread[pattern] = [percentile(samples, 0.1), percentile(samples, 0.9)]
    return {
        "device": props.name,
        "warp_size": warp,
        "runtime": f"ROCm {torch.version.hip}"
        if torch.version.hip
        else (f"CUDA {torch.version.cuda}"),
        "torch": torch.__version__,
        "n": n,
        "iters": iters,
        "block": block,
        "repeats": repeats,
        "median_ms": times,
        "p10_p90_ms": spread,
        "modelled_ms": divergence_model(times),
    }


RECORDED = Path(__file__).with_name("gpu_recorded.json")
"""Where ``python -m labs.simd_mimd --part divergence --record-gpu`` keeps the GPU
figures that the chapter shows (labelled with the device they were measured on)."""


def load_recorded(path: Path = RECORDED) -> list[dict]:
    """The recorded GPU runs (one dict per device), or [] where none is recorded."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["runs"]


def save_recorded(result: dict, path: Path = RECORDED) -> Path:
    """Add (or replace, for the same device name) one :func:`measure_divergence`
    result in the recorded file."""
    runs = [r for r in load_recorded(path) if r["device"] != result["device"]]
    runs.append(result)
    path.write_text(json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n")
    return path
