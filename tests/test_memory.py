"""utils.memory: the analytic models (ZeRO stages, activations) and the MemoryTracker.

Run: ``.venv/bin/python -m pytest tests/test_memory.py -q`` (no GPU, no launcher: the
torch.distributed cases run in a one-process gloo world).
"""

from __future__ import annotations

import gc
import json
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from utils.memory import MemoryTracker, tensor_bytes
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    PAPER_EXAMPLES,
    convention_state_bytes,
    mlp_activation_bytes,
    model_state_bytes,
    paper_examples,
    shard_numel,
    transformer_activation_bytes,
)
from utils.report import CATEGORIES

# Importing torch.distributed.optim warns about torch.jit; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# ============================================================ model-state formulas
# num_params = 1000 (not a multiple of 64: the 64-way shard is ceil(1000/64) = 16).
# (world_size, zero_stage) -> (params, grads, optimizer) bytes, worked by hand.
MIXED_1000 = {
    (2, 1): (2000, 2000, 6000),  # 2+2 replicated, 12 * 500
    (2, 2): (2000, 1000, 6000),  # grads 2 * 500
    (2, 3): (1000, 1000, 6000),
    (4, 1): (2000, 2000, 3000),  # 12 * 250
    (4, 2): (2000, 500, 3000),
    (4, 3): (500, 500, 3000),
    (64, 1): (2000, 2000, 192),  # 12 * 16
    (64, 2): (2000, 32, 192),
    (64, 3): (32, 32, 192),
}
FP32_1000 = {
    (2, 1): (4000, 4000, 4000),  # 4+4 replicated, 8 * 500
    (2, 2): (4000, 2000, 4000),
    (2, 3): (2000, 2000, 4000),
    (4, 1): (4000, 4000, 2000),
    (4, 2): (4000, 1000, 2000),
    (4, 3): (1000, 1000, 2000),
    (64, 1): (4000, 4000, 128),  # 8 * 16
    (64, 2): (4000, 64, 128),
    (64, 3): (64, 64, 128),
}


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 4, 64])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_state_bytes_by_hand(mixed, world_size, stage):
    got = model_state_bytes(
        1000, world_size=world_size, zero_stage=stage, mixed_precision=mixed
    )
    unsharded = (2000, 2000, 12000) if mixed else (4000, 4000, 8000)
    table = MIXED_1000 if mixed else FP32_1000
    want = unsharded if stage == 0 or world_size == 1 else table[world_size, stage]
    assert (got.params, got.grads, got.optimizer) == want
    assert got.total == sum(want)
    assert all(type(v) is int for v in (got.params, got.grads, got.optimizer))


def test_model_state_bytes_is_frozen_and_zero_params_is_zero():
    b = model_state_bytes(0, world_size=8, zero_stage=3)
    assert b.total == 0
    with pytest.raises(AttributeError):
        b.params = 1  # type: ignore[misc]
    assert b.as_dict() == {"params": 0, "grads": 0, "optimizer": 0}


def test_shard_is_the_padded_ceiling():
    assert shard_numel(10, 4) == 3  # a flat buffer of 12, the last 2 elements padding
    assert shard_numel(12, 4) == 3
    assert model_state_bytes(10, world_size=4, zero_stage=3).params == 2 * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_params": -1}, "num_params.*-1"),
        ({"num_params": 1.5}, "num_params.*1.5"),
        ({"num_params": 10.0}, "num_params.*10.0"),
        ({"num_params": True}, "num_params.*True"),
        ({"num_params": "10"}, "num_params"),
        ({"num_params": 10, "zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3.*4"),
        ({"num_params": 10, "zero_stage": -1}, "zero_stage.*-1"),
        ({"num_params": 10, "zero_stage": 1.0}, "zero_stage.*1.0"),
        ({"num_params": 10, "zero_stage": True}, "zero_stage.*True"),
        ({"num_params": 10, "world_size": 0}, "world_size.*>= 1.*0"),
        ({"num_params": 10, "world_size": 2.0}, "world_size.*2.0"),
        ({"num_params": 10, "world_size": True}, "world_size.*True"),
        ({"num_params": 10, "mixed_precision": 1}, "mixed_precision"),
    ],
)
def test_model_state_bytes_rejects_bad_input(kwargs, match):
    num_params = kwargs.pop("num_params")
    with pytest.raises(ValueError, match=match):
        model_state_bytes(num_params, **kwargs)


