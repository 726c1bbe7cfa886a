"""Rank functions for tests/test_model_parallel_layers.py (importable: the ranks
find them by module path).

``suite()`` runs every check of one world size in one launch and returns, per
check, ``(actual, expected)`` pairs for the test to compare; the references are
computed inside the rank from the same seeds (one process's ``nn.Linear``,
``nn.Embedding``, ``F.cross_entropy``, GPT and AdamW).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn import functional as F

from utils.comm import CommMeter, all_reduce_mean
from utils.dims import ParallelDims
from utils.model_parallel.apply import (
    apply_tensor_parallel,
    full_parameters,
    sync_sequence_parallel_grads,
    tp_group_of,
)
from utils.model_parallel.comm import (
    CopyToTP,
    GatherFromSequence,
    ReduceFromTP,
    ScatterToSequence,
)
from utils.model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from utils.models import GPT, GPTConfig, gpt_batch, shard_batch

CFG = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4)
BATCH, STEPS, LR = 4, 3, 1e-2


def _slice(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of ``t`` along ``dim`` (of ``tp`` equal chunks)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return t.chunk(n, dim)[r]


def _kinds(counts) -> dict[str, int]:
    """CommDebugMode's counts by collective, whichever API issued it (our
    ``c10d.allreduce_`` and DTensor's ``c10d_functional.all_reduce`` alike)."""
    out: dict[str, int] = {}
    for op, k in counts.items():
        name = (
            str(op)
            .replace("allreduce", "all_reduce")
            .replace("allgather", "all_gather")
        )
        for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
            if kind in name:
                out[kind] = out.get(kind, 0) + k
    return out


