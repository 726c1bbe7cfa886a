"""Checks for the exercises of chapter 0, "Why one device is not enough".

* :func:`check_state_bytes` (exercise 0.1): the bytes of parameters, gradients and
  Adam states a model needs for training, compared with
  ``utils.memory_model.model_state_bytes``; :func:`check_optimizer_sharded`, the
  same exercise's question: what sharding only the optimizer states saves, in each
  precision.
* :func:`check_all_reduce` (exercise 0.2): an all-reduce built from reduce-scatter
  and all-gather,
  run in 4 gloo ranks and compared with ``dist.all_reduce``. The learner writes it
  to a file (``%%writefile``) because ranks find code by its module path; each rank
  loads that file by path (:func:`rank_check_all_reduce`).
* :func:`check_crossover_bytes` (exercise 0.3): the message size at which the ring
  all-reduce's bandwidth term equals its latency term, in the alpha-beta model of
  ``utils.comm``.

A check prints one line when the answer is right and raises ``AssertionError``
with what was expected when it is not.
"""

from __future__ import annotations

import math
import traceback

import torch
import torch.distributed as dist

from utils.comm import alpha_beta_time
from utils.exercises import load_function, run_in_ranks
from utils.memory_model import model_state_bytes

_COUNTS = (0, 1, 7, 1000, 124_439_808, 7_000_000_000, 175_000_000_000)


