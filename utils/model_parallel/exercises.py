"""Checks for the exercises of chapter 4, "Model parallelism: layers and tensors".

* :func:`check_row_parallel` (exercise 4.1): the row-parallel forward (a partial
  product with this rank's columns of the weight, completed by ``g``, the bias
  added once), written by the learner to a file (ranks find code by path), run in
  2 gloo ranks against ``nn.Linear``: output, and the gradients of the input
  slice, the weight shard and the bias.
* :func:`check_g` (exercise 4.2): Megatron-LM's ``g`` as an autograd Function,
  run in 2 gloo ranks on its own (sum forward, identity backward, the input left
  alone) and inside a tensor-parallel MLP against one process.
* :func:`check_tp_costs` (exercise 4.3): per-rank parameter bytes and per-layer
  bytes on the wire for a model and t, against the parameters of real models
  counted by the rewrite's own table (``apply.TP_PLAN``) and the collectives' bus
  factors (``utils.comm.bytes_sent``); no process.
* :func:`check_sp_step` (exercise 4.4): a sequence-parallel training step, run in
  2 gloo ranks on the course GPT against one process; :func:`measure_sp_step`
  returns what differed (the chapter shows it for the buggy snippet).

A check prints one line when the answer is right and raises ``AssertionError``
with what was expected when it is not.
"""

from __future__ import annotations

import fnmatch
import math
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from utils.comm import bytes_sent
from utils.exercises import load_function, run_in_ranks
from utils.model_parallel.apply import (
    TP_PLAN,
    apply_tensor_parallel,
    full_parameters,
)
from utils.model_parallel.layers import ColumnParallelLinear
from utils.models import GPT, GPTConfig, gpt_batch
from utils.report import field_of

__all__ = [
    "SP_CONFIG",
    "check_g",
    "check_row_parallel",
    "check_sp_step",
    "check_tp_costs",
    "measure_sp_step",
    "param_split",
    "tp_costs",
]

WORLD_SIZE = 2
"""Ranks the rank checks run on: one tensor-parallel group of t = 2."""

_C10D_AUTOGRAD = "an autograd kernel was not registered"
"""What torch warns when autograd backpropagates through a c10d collective
(``torch/csrc/autograd/autograd_not_implemented_fallback.cpp``): it passes the
gradient through as if the op were the identity, "may lead to silently incorrect
behavior", and is deprecated."""


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, inf if the shapes differ."""
    if a.shape != b.shape:
        return math.inf
    return (a - b).abs().max().item()


def _errors(results: list[dict]) -> None:
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        raise AssertionError("\n".join(errors))


def _autograd_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if _C10D_AUTOGRAD in str(w.message)]


# -------------------------------------------------------------- 4.1: row-parallel
ROW_SIZES = (16, 12)
"""(in_features, out_features) of exercise 4.1's layer."""
ROW_BATCH = (3, 5)