# ---------------------------------------------------------------- f, g and SP ops
def operators(group) -> dict:
    """f, g and the sequence pair on tensors whose values say where they came from:
    rank r sends r + 1, so a sum over the group is n (n + 1) / 2."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    total = n * (n + 1) / 2
    out = {}
    meter = CommMeter()

    x = torch.full((2, 3), 5.0, requires_grad=True)
    y = CopyToTP.apply(x, group, meter)
    y.backward(torch.full((2, 3), r + 1.0))
    out["f.fwd"] = (y.detach(), torch.full((2, 3), 5.0))
    out["f.bwd"] = (x.grad, torch.full((2, 3), total))

    x = torch.full((2, 3), r + 1.0, requires_grad=True)
    y = ReduceFromTP.apply(x, group, meter)
    y.backward(torch.full((2, 3), r + 1.0))
    out["g.fwd"] = (y.detach(), torch.full((2, 3), total))
    out["g.bwd"] = (x.grad, torch.full((2, 3), r + 1.0))

    x = torch.full((2, 2, 3), r + 1.0, requires_grad=True)
    y = GatherFromSequence.apply(x, group, 1, meter)
    y.backward(torch.full((2, 2 * n, 3), r + 1.0))
    ranks = torch.arange(1.0, n + 1).repeat_interleave(2)
    out["gather.fwd"] = (y.detach(), ranks[None, :, None].expand(2, 2 * n, 3))
    out["gather.bwd"] = (x.grad, torch.full((2, 2, 3), total))

    x = torch.full((2, 2 * n, 3), r + 1.0, requires_grad=True)
    y = ScatterToSequence.apply(x, group, 1, meter)
    y.backward(torch.full((2, 2, 3), r + 1.0))
    out["scatter.fwd"] = (y.detach(), torch.full((2, 2, 3), total))
    out["scatter.bwd"] = (x.grad, ranks[None, :, None].expand(2, 2 * n, 3))
    out["meter_calls"] = dict(meter.calls)
    return out


# ---------------------------------------------------------------- layers vs torch
def _linear_case(kind: str, sp: bool, group) -> dict:
    """One parallel layer against the ``nn.Linear`` it was cut from."""
    torch.manual_seed(1)
    fan_in, fan_out = (8, 16) if kind == "column" else (16, 8)
    ref = nn.Linear(fan_in, fan_out)
    x = torch.randn(2, 8, fan_in)
    dy = torch.randn(2, 8, fan_out)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * dy).sum().backward()

    if kind == "column":
        layer = ColumnParallelLinear.from_linear(ref, group, sequence_parallel=sp)
        x_in = _slice(x, 1, group) if sp else x
        y_want, dy_here = _slice(yr, -1, group), _slice(dy, -1, group)
        dx_want = _slice(xr.grad, 1, group) if sp else xr.grad
    else:
        layer = RowParallelLinear.from_linear(ref, group, sequence_parallel=sp)
        x_in = _slice(x, -1, group)
        y_want = _slice(yr, 1, group) if sp else yr
        dy_here = _slice(dy, 1, group) if sp else dy
        dx_want = _slice(xr.grad, -1, group)
    xi = x_in.clone().requires_grad_()
    y = layer(xi)
    (y * dy_here).sum().backward()

    out = {
        "forward": (y.detach(), y_want.detach()),
        "input_grad": (xi.grad, dx_want),
        "weight": (layer.full_weight(), ref.weight.detach()),
        "weight_grad": (layer.full_weight(grad=True), ref.weight.grad),
    }
    bias_grad = layer.bias.grad
    if kind == "column":
        bias_grad = full_parameters(layer, group, grads=True)["bias"]
    elif sp:  # partial: each rank's tokens only; summed it is the reference
        out["bias_grad_unsynced_is_partial"] = bias_grad.clone()
        bias_grad = bias_grad.clone()
        dist.all_reduce(bias_grad, group=group)
    out["bias_grad"] = (bias_grad, ref.bias.grad)
    out["bias_grad_ref"] = ref.bias.grad
    return out


def layers(group) -> dict:
    out = {}
    for kind in ("column", "row"):
        for sp in (False, True):
            out[f"{kind}{'_sp' if sp else ''}"] = _linear_case(kind, sp, group)
    return out


def vocab(group) -> dict:
    """The vocabulary-parallel embedding and loss against nn.Embedding and
    F.cross_entropy on the whole logits."""
    n = dist.get_world_size(group)
    v = 64
    out = {}
    torch.manual_seed(2)
    ref = nn.Embedding(v, 6)
    ids = torch.randint(0, v, (3, 8))
    ids[0, :n] = torch.arange(n) * (v // n)  # a token in every rank's slice
    dy = torch.randn(3, 8, 6)
    yr = ref(ids)
    (yr * dy).sum().backward()
    for sp in (False, True):
        emb = VocabParallelEmbedding.from_embedding(ref, group, sequence_parallel=sp)
        y = emb(ids)
        (y * (_slice(dy, 1, group) if sp else dy)).sum().backward()
        want = _slice(yr, 1, group) if sp else yr
        tag = "_sp" if sp else ""
        out[f"embedding{tag}.forward"] = (y.detach(), want.detach())
        out[f"embedding{tag}.weight_grad"] = (
            emb.full_weight(grad=True),
            ref.weight.grad,
        )

    for scale in (3.0, 60.0):  # 60: exp overflows without the max shift
        logits = torch.randn(3, 8, v) * scale
        targets = torch.randint(0, v, (3, 8))
        targets[0, :n] = torch.arange(n) * (v // n) + 1  # one in each slice
        full = logits.clone().requires_grad_()
        want = F.cross_entropy(full.flatten(0, 1), targets.flatten())
        want.backward()
        local = _slice(logits, -1, group).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, group)
        loss.backward()
        none = vocab_parallel_cross_entropy(
            local.detach(), targets, group, reduction="none"
        )
        want_none = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        ).view(3, 8)
        out[f"ce_x{scale:g}.loss"] = (loss.detach(), want.detach())
        out[f"ce_x{scale:g}.none"] = (none, want_none)
        out[f"ce_x{scale:g}.grad"] = (local.grad, _slice(full.grad, -1, group))
    return out


# ---------------------------------------------------------------- the whole GPT
def gpt(tp_group, *, sp: bool, tie: bool, dp_group=None) -> dict:
    """STEPS AdamW steps of the rewritten GPT against the single-process one."""
    cfg = GPTConfig(**{**CFG.__dict__, "tie_weights": tie})
    # Why float64: AdamW divides by sqrt(v) + eps, so a gradient that is zero in
    # exact arithmetic (the k biases': softmax ignores a shift shared by all keys)
    # or near eps turns float32's summation-order noise (~1e-9 here) into steps of
    # a good fraction of lr that differ between the two runs; float64's is ~1e-18.
    ref = GPT(cfg, seed=0).double()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    meter = CommMeter()
    model = apply_tensor_parallel(
        GPT(cfg, seed=0).double(), tp_group, sequence_parallel=sp, meter=meter
    )
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    dp = 1 if dp_group is None else dist.get_world_size(dp_group)
    dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
    out = {"losses": [], "ref_losses": [], "counts": {}, "torch_counts": {}}

    def phase(name, fn, *args, **kwargs):
        meter.reset()
        with CommDebugMode() as mode:
            result = fn(*args, **kwargs)
        out["counts"][name] = dict(meter.calls)
        out["torch_counts"][name] = _kinds(mode.get_comm_counts())
        return result

    for step in range(STEPS):
        idx, targets = gpt_batch(cfg, BATCH, seed=0, step=step)
        ref_loss = F.cross_entropy(ref(idx).flatten(0, 1), targets.flatten())
        ref_loss.backward()
        idx, targets = shard_batch((idx, targets), dp_rank, dp)
        logits = phase("forward", model, idx)
        loss = phase(
            "loss", vocab_parallel_cross_entropy, logits, targets, tp_group, meter=meter
        )
        phase("backward", loss.backward)
        if step == 0:
            out["grads_unsynced"] = full_parameters(model, tp_group, grads=True)
        phase(
            "sync", lambda: sync_sequence_parallel_grads(model, tp_group, meter=meter)
        )
        if dp_group is not None:
            all_reduce_mean([p.grad for p in model.parameters()], group=dp_group)
            loss = loss.detach().clone()
            all_reduce_mean([loss], group=dp_group)
        if step == 0:
            out["grads"] = full_parameters(model, tp_group, grads=True)
            out["ref_grads"] = {k: p.grad.clone() for k, p in ref.named_parameters()}
        out["losses"].append(loss.item())
        out["ref_losses"].append(ref_loss.item())
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    out["params"] = full_parameters(model, tp_group)
    out["ref_params"] = {k: p.detach().clone() for k, p in ref.named_parameters()}
    out["sequence_parallel_names"] = sorted(
        k for k, p in model.named_parameters() if getattr(p, "sequence_parallel", 0)
    )
    out["n_heads"] = model.blocks[0].attn.n_heads
    out["tied"] = model.head.weight is model.tok.weight
    return out


# ---------------------------------------------------------------- against torch TP
def _ours(mlp: nn.Sequential, group, sp: bool, meter) -> nn.Sequential:
    layers = [copy.deepcopy(m) for m in mlp]
    i = 1 if isinstance(layers[0], nn.LayerNorm) else 0
    layers[i] = ColumnParallelLinear.from_linear(
        mlp[i], group, sequence_parallel=sp, meter=meter
    )
    layers[i + 2] = RowParallelLinear.from_linear(
        mlp[i + 2], group, sequence_parallel=sp, meter=meter
    )
    if i:
        for p in layers[0].parameters():
            p.sequence_parallel = True
    return nn.Sequential(*layers)


def _torch(mlp: nn.Sequential, mesh, sp: bool) -> nn.Sequential:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    model = copy.deepcopy(mlp)
    i = 1 if isinstance(model[0], nn.LayerNorm) else 0
    if sp:
        plan = {
            str(i): ColwiseParallel(input_layouts=Shard(1)),
            str(i + 2): RowwiseParallel(output_layouts=Shard(1)),
        }
        if i:
            plan["0"] = SequenceParallel()
    else:
        plan = {str(i): ColwiseParallel(), str(i + 2): RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def _run_mlp(model, xi, dy, group, *, ours: bool, sp: bool) -> dict:
    """Forward, backward, (ours, with SP) the grad sync, one AdamW step: each
    phase's collectives by CommDebugMode, and the values after each."""
    counts = {}

    def phase(name, fn):
        with CommDebugMode() as mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CommDebugMode's module hooks
            result = fn()
        counts[name] = _kinds(mode.get_comm_counts())
        return result

    y = phase("forward", lambda: model(xi))
    phase("backward", lambda: (y * dy).sum().backward())
    if ours and sp:
        phase("sync", lambda: sync_sequence_parallel_grads(model, group))
    if ours:
        grads = full_parameters(model, group, grads=True)
    else:  # DTensor gradients, some still Partial: full_tensor() sums those
        grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    phase("step", opt.step)
    if ours:
        params = full_parameters(model, group)
    else:
        params = {k: p.full_tensor() for k, p in model.named_parameters()}
    return {
        "counts": counts,
        "y": y.detach().clone(),
        "x_grad": xi.grad.clone(),
        "grads": grads,
        "params": params,
        "grad_placements": {
            k: str(getattr(p.grad, "placements", "local"))
            for k, p in model.named_parameters()
        },
    }