def check_state_bytes(state_bytes) -> None:
    """``state_bytes(num_params, mixed_precision=True)`` must return the bytes of
    ``(params, grads, optimizer)`` that Adam training keeps on one device."""
    for n in _COUNTS:
        for mixed in (True, False):
            m = model_state_bytes(n, mixed_precision=mixed)
            expected = (m.params, m.grads, m.optimizer)
            got = state_bytes(n, mixed_precision=mixed)
            try:
                got = tuple(got)
            except TypeError:
                got = (got,)
            if got != expected:
                kind = "mixed precision" if mixed else "fp32"
                per = tuple(b // n for b in expected) if n else expected
                raise AssertionError(
                    f"state_bytes({n:,}, mixed_precision={mixed}) returned {got!r}; "
                    f"expected (params, grads, optimizer) = {expected} for {kind} "
                    f"Adam, i.e. {per} bytes per parameter"
                )
    print(
        "correct: state_bytes agrees with model_state_bytes on "
        f"{2 * len(_COUNTS)} cases"
    )


SHARDED_PARAMS = 7_000_000_000
SHARDED_DEVICES = 8
"""Exercise 0.1's question: a 7B model, its optimizer states split over 8 devices."""


def check_optimizer_sharded(mixed_bytes, fp32_bytes) -> None:
    """Bytes of model states per device for a 7B model whose optimizer states
    (only those) are split evenly over 8 devices, as ZeRO stage 1 does, in mixed
    precision and in fp32 Adam. Both conventions total 16 B per parameter
    unsharded; the split between the categories decides what sharding saves."""
    expected = {
        mixed: model_state_bytes(
            SHARDED_PARAMS,
            world_size=SHARDED_DEVICES,
            zero_stage=1,
            mixed_precision=mixed,
        ).total
        for mixed in (True, False)
    }
    everything = 16 * SHARDED_PARAMS // SHARDED_DEVICES
    for name, got, mixed in (
        ("mixed_bytes", mixed_bytes, True),
        ("fp32_bytes", fp32_bytes, False),
    ):
        try:
            value = float(got)
        except (TypeError, ValueError):
            raise AssertionError(
                f"{name} must be a number of bytes, got {got!r}"
            ) from None
        if abs(value - expected[mixed]) >= 1:
            per = expected[mixed] / SHARDED_PARAMS
            hint = (
                "that is every state split over the 8 devices; only the optimizer "
                "states are"
                if abs(value - everything) < 1
                else f"expected {per:g} bytes per parameter of the full model"
            )
            raise AssertionError(
                f"{name} = {got!r} bytes per device; {hint} "
                f"(parameters and gradients stay whole on every device)"
            )
    saved = expected[True] / expected[False]
    print(
        f"correct: {expected[True] / 1e9:g} GB (mixed) and {expected[False] / 1e9:g}"
        f" GB (fp32) per device; mixed precision needs {saved:.0%} of fp32's"
    )


_LINKS = ((20e-6, 1 / 5e9, 4), (5e-6, 1 / 100e9, 8), (1e-3, 1 / 1e9, 2))


def check_crossover_bytes(crossover_bytes) -> None:
    """``crossover_bytes(alpha, beta, world_size)`` must return the message size S
    at which the ring all-reduce's two terms are equal: 2(N-1) alpha (latency)
    and 2(N-1)/N S beta (bandwidth)."""
    for alpha, beta, n in _LINKS:
        got = crossover_bytes(alpha, beta, n)
        try:
            size = float(got)
        except (TypeError, ValueError):
            raise AssertionError(
                f"crossover_bytes returned {got!r}, not a number"
            ) from None
        latency = 2 * (n - 1) * alpha
        bandwidth = alpha_beta_time(size, n, 0.0, beta) if size > 0 else 0.0
        if not math.isclose(latency, bandwidth, rel_tol=1e-6):
            raise AssertionError(
                f"crossover_bytes({alpha:g}, {beta:g}, {n}) = {got!r}: at that size "
                f"the bandwidth term is {bandwidth * 1e6:.3g} us but the latency "
                f"term 2(N-1) alpha is {latency * 1e6:.3g} us; they must be equal"
            )
    print(f"correct: the two terms are equal at your size on {len(_LINKS)} links")


# Shapes the check reduces: divisible by 4 ranks, a matrix, and one that is not.
_SHAPES = ((8,), (4, 6), (5,), (1,))
_RS = ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single")
_AG = ("all_gather", "all_gather_into_tensor", "all_gather_single")


def rank_check_all_reduce(path: str, name: str) -> str | None:
    """Runs in each rank: the learner's function against ``dist.all_reduce``.

    While it runs, ``dist.all_reduce`` raises and the reduce-scatter / all-gather
    functions are counted, so an answer must build all-reduce from those two.
    Returns None if every case matches, else what went wrong on this rank.
    """
    rank = dist.get_rank()
    real_all_reduce = dist.all_reduce
    calls = {"rs": 0, "ag": 0}
    saved = {}

    def forbidden(*args, **kwargs):
        raise AssertionError("use reduce-scatter and all-gather, not dist.all_reduce")

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    for attr in (*_RS, *_AG):
        saved[attr] = getattr(dist, attr)
        setattr(dist, attr, counted("rs" if attr in _RS else "ag", saved[attr]))
    saved["all_reduce"] = real_all_reduce
    dist.all_reduce = forbidden
    try:
        fn = load_function(path, name)
        for shape in _SHAPES:
            g = torch.Generator().manual_seed(1 + rank)
            x = torch.randint(-50, 50, shape, generator=g).float()
            expected = x.clone()
            real_all_reduce(expected)
            fn(x)
            if not torch.equal(x, expected):
                return (
                    f"shape {tuple(shape)}: rank {rank} holds {x.flatten().tolist()} "
                    f"after your function, dist.all_reduce gives "
                    f"{expected.flatten().tolist()}"
                )
        if not calls["rs"] or not calls["ag"]:
            return (
                f"rank {rank} made {calls['rs']} reduce-scatter and {calls['ag']} "
                "all-gather calls: build the all-reduce from both"
            )
    except AssertionError as err:
        return f"rank {rank}: {err}"
    except Exception:
        return f"rank {rank} raised:\n{traceback.format_exc()}"
    finally:
        for attr, fn in saved.items():
            setattr(dist, attr, fn)
    return None


def check_all_reduce(path, name: str = "all_reduce", world_size: int = 4) -> None:
    """Run the function ``name`` of the file ``path`` in ``world_size`` gloo ranks on
    tensors of several shapes (one not divisible by ``world_size``); it must sum
    its argument over the ranks in place, as ``dist.all_reduce`` does."""
    problems = run_in_ranks(
        rank_check_all_reduce, path, name, world_size=world_size, timeout=30.0
    )
    wrong = [p for p in problems if p]
    if wrong:
        raise AssertionError("\n".join(wrong))
    shapes = ", ".join(str(s) for s in _SHAPES)
    print(f"correct: {name} equals dist.all_reduce on {world_size} ranks ({shapes})")