def rank_check_row_parallel(path: str, name: str) -> dict:
    """Runs in each rank: the learner's row-parallel forward against nn.Linear."""
    rank, n = dist.get_rank(), dist.get_world_size()
    try:
        fn = load_function(path, name)
        torch.manual_seed(0)  # the same layer, input and gradient on every rank
        full = nn.Linear(*ROW_SIZES)
        nn.init.normal_(full.bias)  # a bias that cannot be mistaken for zero
        x = torch.randn(*ROW_BATCH, ROW_SIZES[0], requires_grad=True)
        grad_out = torch.randn(*ROW_BATCH, ROW_SIZES[1])
        want = full(x)
        want.backward(grad_out)
        k = ROW_SIZES[0] // n
        cols = slice(rank * k, (rank + 1) * k)
        x_mine = x.detach()[..., cols].clone().requires_grad_(True)
        w_mine = full.weight.detach()[:, cols].clone().requires_grad_(True)
        bias = full.bias.detach().clone().requires_grad_(True)
        x_before = x_mine.detach().clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fn(x_mine, w_mine, bias, dist.group.WORLD)
            if not isinstance(got, torch.Tensor):
                return {"error": f"rank {rank}: {name} returned {type(got).__name__}"}
            out_diff = _close(got.detach(), want.detach())
            differentiable = got.requires_grad
            if differentiable:
                got.backward(grad_out)
        result = {
            "shape": tuple(got.shape),
            "want_shape": tuple(want.shape),
            "out": out_diff,
            "differentiable": differentiable,
            "input_changed": _close(x_mine.detach(), x_before) > 0,
            "warnings": _autograd_warnings(caught),
            "error": None,
        }
        for key, mine, full_grad in (
            ("grad_x", x_mine.grad, x.grad[..., cols]),
            ("grad_w", w_mine.grad, full.weight.grad[:, cols]),
            ("grad_b", bias.grad, full.bias.grad),
        ):
            result[key] = math.inf if mine is None else _close(mine, full_grad)
        partial = (x_mine.detach() @ w_mine.detach().T).detach()
        result["looks_like"] = _looks_like(
            got.detach(), want.detach(), full.bias.detach(), partial, n
        )
        return result
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def _looks_like(got, want, bias, partial, n: int) -> str | None:
    """Which plausible slip ``got`` equals: the bias summed n times, the mean of
    the partial products instead of their sum, or this rank's partial product
    alone (with the bias); None if none of them."""
    if got.shape != want.shape:
        return None
    candidates = {
        "bias_n_times": want + (n - 1) * bias,
        "mean": (want - bias) / n + bias,
        "partial": partial + bias,
    }
    for name, value in candidates.items():
        if _close(got, value) < 1e-5:
            return name
    return None


def check_row_parallel(path, name: str = "row_parallel_forward") -> None:
    """Run ``name(x, weight, bias, group)`` from the file ``path`` on 2 gloo ranks.

    Rank r gets its slice of the input's features ``x[..., r k:(r+1) k]``, its
    columns of the weight ``weight[:, r k:(r+1) k]`` (k = in_features / 2) and the
    whole bias; the result must be the whole ``nn.Linear`` output on every rank,
    and its backward must give the slices of the input's and the weight's
    gradients and the bias's whole gradient, with no collective that autograd
    passes through unregistered."""
    results = run_in_ranks(
        rank_check_row_parallel, path, name, world_size=WORLD_SIZE, timeout=60.0
    )
    _errors(results)
    tol = 1e-5
    for rank, r in enumerate(results):
        where = f"rank {rank}"
        if r["shape"] != r["want_shape"]:
            raise AssertionError(
                f"{where}: the output has shape {r['shape']}, expected "
                f"{r['want_shape']}: every rank must end with the whole output "
                f"(all out_features), which a sum of the partial products gives; "
                f"concatenating them (all-gather) is a column layer's output"
            )
        if r["out"] > tol:
            hint = {
                "bias_n_times": f"the bias is added {WORLD_SIZE} times: you add it "
                "on every rank before the sum; add it once, after the all-reduce",
                "mean": "the partial products are averaged: each rank holds a "
                "partial sum over its input features, which must be summed over "
                "the group, not averaged",
                "partial": "this is your rank's partial product alone: it must "
                "be summed over the group (g) before the bias is added",
            }.get(
                r["looks_like"],
                "compute x @ weight.T with your slices, sum the partial products "
                "over the group (g), then add the bias",
            )
            raise AssertionError(
                f"{where}: the output differs from nn.Linear by {r['out']:.3g}: {hint}"
            )
        if r["input_changed"]:
            raise AssertionError(f"{where}: your forward changed its input x in place")
        if r["warnings"]:
            raise AssertionError(
                f"{where}: the values are right, but autograd backpropagated "
                f"through a collective it has no formula for; torch warns: "
                f"'{r['warnings'][0][:160]}...'. It passes the gradient through "
                f"unchanged, which happens to be g's backward, and is deprecated: "
                f"wrap the all-reduce in an autograd Function (ReduceFromTP, or "
                f"your G of exercise 4.2)"
            )
        if not r["differentiable"]:
            raise AssertionError(
                f"{where}: the output does not require grad: autograd cannot "
                f"reach the weight (was the sum done on a detached tensor?)"
            )
        for key, what in (
            ("grad_x", "the input slice's"),
            ("grad_w", "the weight shard's"),
            ("grad_b", "the bias's"),
        ):
            if r[key] > tol:
                raise AssertionError(
                    f"{where}: {what} gradient differs from nn.Linear's by "
                    f"{r[key]:.3g}: g's backward is the identity (every rank "
                    f"already holds the whole output's gradient)"
                )
    print(
        f"correct: on {WORLD_SIZE} ranks, the whole output of nn.Linear"
        f"{ROW_SIZES} on every rank, and the gradients of each rank's input "
        f"slice, weight columns and the bias equal the single layer's"
    )