@pytest.mark.parametrize("example", PAPER_EXAMPLES, ids=str)
def test_zero_paper_examples(example):
    # GB = 1e9 bytes, as the paper; the printed value is the formula rounded half up.
    assert example.rounded_gb() == pytest.approx(example.printed_gb, abs=1e-12)


def test_zero_paper_figure_1_exact_values():
    psi, nd = 7_500_000_000, 64
    totals = [
        model_state_bytes(psi, world_size=nd, zero_stage=s).total for s in range(4)
    ]
    # (2+2+12)Psi; 4Psi + 12Psi/64; 2Psi + 14Psi/64; 16Psi/64, in bytes
    assert totals == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]
    rows = paper_examples()
    assert len(rows) == len(PAPER_EXAMPLES)
    assert rows[0]["exact_gb"] == 120.0
    json.dumps(rows)


def test_conventions_totals_and_splits():
    conv = BYTES_PER_PARAM_CONVENTIONS
    want = {
        "mixed-16": {"params": 2, "grads": 2, "optimizer": 12},
        "mixed-18": {"params": 2, "grads": 4, "optimizer": 12},
        "mixed-20": {"params": 2, "grads": 6, "optimizer": 12},
        "fp32-16": {"params": 4, "grads": 4, "optimizer": 8},
    }
    assert set(conv) == set(want)
    for key, split in want.items():
        assert conv[key].split() == split
        assert conv[key].bytes_per_param == sum(split.values())
        assert conv[key].key == key and conv[key].label and conv[key].used_by


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 3, 64])
def test_convention_16_is_model_state_bytes(stage, world_size):
    for key, mixed in (("mixed-16", True), ("fp32-16", False)):
        a = convention_state_bytes(key, 12345, world_size=world_size, zero_stage=stage)
        b = model_state_bytes(
            12345, world_size=world_size, zero_stage=stage, mixed_precision=mixed
        )
        assert a == b


def test_conventions_match_their_sources():
    n, d = 64_000, 8  # d divides n: no padding
    per = {}
    for key in BYTES_PER_PARAM_CONVENTIONS:
        per[key] = [
            convention_state_bytes(key, n, world_size=d, zero_stage=s).total / n
            for s in range(4)
        ]
    # Megatron-LM distributed optimizer (about ZeRO stage 1): 4 + 16/d, 6 + 12/d,
    # 8 + 8/d; non-distributed 20, 18, 16.
    assert per["mixed-20"][0] == 20 and per["mixed-20"][1] == 4 + 16 / d
    assert per["mixed-18"][0] == 18 and per["mixed-18"][1] == 6 + 12 / d
    assert per["fp32-16"][0] == 16 and per["fp32-16"][1] == 8 + 8 / d
    # DeepSpeed estimators: ZeRO-2 2 + 18/N, ZeRO-3 18/N (without the largest layer).
    assert per["mixed-20"][2] == 2 + 18 / d
    assert per["mixed-18"][3] == 18 / d
    # The ZeRO paper: 4 + 12/N, 2 + 14/N, 16/N.
    assert per["mixed-16"][1:] == [4 + 12 / d, 2 + 14 / d, 16 / d]


def test_convention_rejects_unknown_names():
    with pytest.raises(ValueError, match="convention must be one of.*'mixed-17'"):
        convention_state_bytes("mixed-17", 10)
    with pytest.raises(ValueError, match="zero_stage"):
        convention_state_bytes("mixed-18", 10, zero_stage=5)


# ============================================================ activation formulas
GPT3 = {"seq_len": 2048, "micro_batch": 1, "hidden": 12288, "heads": 96}