def against_torch(pm) -> dict:
    """The MLP (and a layer norm + MLP) cut by us and by torch's
    ``parallelize_module``, against the whole MLP: outputs, gradients, parameters
    after one AdamW step, and each phase's collectives (CommDebugMode)."""
    group, mesh = pm.group("tp"), pm.submesh("tp")
    d = 8
    out = {}
    for name, with_norm, sp in (
        ("mlp", False, False),
        ("mlp_sp", False, True),
        ("norm_mlp_sp", True, True),
    ):
        torch.manual_seed(3)
        mods = [nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)]
        mlp = nn.Sequential(*([nn.LayerNorm(d)] if with_norm else []), *mods)
        x, dy = torch.randn(2, 8, d), torch.randn(2, 8, d)
        ref = copy.deepcopy(mlp)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        (yr * dy).sum().backward()
        grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
        torch.optim.AdamW(ref.parameters(), lr=LR).step()
        case = {
            "ref": {
                "y": (_slice(yr, 1, group) if sp else yr).detach(),
                "x_grad": _slice(xr.grad, 1, group) if sp else xr.grad,
                "grads": grads,
                "params": {k: p.detach().clone() for k, p in ref.named_parameters()},
            }
        }
        meter = CommMeter()
        x_here = (_slice(x, 1, group) if sp else x).clone().requires_grad_()
        dy_here = _slice(dy, 1, group) if sp else dy
        for impl in ("ours", "torch"):
            ours = impl == "ours"
            model = _ours(mlp, group, sp, meter) if ours else _torch(mlp, mesh, sp)
            xi = x_here.detach().clone().requires_grad_()
            case[impl] = _run_mlp(model, xi, dy_here, group, ours=ours, sp=sp)
        case["meter_calls"] = dict(meter.calls)
        out[name] = case
    return out