# -------------------------------------------------------------- 4.2: g
MLP_WIDTH = 8
"""h of exercise 4.2's MLP: fc h -> 4h (column-parallel), proj 4h -> h (row)."""


def rank_check_g(path: str, name: str) -> dict:
    """Runs in each rank: the learner's g on its own and inside a parallel MLP."""
    rank, n = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    try:
        g = load_function(path, name)
        is_function = isinstance(g, type) and issubclass(g, torch.autograd.Function)
        if not is_function:
            return {"is_function": False, "error": None}
        torch.manual_seed(0)
        parts = torch.randn(n, 4, 6)  # every rank's partial sum, known to all
        upstream = torch.randn(4, 6)  # the same on every rank, as after g
        x = parts[rank].clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = g.apply(x, group)
            alone = {
                "out": _close(y.detach(), parts.sum(0)),
                "identity": _close(y.detach(), parts[rank]) < 1e-6,
                "input_changed": _close(x.detach(), parts[rank]) > 0,
                "differentiable": bool(y.requires_grad),
            }
            if y.requires_grad:
                y.backward(upstream)
            alone["grad"] = math.inf if x.grad is None else _close(x.grad, upstream)
            alone["grad_ratio"] = (
                None
                if x.grad is None
                else (x.grad.reshape(-1) @ upstream.reshape(-1)).item()
                / (upstream.reshape(-1) @ upstream.reshape(-1)).item()
            )
            mlp = _mlp_in_ranks(g, group) if alone["grad"] < 1e-6 else None
        return {
            "is_function": True,
            **alone,
            "mlp": mlp,
            "warnings": _autograd_warnings(caught),
            "error": None,
        }
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def _mlp_in_ranks(g, group) -> dict:
    """Megatron-LM's MLP with the learner's g after the row layer, against one
    process: {"out", "grad_x", "grad_fc", "grad_proj", "grad_bias"} differences."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    h = MLP_WIDTH
    torch.manual_seed(1)
    fc, proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
    x = torch.randn(3, 5, h, requires_grad=True)
    grad_out = torch.randn(3, 5, h)
    want = proj(F.gelu(fc(x)))
    want.backward(grad_out)
    col = ColumnParallelLinear.from_linear(fc, group)  # f inside
    k = 4 * h // n
    w = proj.weight.detach()[:, rank * k : (rank + 1) * k].clone().requires_grad_()
    bias = proj.bias.detach().clone().requires_grad_()
    x_mine = x.detach().clone().requires_grad_()
    partial = F.linear(F.gelu(col(x_mine)), w)
    out = g.apply(partial, group) + bias
    out.backward(grad_out)
    rows = slice(rank * k, (rank + 1) * k)
    return {
        "out": _close(out.detach(), want.detach()),
        "grad_x": _close(x_mine.grad, x.grad),
        "grad_fc": _close(col.weight.grad, fc.weight.grad[rows]),
        "grad_proj": _close(w.grad, proj.weight.grad[:, rows]),
        "grad_bias": _close(bias.grad, proj.bias.grad),
    }


def check_g(path, name: str = "G") -> None:
    """Run the autograd Function ``name`` from the file ``path`` on 2 gloo ranks:
    ``name.apply(x, group)`` must return the sum of every rank's ``x`` (leaving
    ``x`` as it was), and its backward the incoming gradient unchanged; then, in a
    Megatron-LM MLP (column-parallel fc, GELU, row-parallel proj, ``name`` after
    it), the output and every gradient must equal one process's."""
    results = run_in_ranks(rank_check_g, path, name, world_size=WORLD_SIZE)
    _errors(results)
    tol = 1e-5
    for rank, r in enumerate(results):
        where = f"rank {rank}"
        if not r["is_function"]:
            raise AssertionError(
                f"{name} is not a subclass of torch.autograd.Function: write "
                f"class {name}(torch.autograd.Function) with static forward(ctx, "
                f"x, group) and backward(ctx, grad)"
            )
        if r["out"] > tol:
            raise AssertionError(
                f"{where}: {name}.apply(x, group) differs from the sum of the "
                f"ranks' x by {r['out']:.3g}: g all-reduces (sums) in forward"
                + (": it returns x, the identity forward of f" if r["identity"] else "")
            )
        if r["input_changed"]:
            raise AssertionError(
                f"{where}: the forward changed its input x in place (dist."
                f"all_reduce(x) sums into x): other users of x would read the "
                f"sum. Sum a copy: out = x.clone(); dist.all_reduce(out, "
                f"group=group)"
            )
        if r["warnings"]:
            raise AssertionError(
                f"{where}: autograd backpropagated through a collective it has "
                f"no formula for ('{r['warnings'][0][:120]}...'): do the "
                f"all-reduce inside {name}.forward, where autograd does not trace"
            )
        if not r["differentiable"]:
            raise AssertionError(
                f"{where}: the output does not require grad: return a new tensor "
                f"from forward (not a detached one) and let autograd call backward"
            )
        if r["grad"] > tol:
            ratio = r["grad_ratio"]
            hint = "g's backward is the identity: return grad (and None for group)"
            if ratio is not None and abs(ratio - WORLD_SIZE) < 0.01:
                hint = (
                    f"the gradient came back {WORLD_SIZE} times too large: the "
                    f"backward all-reduces, which is f's backward. After g every "
                    f"rank holds the same output, so the gradient that arrives is "
                    f"already the whole one: return it unchanged"
                )
            elif ratio is not None and abs(ratio - 1 / WORLD_SIZE) < 0.01:
                hint = (
                    f"the gradient came back divided by {WORLD_SIZE}: the sum in "
                    f"forward has derivative 1 for every rank's input"
                )
            raise AssertionError(
                f"{where}: x's gradient differs from the incoming one by "
                f"{r['grad']:.3g}: {hint}"
            )
        worst = max(r["mlp"].items(), key=lambda kv: kv[1])
        if worst[1] > tol:
            raise AssertionError(
                f"{where}: in the parallel MLP, {worst[0]} differs from one "
                f"process by {worst[1]:.3g}"
            )
    print(
        f"correct: {name} sums over {WORLD_SIZE} ranks in forward, leaves its "
        f"input alone, passes the gradient through, and a column-parallel fc + "
        f"row-parallel proj + {name} MLP equals one process, output and gradients"
    )