def test_korthikanti_per_layer_formula():
    s, b, h, a = 2048, 1, 12288, 96
    assert 5 * a * s // h == 80  # the paper's attention term for GPT-3 175B
    assert transformer_activation_bytes(**GPT3) == s * b * h * (34 + 80)
    assert transformer_activation_bytes(**GPT3, layers=96) == 96 * s * b * h * 114


def test_korthikanti_parallel_and_recompute_variants():
    sbh, t = 2048 * 12288, 8
    tp = transformer_activation_bytes(**GPT3, tp_size=t)
    assert tp == sbh * (10 + 24 / t + 80 / t)  # sbh(10 + 24/t + 5as/(ht))
    sp = transformer_activation_bytes(**GPT3, tp_size=t, sequence_parallel=True)
    assert sp == sbh * (34 + 80) / t  # sbh(34/t + 5as/(ht))
    sel = transformer_activation_bytes(**GPT3, tp_size=t, recompute="selective")
    assert sel == sbh * (10 + 24 / t)
    both = transformer_activation_bytes(
        **GPT3, tp_size=t, sequence_parallel=True, recompute="selective"
    )
    assert both == sbh * 34 / t
    for sp_flag in (False, True):
        full = transformer_activation_bytes(
            **GPT3, tp_size=t, sequence_parallel=sp_flag, recompute="full"
        )
        assert full == 2 * sbh  # Table 2: sbh * 2
    # The abstract's "reduce activation memory by 5x" (vs tensor parallel alone).
    assert tp / both > 5
    # t = 1: every tensor-parallel form is the plain one.
    plain = transformer_activation_bytes(**GPT3)
    assert transformer_activation_bytes(**GPT3, sequence_parallel=True) == plain


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"heads": 2.0}, "heads"),
        ({"tp_size": 0}, "tp_size"),
        ({"layers": -1}, "layers"),
        ({"recompute": "some"}, "recompute must be one of"),
        ({"sequence_parallel": 1}, "sequence_parallel"),
    ],
)
def test_activation_formula_rejects_bad_input(kwargs, match):
    args = dict(GPT3) | kwargs
    with pytest.raises(ValueError, match=match):
        transformer_activation_bytes(**args)


def test_mlp_formula_and_validation():
    assert mlp_activation_bytes(32, [64, 128, 128, 10]) == 32 * (64 + 128 + 128) * 4
    assert mlp_activation_bytes(2, [3, 5], bytes_per_element=2) == 2 * 3 * 2
    for bad in ([4], [4, 0], [4, 2.0], 7):
        with pytest.raises(ValueError, match="sizes"):
            mlp_activation_bytes(2, bad)
    with pytest.raises(ValueError, match="batch"):
        mlp_activation_bytes(0, [3, 4])