# ---------------------------------------------------------------- one launch
def suite() -> dict:
    """Every check at this world size (tp = world size; at 4 also dp x tp 2 x 2)."""
    n = dist.get_world_size()
    pm = ParallelDims(dp=1, tp=n, pp=1, world_size=n).build()
    group = pm.group("tp")
    out = {
        "rank": dist.get_rank(),
        "tp_rank": dist.get_rank(group),
        "operators": operators(group),
        "layers": layers(group),
        "vocab": vocab(group),
        "torch": against_torch(pm),
        "gpt": {
            (sp, tie): gpt(group, sp=sp, tie=tie)
            for sp in (False, True)
            for tie in (True, False)
        },
    }
    out["tp_group_of"] = [
        dist.get_process_group_ranks(tp_group_of(m))
        for m in (pm, pm.mesh, pm.submesh("tp"), group)
    ]
    try:  # 3 heads cannot be split in 2: refused before the model is touched
        bad = GPT(GPTConfig(vocab_size=64, d_model=24, n_heads=3), seed=0)
        apply_tensor_parallel(bad, pm)
        out["refused"] = None
    except ValueError as e:
        out["refused"] = (str(e), type(bad.blocks[0].attn.q).__name__)
    try:
        twice = apply_tensor_parallel(GPT(CFG, seed=0), group)
        apply_tensor_parallel(twice, group)
        out["refused_twice"] = None
    except ValueError as e:
        out["refused_twice"] = str(e)
    if n == 4:
        pm2 = ParallelDims(dp=2, tp=2, pp=1, world_size=4).build(mesh=False)
        out["gpt_dp_tp"] = {
            sp: gpt(pm2.group("tp"), sp=sp, tie=True, dp_group=pm2.group("dp"))
            for sp in (False, True)
        }
    return out