# -------------------------------------------------------------- 4.3: costs
_SHARDED_STYLES = {
    "column": ("weight", "bias"),
    "column_shared_input": ("weight", "bias"),
    "vocab_head": ("weight", "bias"),
    "row": ("weight",),  # its bias is added once, after the sum: whole
    "vocab_embedding": ("weight",),
}


def param_split(gpt: GPTConfig) -> tuple[int, int]:
    """(sharded, replicated) parameters of the course GPT under ``TP_PLAN``,
    counted on a real model: a parameter is sharded when a module the table
    rewrites holds it in a sharded role, replicated otherwise; a tied one counts
    once."""
    model = GPT(gpt)
    sharded_ids = set()
    for name, module in model.named_modules():
        for pattern, style in TP_PLAN:
            if fnmatch.fnmatchcase(name, pattern):
                for attr in _SHARDED_STYLES.get(style, ()):
                    p = getattr(module, attr, None)
                    if p is not None:
                        sharded_ids.add(id(p))
    unique = {id(p): p for p in model.parameters()}
    sharded = sum(p.numel() for k, p in unique.items() if k in sharded_ids)
    return sharded, sum(p.numel() for p in unique.values()) - sharded


def tp_costs(
    gpt: GPTConfig, tp: int, batch_size: int, bytes_per_element: int = 4
) -> tuple[int, int]:
    """The reference answer of exercise 4.3: (parameter bytes one rank holds,
    bytes one rank sends per transformer layer per step) for the course GPT split
    over ``tp`` ranks (``batch_size`` sequences per rank, modelled bytes)."""
    sharded, replicated = param_split(gpt)
    params = (sharded // tp + replicated) * bytes_per_element
    activation = batch_size * gpt.seq_len * gpt.d_model * bytes_per_element
    # two all-reduces forward (g after attention, g after the MLP), two backward
    # (f before each): Narayanan et al. 2021, sec. 3.2
    wire = 4 * bytes_sent("all_reduce", activation, tp)
    return params, wire


COST_CASES = [
    (GPTConfig(vocab_size=v, seq_len=s, d_model=h, n_layers=n, n_heads=a,
               tie_weights=tie), t, b, e)
    for (v, s, h, n, a) in ((64, 16, 32, 2, 4), (128, 32, 64, 3, 8), (96, 24, 48, 1, 4))
    for tie in (True, False)
    for t in (1, 2, 4)
    for b, e in ((4, 4), (2, 2))
]  # fmt: skip
"""Models, t, sequences per rank and bytes per element the check asks about."""


def check_tp_costs(fn, reports=None) -> None:
    """``fn(gpt, tp, batch_size, bytes_per_element)`` must return (parameter bytes
    per rank, bytes sent per layer per step) for every case of :data:`COST_CASES`
    (tied and untied; fp32 and 16-bit), and, with ``reports`` (runs of
    ``labs.model_parallel`` in tensor mode), the parameter bytes each rank's ledger
    measured."""
    for gpt, t, b, e in COST_CASES:
        want = tp_costs(gpt, t, b, e)
        got = fn(gpt, t, b, e)
        where = (
            f"h={gpt.d_model}, L={gpt.n_layers}, v={gpt.vocab_size}, "
            f"s={gpt.seq_len}, {'tied' if gpt.tie_weights else 'untied'}, t={t}, "
            f"b={b}, {e} bytes/element"
        )
        if not isinstance(got, tuple | list) or len(got) != 2:
            raise AssertionError(
                f"{where}: return (param_bytes, wire_bytes), got {got!r}"
            )
        sharded, replicated = param_split(gpt)
        if abs(got[0] - want[0]) > 0.5:
            hint = (
                f"{sharded:,} parameters are cut into t shards, {replicated:,} "
                f"(layer norms, row biases, positions) stay whole on every rank"
            )
            if abs(got[0] - (sharded + replicated) * e / t) < 0.5:
                hint = "not everything is divided by t: " + hint
            raise AssertionError(
                f"{where}: parameter bytes {got[0]:,}, expected {want[0]:,}: {hint}"
            )
        if abs(got[1] - want[1]) > 0.5:
            raise AssertionError(
                f"{where}: bytes per layer {got[1]:,}, expected {want[1]:,}: two "
                f"all-reduces of b s h elements forward and two backward, each "
                f"sending 2 (t-1)/t of its buffer per rank"
            )
    measured = 0
    for run in reports or ():
        for r in run:
            extra = field_of(r, "extra")
            cfg, state = field_of(extra, "config"), field_of(extra, "state_bytes")
            if cfg["mode"] != "tensor":
                continue
            gpt = GPTConfig(
                vocab_size=cfg["vocab_size"],
                seq_len=cfg["seq_len"],
                d_model=cfg["d_model"],
                n_layers=cfg["n_layers"],
                n_heads=cfg["n_heads"],
                tie_weights=cfg["tie_weights"],
            )
            t = cfg["tp_size"] or cfg["world_size"] // cfg["dp_size"]
            e = 2 if cfg["precision"] == "bf16" else 4
            got = fn(gpt, t, cfg["batch_size"] // cfg["dp_size"], e)[0]
            if abs(got - state["params"]) > 0.5:
                raise AssertionError(
                    f"a lab run at t={t} measured {state['params']:,} parameter "
                    f"bytes per rank; you predict {got:,}"
                )
            measured += 1
    extra = f", and {measured} ranks' measured parameter bytes" if measured else ""
    print(f"correct: {len(COST_CASES)} cases (models x t x batch x dtype){extra}")


# -------------------------------------------------------------- 4.4: SP step
SP_CONFIG = GPTConfig(
    vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2, tie_weights=False
)
"""Exercise 4.4's GPT: 2 blocks, h = 16, s = 8 tokens (4 per rank)."""
SP_STEPS, SP_BATCH, SP_LR = 3, 4, 0.5


def rank_check_sp_step(path: str, name: str) -> dict:
    """Runs in each rank: the learner's sequence-parallel step on the course GPT,
    then every parameter against one process trained the same way (SGD)."""
    rank = dist.get_rank()
    group = dist.group.WORLD
    try:
        step = load_function(path, name)
        model = GPT(SP_CONFIG, seed=0)
        apply_tensor_parallel(model, group, sequence_parallel=True)
        opt = torch.optim.SGD(model.parameters(), lr=SP_LR)
        ref = GPT(SP_CONFIG, seed=0)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=SP_LR)
        for s in range(SP_STEPS):
            x, y = gpt_batch(SP_CONFIG, SP_BATCH, seed=0, step=s)
            step(model, x, y, opt, group)
            ref_opt.zero_grad()
            F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
            ref_opt.step()
        whole = full_parameters(model, group)
        want = dict(ref.named_parameters())
        diff = {k: _close(v, want[k].detach()) for k, v in whole.items()}
        # replicated parameters: how far apart the ranks' copies drifted
        spread = {}
        for k, p in model.named_parameters():
            if getattr(p, "tensor_parallel_dim", None) is None:
                both = [torch.empty_like(p) for _ in range(dist.get_world_size())]
                dist.all_gather(both, p.detach().contiguous())
                spread[k] = _close(both[0], both[1])
        return {"diff": diff, "spread": spread, "error": None}
    except Exception:
        return {"error": f"rank {rank} raised:\n{traceback.format_exc()}"}


def _kind(name: str) -> str:
    if ".ln" in name or name.startswith("ln_f"):
        return "layer norms"
    if name.endswith("proj.bias"):
        return "row-parallel biases"
    if name.startswith("pos."):
        return "position embedding"
    return "sharded parameters"


def measure_sp_step(path, name: str = "sp_train_step") -> dict:
    """Run the step ``name(model, x, y, opt, group)`` from the file ``path`` for
    :data:`SP_STEPS` SGD steps on 2 ranks of a sequence-parallel GPT. Returns
    {"diff": {parameter: largest difference from one process}, "spread":
    {replicated parameter: largest difference between the ranks' copies},
    "by_kind": {kind: largest diff}} (rank 0's, spread from both)."""
    results = run_in_ranks(rank_check_sp_step, path, name, world_size=WORLD_SIZE)
    _errors(results)
    r = results[0]
    by_kind: dict[str, float] = {}
    for k, v in r["diff"].items():
        by_kind[_kind(k)] = max(by_kind.get(_kind(k), 0.0), v)
    return {**r, "by_kind": by_kind}


def check_sp_step(path, name: str = "sp_train_step") -> None:
    """Refused unless, after :data:`SP_STEPS` steps of ``name`` on 2 ranks with
    sequence parallelism, every parameter (shards gathered) equals one process's
    to 1e-5 and the ranks' copies of every replicated parameter agree."""
    m = measure_sp_step(path, name)
    tol = 1e-5
    bad = {k: v for k, v in m["by_kind"].items() if v > tol}
    if bad:
        kinds = ", ".join(f"{k} (up to {v:.2g})" for k, v in sorted(bad.items()))
        drift = max(m["spread"].values(), default=0.0)
        raise AssertionError(
            f"after {SP_STEPS} steps these differ from one process: {kinds}; the "
            f"two ranks' copies of the replicated parameters are up to "
            f"{drift:.2g} apart. Under sequence parallelism each rank's gradient "
            f"of a replicated parameter covers only its s/t tokens."
        )
    print(
        f"correct: after {SP_STEPS} SGD steps with sequence parallelism on "
        f"{WORLD_SIZE} ranks every parameter equals one process's (largest "
        f"difference {max(m['diff'].values()):.1e}), and the ranks' replicated "
        f"copies agree"
    )