# ==================================================================== the tracker
def make_mlp(sizes, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def train(mem, model, opt, x, steps=2):
    with mem:
        mem.mark("init")
        for step in range(steps):
            loss = model(x).sum()
            mem.mark("forward", step=step)
            loss.backward()
            mem.mark("backward", step=step)
            opt.step()
            opt.zero_grad()
            mem.mark("step", step=step)
    return mem.timeline()


def phase(timeline, name, step=0):
    return next(e for e in timeline if e["phase"] == name and e["step"] == step)


def test_measured_adam_fp32_equals_predicted():
    model = make_mlp([64, 128, 128, 10])
    opt = torch.optim.Adam(model.parameters())
    n, tensors = n_params(model), len(list(model.parameters()))
    mem = MemoryTracker("cpu")
    mem.watch(model, opt)
    timeline = train(mem, model, opt, torch.randn(32, 64))
    want = model_state_bytes(n, mixed_precision=False)
    after_backward = phase(timeline, "backward")["current"]
    after_step = phase(timeline, "step")["current"]
    assert after_step["params"] == want.params  # exact: 4 bytes each
    assert after_backward["grads"] == want.grads
    # Adam also keeps one fp32 `step` counter per parameter tensor: 4 bytes each,
    # 24 here against 208,976 predicted (0.01%).
    assert after_step["optimizer"] == want.optimizer + 4 * tensors
    for cat in ("params", "optimizer"):
        assert after_step[cat] == pytest.approx(getattr(want, cat), rel=0.01)
    assert after_step["grads"] == 0  # zero_grad() sets them to None


def test_mlp_activations_measured_equal_formula():
    sizes, batch = [48, 96, 80, 10], 16
    model = make_mlp(sizes)
    x = torch.randn(batch, sizes[0])  # made before tracking: still counted
    mem = MemoryTracker("cpu")
    mem.watch(model)
    with mem:
        mem.mark("init")
        loss = model(x).sum()
        fwd = mem.mark("forward")
        loss.backward()
        bwd = mem.mark("backward")
    # Saved for backward: the input and each ReLU output; plus the 4-byte loss.
    assert fwd["current"]["activations"] == mlp_activation_bytes(batch, sizes) + 4
    # The pre-ReLU outputs existed at the same time in forward: the peak is higher.
    assert fwd["peak"]["activations"] > fwd["current"]["activations"]
    # After backward only what the caller holds is left: the input and the loss.
    assert bwd["current"]["activations"] == x.numel() * 4 + 4


def test_timeline_structure_json_and_pickle():
    model = make_mlp([8, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mem = MemoryTracker(torch.device("cpu")).watch(model, opt)
    timeline = train(mem, model, opt, torch.randn(4, 8), steps=2)
    assert [(e["phase"], e["step"]) for e in timeline] == [
        ("init", None),
        ("forward", 0),
        ("backward", 0),
        ("step", 0),
        ("forward", 1),
        ("backward", 1),
        ("step", 1),
    ]
    for e in timeline:
        assert tuple(e["current"]) == CATEGORIES and tuple(e["peak"]) == CATEGORIES
        for d in (e["current"], e["peak"]):
            assert all(type(v) is int and v >= 0 for v in d.values())
        assert e["peak_total"] == sum(e["peak"].values()) >= sum(e["current"].values())
        assert e["allocator"] is None  # CPU: the ledger is the measurement
        assert e["ledger"] == {"current": e["current"], "peak": e["peak"]}
    assert json.loads(json.dumps(timeline)) == timeline
    assert pickle.loads(pickle.dumps(timeline)) == timeline
    fwd, bwd = phase(timeline, "forward"), phase(timeline, "backward")
    assert fwd["peak"]["activations"] > 0
    assert bwd["current"]["activations"] < fwd["current"]["activations"]
    # The backward peak holds the grads, filed as grads when autograd made them.
    assert bwd["peak"]["grads"] == timeline[0]["current"]["params"]
    # timeline() hands out copies.
    timeline[0]["current"]["params"] = -1
    assert mem.timeline()[0]["current"]["params"] > 0


def test_frozen_parameter_has_no_grad_bytes():
    model = make_mlp([8, 16, 4])
    model[0].weight.requires_grad_(False)
    mem = MemoryTracker("cpu").watch(model)
    with mem:
        mem.mark("init")
        model(torch.randn(4, 8)).sum().backward()
        e = mem.mark("backward")
    trainable = n_params(model) - model[0].weight.numel()
    assert e["current"]["params"] == 4 * n_params(model)
    assert e["current"]["grads"] == 4 * trainable


def test_assign_moves_tensors_between_categories():
    model = make_mlp([8, 16, 4])
    mem = MemoryTracker("cpu").watch(model)
    master = torch.zeros(100)  # e.g. an fp32 master shard made elsewhere
    holder = {"bucket": torch.zeros(50)}
    with mem:
        e0 = mem.mark("init")
        mem.assign("optimizer", master)
        mem.assign("other", lambda: holder["bucket"])
        e1 = mem.mark("assigned")
        holder["bucket"] = torch.zeros(70)  # replaced: the callable finds the new one
        e2 = mem.mark("replaced")
        mem.assign("grads", [model[0].weight])  # the last assignment wins
        e3 = mem.mark("forced")
    assert e0["current"]["optimizer"] == 0 and e0["current"]["other"] == 0
    assert e1["current"]["optimizer"] == 400 and e1["current"]["other"] == 200
    assert e2["current"]["other"] == 280
    assert e3["current"]["grads"] == model[0].weight.numel() * 4
    assert e3["current"]["params"] == (n_params(model) - model[0].weight.numel()) * 4
    with pytest.raises(ValueError, match="category must be one of"):
        mem.assign("weights", master)


def test_peak_is_split_by_the_categories_known_at_the_mark():
    mem = MemoryTracker("cpu")
    holder = {}
    mem.assign("grads", lambda: holder.get("shard"))  # e.g. a reduce-scatter output
    with mem:
        mem.mark("init")
        holder["shard"] = torch.zeros(1000)  # born in the phase: not yet known as grads
        tmp = torch.zeros(500)
        del tmp  # the phase peaked while both were alive
        e = mem.mark("backward")
    assert e["current"] == {**e["current"], "grads": 4000, "activations": 0}
    assert e["peak"]["grads"] == 4000 and e["peak"]["activations"] == 2000
    assert e["peak_total"] == 6000


def test_several_forwards_between_marks_and_reentry():
    # Gradient accumulation: torch's MemTracker raises here; ours must not.
    model = make_mlp([8, 16, 4])
    opt = torch.optim.Adam(model.parameters())
    mem = MemoryTracker("cpu").watch(model, opt)
    with mem:
        mem.mark("init")
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
        mem.mark("backward", step=0)
    with mem:  # tracking again later keeps the same ledger
        opt.step()
        e = mem.mark("step", step=0)
    assert e["current"]["optimizer"] == 8 * n_params(model) + 4 * 4
    assert len(mem.timeline()) == 3


def test_optimizer_step_workspace_and_new_state():
    model = make_mlp([32, 32])
    opt = torch.optim.Adam(model.parameters(), foreach=True)
    mem = MemoryTracker("cpu").watch(model)  # the optimizer is not watched
    with mem:
        mem.mark("init")
        model(torch.randn(2, 32)).sum().backward()
        mem.mark("backward")
        opt.step()
        e = mem.mark("step")
    n = n_params(model)
    # State made in step() and kept is optimizer state even unwatched...
    assert e["current"]["optimizer"] == 8 * n + 4 * 2
    # ...while foreach Adam's temporaries were workspace: "other" at the peak only.
    assert e["current"]["other"] == 0 and e["peak"]["other"] >= 4 * n


def test_tracker_errors_and_helpers():
    mem = MemoryTracker("cpu")
    with pytest.raises(RuntimeError, match="inside `with mem:`"):
        mem.mark("init")
    with pytest.raises(TypeError, match="nn.Module"):
        mem.watch(torch.zeros(3))
    with mem, pytest.raises(ValueError, match="phase"):
        mem.mark("")
    a = torch.zeros(10)
    assert tensor_bytes([a, a[2:], None, {"b": torch.zeros(3, dtype=torch.int8)}]) == 43
    # A tensor that dies leaves the ledger.
    with mem:
        big = torch.zeros(1000)
        mem.assign("other", big)
        assert mem.current()["other"] == 4000
        del big
        gc.collect()
        assert mem.current()["other"] == 0


# ============================================ torch.distributed in a 1-process world
@pytest.fixture(scope="module")
def gloo_world(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_tracking(gloo_world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_mlp([33, 64, 7])
    n, tensors = n_params(model), 4
    mem = MemoryTracker("cpu")
    with mem:  # built inside tracking, before the first mark: its buckets are "other"
        ddp = DDP(model, gradient_as_bucket_view=True)
        opt = torch.optim.Adam(ddp.parameters())
        mem.watch(ddp, opt)
        mem.mark("init")
        for step in range(2):
            ddp(torch.randn(5, 33)).sum().backward()
            mem.mark("backward", step=step)
            opt.step()
            opt.zero_grad()
            mem.mark("step", step=step)
    timeline = mem.timeline()
    for step in range(2):
        e = phase(timeline, "backward", step)["current"]
        # The grads are views of DDP's bucket: counted once, as grads.
        assert e["params"] == 4 * n and e["grads"] == 4 * n
        assert e["activations"] < 4 * n
    assert phase(timeline, "step", 1)["current"]["optimizer"] == 8 * n + 4 * tensors


def test_zero_redundancy_optimizer_tracking(gloo_world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_mlp([33, 64, 7])
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam)
    mem = MemoryTracker("cpu").watch(model, opt)
    timeline = train(mem, model, opt, torch.randn(5, 33))
    n = n_params(model)
    want = model_state_bytes(n, world_size=1, zero_stage=1, mixed_precision=False)
    e = phase(timeline, "step", 1)["current"]
    assert e["params"] == want.params
    assert e["optimizer"] == want.optimizer + 4 * 4  # its inner Adam's state


def test_fully_shard_tracking(gloo_world):
    from torch.distributed.fsdp import fully_shard

    model = make_mlp([33, 64, 7])
    n = n_params(model)
    fully_shard(model[0])
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters())
    shard_bytes = tensor_bytes(list(model.parameters()))  # DTensors: local shards
    assert shard_bytes == 4 * n  # one rank holds everything
    mem = MemoryTracker("cpu").watch(model, opt)
    timeline = train(mem, model, opt, torch.randn(5, 33))
    fwd, bwd = phase(timeline, "forward", 1), phase(timeline, "backward", 1)
    # After forward the root keeps its gathered (unsharded) parameters...
    assert fwd["current"]["params"] > shard_bytes
    # ...which backward frees again (storage.resize_(0), seen through the patch).
    assert bwd["current"]["params"] == shard_bytes
    assert bwd["current"]["grads"] == shard_bytes
    assert phase(timeline, "step", 1)["current"]["optimizer"] == 8 * n + 4 * 4


def test_collectives_and_grad_hooks(gloo_world):
    model = make_mlp([16, 8])
    n = n_params(model)
    shard = torch.zeros(n)
    flat = torch.zeros(n)

    def average(p):
        dist.all_reduce(p.grad)

    handles = [
        p.register_post_accumulate_grad_hook(average) for p in model.parameters()
    ]
    mem = MemoryTracker("cpu").watch(model)
    mem.assign("grads", lambda: shard)
    mem.assign("other", flat)
    with mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # *_into_tensor renamed in 2.13
        mem.mark("init")
        model(torch.randn(4, 16)).sum().backward()
        gathered = torch.empty(n)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_gather_into_tensor(gathered, grads)
        dist.reduce_scatter_tensor(shard, gathered)
        dist.all_reduce(flat, async_op=True).wait()
        e = mem.mark("comm")
    for h in handles:
        h.remove()
    assert e["current"]["grads"] == 4 * n + 4 * n  # .grad plus the assigned shard
    assert e["current"]["other"] == 4 * n
    assert e["current"]["activations"] == 4 * n * 2  # `gathered` and `grads`


# ============================================================================ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_split_from_ledger_totals_from_allocator():
    model = make_mlp([256, 512, 10]).cuda()
    opt = torch.optim.Adam(model.parameters())
    mem = MemoryTracker("cuda").watch(model, opt)
    timeline = train(mem, model, opt, torch.randn(64, 256, device="cuda"))
    # Each parameter tensor rounded up to the allocator's 512-byte blocks.
    want_params = sum(-(-p.numel() * 4 // 512) * 512 for p in model.parameters())
    for e in timeline:
        alloc, ledger = e["allocator"], e["ledger"]
        assert set(alloc) == {"current", "peak", "reserved"}
        assert sum(e["current"].values()) == max(
            alloc["current"], sum(ledger["current"].values())
        )
        assert e["peak_total"] >= alloc["peak"]
        assert e["current"]["params"] == want_params
    json.dumps(timeline)
