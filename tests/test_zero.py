"""ZeRO (chapter 2): every stage against stage 0 and one process, memory against the
paper's formulas, bytes against 2Psi / 3Psi, and the pieces on their own.

All lab configurations of one world size run in a single launch (module fixtures),
so the file costs two launches: world size 2 and 4.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import labs.zero as lab
from labs.zero import IMPLS, PRECISIONS, STAGES, TINY, Config, stage2_layout
from tests import _zero_workers
from utils.comm import bytes_sent
from utils.flat import FlatLayout
from utils.launch import launch
from utils.memory_model import model_state_bytes
from utils.zero import exercises as exercises
from utils.zero import figures as figures

CONFIGS = [
    replace(TINY, stage=s, precision=p, impl=i, return_params=True)
    for i in IMPLS
    for p in PRECISIONS
    for s in STAGES
]
ONE_BUCKET = [
    replace(TINY, stage=2, precision=p, bucket_numel=10**9, return_params=True)
    for p in PRECISIONS
]
"""Stage 2 with one bucket for the whole model: the chapter's measurement that the
bucket layout, not the reduce-scatter, changes fp32 results."""
STATE = ("params", "grads", "optimizer")
_ONE_BUCKET_RUNS: dict[int, dict] = {}


def _run(world_size: int):
    cfgs = [replace(c, world_size=world_size) for c in CONFIGS + ONE_BUCKET]
    per_rank = launch(
        _zero_workers.lab_and_pieces,
        cfgs,
        world_size=world_size,
        backend="gloo",
        timeout=120,
    )
    runs = [[r[0][k] for r in per_rank] for k in range(len(cfgs))]
    reports = {(c.stage, c.precision, c.impl): runs[k] for k, c in enumerate(CONFIGS)}
    _ONE_BUCKET_RUNS[world_size] = {
        c.precision: runs[len(CONFIGS) + k] for k, c in enumerate(ONE_BUCKET)
    }
    return reports, per_rank[0][1]


@pytest.fixture(scope="module", params=[2, 4], ids=["N=2", "N=4"])
def results(request):
    return request.param, *_run(request.param)


@pytest.fixture(scope="module")
def one_bucket(results):
    """precision -> the ranks' reports of stage 2 with a single bucket."""
    return _ONE_BUCKET_RUNS[results[0]]


@pytest.fixture(scope="module")
def single_process():
    return _zero_workers.reference(TINY)


def _params(report) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in report.extra.params.items()}


# ------------------------------------------------------------------ equivalence
def _close(actual, expected, precision):
    if precision == "fp32":  # tight: torch's float32 defaults
        torch.testing.assert_close(actual, expected)
    else:
        # bf16 keeps 8 significant bits: one rounding step apart is 2**-7 relative;
        # and a gradient rounded differently can flip the sign of an Adam update of
        # a near-zero gradient, moving that weight by up to 2 lr per step.
        atol = 2 * TINY.lr * TINY.steps
        torch.testing.assert_close(
            actual.bfloat16().float(),
            expected.bfloat16().float(),
            rtol=2**-7,
            atol=atol,
        )


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_stage_and_impl_matches_stage0(results, precision):
    _, reports, _ = results
    base = reports[(0, precision, "scratch")]
    for (stage, prec, impl), ranks in reports.items():
        if prec != precision:
            continue
        # every rank reports the same global loss and the same full parameters
        for r in ranks:
            assert r.losses == ranks[0].losses
        loss_tol = dict(rtol=0, atol=1e-5 if precision == "fp32" else 2e-3)
        torch.testing.assert_close(
            torch.tensor(ranks[0].losses),
            torch.tensor(base[0].losses),
            **loss_tol,
            msg=lambda m, s=stage, i=impl: f"stage {s} {i}: {m}",
        )
        got, want = _params(ranks[-1]), _params(base[0])
        assert got.keys() == want.keys()
        for k in want:
            _close(got[k], want[k], precision)


def test_fp32_matches_one_process(results, single_process):
    _, reports, _ = results
    ref_losses, ref_params = single_process
    for (stage, prec, impl), ranks in reports.items():
        if prec != "fp32":
            continue
        where = f"stage {stage} {impl}"
        torch.testing.assert_close(
            ranks[0].losses, ref_losses, rtol=0, atol=1e-5, msg=where
        )
        got = _params(ranks[0])
        for k, v in ref_params.items():
            torch.testing.assert_close(got[k], v.reshape(-1), msg=f"{where} {k}")


# ------------------------------------------------------------------ memory, bytes
def test_state_bytes_per_rank_match_the_formula(results):
    n, reports, _ = results
    for (stage, prec, impl), ranks in reports.items():
        want = model_state_bytes(
            ranks[0].num_params,
            world_size=n,
            zero_stage=stage,
            mixed_precision=prec == "mixed",
        ).as_dict()
        if impl == "torch" and not (stage == 3 and prec == "fp32"):
            continue  # torch keeps fp32 params (autocast, FSDP2): see the chapter
        for r in ranks:
            after = [m for m in r.memory if m["phase"] == "step"][-1]["current"]
            for cat in STATE:
                slack = 0.01 * want[cat] + r.extra.padding_bytes
                assert abs(after[cat] - want[cat]) <= slack, (stage, prec, impl, cat)


def test_fsdp2_mixed_states_total_16_bytes_over_n(results):
    n, reports, _ = results
    for r in reports[(3, "mixed", "torch")]:
        after = [m for m in r.memory if m["phase"] == "step"][-1]["current"]
        want = model_state_bytes(r.num_params, world_size=n, zero_stage=3).total
        assert abs(sum(after[c] for c in STATE) - want) <= 0.01 * want
        assert after["params"] == pytest.approx(
            2 * r.extra.predicted["params"], rel=0.01
        )  # fp32 shards


def test_bytes_sent_per_step(results):
    n, reports, _ = results
    for (stage, prec, impl), ranks in reports.items():
        if impl == "torch" and stage == 1:
            continue  # DDP's all-reduce plus ZeroRedundancyOptimizer's broadcasts
        r = ranks[0]
        psi_bytes = r.num_params * r.extra.bytes_per_element
        factor = 3 if stage == 3 else 2  # all-reduce = reduce-scatter + all-gather
        want = factor * bytes_sent("reduce_scatter", psi_bytes, n)
        for sent in r.extra.comm_bytes_per_step:
            assert abs(sent - want) <= 0.01 * want, (stage, prec, impl)


def test_only_the_reduced_buffers_layout_changes_fp32_results(results, one_bucket):
    """Stage 1 (same flat buffer as stage 0, reduce-scattered instead of
    all-reduced) and stage 2 with one bucket agree with stage 0 bit for bit; the
    chapter says the per-block buckets are what changes the summation order."""
    _, reports, _ = results
    for prec in PRECISIONS:
        base = _params(reports[(0, prec, "scratch")][0])
        for ranks in (reports[(1, prec, "scratch")], one_bucket[prec]):
            got = _params(ranks[0])
            assert all(torch.equal(got[k], base[k]) for k in base), prec
            assert ranks[0].losses == reports[(0, prec, "scratch")][0].losses


def test_stage2_holds_one_bucket_of_full_gradients_in_backward(results):
    """The ledger's peak of gradients in backward, the shards aside: at least one
    bucket, at most one bucket plus one module's gradients (what one backward
    operation produces), and below two buckets (the copy-after-the-fact design)."""
    _, reports, _ = results
    for prec in PRECISIONS:
        for r in reports[(2, prec, "scratch")]:
            peak = figures.stage2_gradient_peak(r, *stage2_layout(r))
            bucket = peak["largest_bucket"]
            assert bucket <= peak["backward_peak"], (prec, peak)
            assert peak["backward_peak"] <= bucket + peak["largest_module_grads"]
            assert peak["after_copies"] <= bucket + peak["largest_grad"]
            assert peak["backward_peak"] < 2 * bucket
            assert peak["shards"] == sum(peak["bucket_bytes"]) // r.world_size
            kinds = [e["event"] for e in r.extra.events if e["step"] == 0]
            assert kinds.count("reduce-scatter") == len(peak["bucket_bytes"])


def test_bytes_modelled_and_counted(results):
    """Counted socket bytes = gloo's algorithms (reduce-scatter as an all-reduce,
    broadcast as a tree) + framing; torch's stage 1 costs 2(N-1)/N + 1 times Psi
    in the model."""
    n, reports, _ = results
    rows = figures.comm_rows(reports)
    for row in rows:
        key = (row["stage"], row["precision"], row["impl"])
        if (row["stage"], row["impl"]) == (1, "torch"):
            want = (2 * (n - 1) / n + 1) * row["psi_bytes"]
            assert row["modelled"] == pytest.approx(want, rel=0.01), key
        else:
            assert row["modelled"] == pytest.approx(row["formula"], rel=0.01), key
        if row["counted"] is None:
            continue  # no TCP counters here
        assert 0 <= row["framing"] <= 0.08 * row["counted"], (key, row)
        if row["stage"] in (1, 2) and row["impl"] == "scratch":
            # gloo's reduce-scatter is an all-reduce: counted well above modelled
            assert row["counted"] > 1.4 * row["modelled"], key
        if (row["stage"], row["impl"]) == (1, "torch"):
            # DDP's all-reduce, then each rank broadcasts only its own slice: a
            # root sends, the others receive, so the counted bytes fall below the
            # bus-bandwidth model's 2(N-1)/N + 1
            assert row["counted"] < row["modelled"], key
    table = figures.comm_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "counted on the wire" in table


def test_stage3_holds_one_layer_at_a_time_in_forward(results):
    n, reports, _ = results
    for prec in PRECISIONS:
        for r in reports[(3, prec, "scratch")]:
            units = r.extra.unit_bytes
            elem = r.extra.bytes_per_element
            shards = sum(-(-b // elem // n) * elem for b in units.values())
            forward = [
                e["current"]["params"]
                for e in r.extra.events
                if e["phase"] == "forward"
            ]
            layer = max(b for name, b in units.items() if name != "root")
            # the root unit holds the tied embedding/head: gathered for the whole
            # forward, as FSDP's root is; one block on top of it at a time
            assert max(forward) == shards + units["root"] + layer
            assert max(forward) < shards + sum(units.values())
            kinds = [(e["event"], e["phase"]) for e in r.extra.events if e["step"] == 0]
            assert kinds.count(("gather", "forward")) == len(units)
            assert kinds.count(("gather", "backward")) == len(units)
            assert kinds.count(("reduce-scatter", "backward")) == len(units)


# ------------------------------------------------------------------ the pieces
def test_pieces_handle_tied_frozen_groups_and_any_optimizer(results):
    n, _, pieces = results
    for key in ("sgd-stage1", "sgd-stage2", "adam-stage1", "adam-stage2"):
        p = pieces[key]
        assert p["loss"] < 1e-5 and p["param"] < 1e-5, (key, p)
        assert p["tied"] and p["frozen_moved"] == 0
        assert p["buckets"] >= 2 and p["state_is_shared"]
        assert p["padding_bytes"] == 4 * p["padding_numel"]
        assert 0 <= p["padding_numel"] < n * p["buckets"]
    assert pieces["sgd-stage2"]["grads_left"] == 0  # full grads freed in backward
    for key in ("stage3-root", "stage3-layers"):
        p = pieces[key]
        assert p["loss"] < 1e-5 and p["param"] < 1e-5, (key, p)
        assert p["keys"]
    assert pieces["stage3-root"]["units"] == [""]
    # the tie between mlp.0 and head lifts that weight to the root unit
    assert pieces["stage3-layers"]["units"] == ["", "mlp.0", "mlp.2", "mlp.4"]


# ------------------------------------------------------------------ no processes
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"stage": 4}, "stage must be one of"),
        ({"stage": True}, "stage must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"impl": "deepspeed"}, "impl must be one of"),
        ({"batch_size": 7}, "divide evenly"),
        ({"bucket_numel": 64, "stage": 1}, "stage=2 only"),
        ({"world_size": 0}, "world_size must be"),
    ],
)
def test_bad_config_raises_before_anything_starts(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Config(**kwargs)


def test_cli_error_comes_before_any_process(monkeypatch, capsys):
    def no_launch(*args, **kwargs):
        raise AssertionError("launch must not be called")

    monkeypatch.setattr("utils.lab.launch", no_launch)  # what lab.run calls
    with pytest.raises(SystemExit) as err:
        lab.main(["--stage", "5"])
    assert "stage must be one of (0, 1, 2, 3), got 5" in str(err.value)


def test_bucket_layouts_are_the_optimizers_buckets():
    from utils.models import GPT
    from utils.zero.optim import FlatOptimizer, bucket_layouts

    model = GPT(TINY.gpt(), seed=0)
    for bucket_numel in (None, 1000, 10**9):
        want = bucket_layouts(model.parameters(), bucket_numel, 1)
        opt = FlatOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.1, bucket_numel=bucket_numel
        )
        assert [b.layout.numels for b in opt.buckets] == [w.numels for w in want]


def test_explorer_shows_every_stage_and_fits_a_phone():
    fig = figures.draw_explorer()  # the page's default: 7.5B on 64 ranks
    assert fig.get_size_inches()[0] <= 6.4
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == 4  # the four stages side by side
    assert ax.get_ylim()[1] >= figures.GPU_GB
    labels = [t.get_text() for t in ax.texts]
    assert any("120 GB" in t for t in labels) and any("1.88 GB" in t for t in labels)
    for live in (False, True):
        widget = figures.explorer_widget(live=live)
        for control in widget.controls.values():
            assert control.layout.width == "100%", control
            assert control.layout.max_width == "460px", control
    # the book's: the two choices prerendered (they work without a kernel); live
    # adds the free sliders
    assert set(figures.explorer_widget().controls) == {"stage", "convention"}
    assert figures.explorer_widget().links
    assert set(figures.explorer_widget(live=True).controls) == {
        "num_params", "world_size", "stage", "convention"}  # fmt: skip


def test_flat_layout_pads_to_equal_shards():
    layout = FlatLayout((3, 6), 4)
    assert (layout.numel, layout.padded, layout.shard_numel) == (9, 12, 3)
    assert layout.padding == 3 and layout.spans() == [(0, 3), (3, 9)]
    assert layout.shard(3) == (9, 12)
    assert FlatLayout((8,), 4).padding == 0


# ------------------------------------------------------- figures and exercises
def test_paper_table_reproduces_every_printed_figure():
    rows = figures.paper_table()
    assert len(rows) >= 20 and all(r["agrees"] for r in rows), [
        r for r in rows if not r["agrees"]
    ]
    fig1 = {r["stage"]: r for r in rows if "Figure 1" in r["source"]}
    assert fig1[3]["formula_gb"] == pytest.approx(16 * 7.5e9 / 64 / 1e9)
    table = figures.paper_table_markdown(rows)
    assert table.count("\n") == 2 + 5 and "41.3 / 41.25" in table


def test_explorer_bars_follow_the_convention():
    psi, n = 7_500_000_000, 64
    assert sum(figures.explorer_bars(psi, n, 3).values()) == 16 * psi // n
    assert figures.explorer_bars(psi, n, 1) == {
        "params": 2 * psi,
        "grads": 2 * psi,
        "optimizer": 12 * psi // n,
    }
    twenty = figures.explorer_bars(psi, n, 1, "mixed-20")
    assert twenty["grads"] == 2 * psi + 4 * psi // n  # the fp32 copy is sharded
    assert figures.count_label(7.5e9) == "7.5B" and figures.count_label(1e12) == "1T"


def test_figures_draw_from_the_lab_reports(results):
    n, reports, _ = results
    runs = {s: reports[(s, "mixed", "scratch")] for s in STAGES}
    for stage in STAGES:
        figures.draw_explorer(1e12, 1024, stage, "mixed-18", runs)
    labels = [e["label"] for e in figures.stage3_events(runs[3][0])]
    assert labels[0] == "gather root" and labels[-1] == "free root"
    figures.draw_stage3_timeline(runs[3], rank=n - 1)
    rows = figures.beyond_formula_rows(runs)
    assert [r["stage"] for r in rows] == list(STAGES)
    assert all(r["ratio"] > 1 for r in rows)  # activations at least come on top
    figures.draw_beyond_formula(rows)


def test_smallest_world_size_check_accepts_the_answer_and_refuses_off_by_one(capsys):
    exercises.check_smallest_world_size(exercises.smallest_world_size)
    assert "correct" in capsys.readouterr().out

    def off_by_one(num_params, device_bytes, stage):
        n = exercises.smallest_world_size(num_params, device_bytes, stage)
        return n if n in (None, 1) else n - 1

    with pytest.raises(AssertionError, match="expected"):
        exercises.check_smallest_world_size(off_by_one)


_STAGE1 = """
import torch, torch.distributed as dist
def sharded_step(flat_param, flat_grad, shard, optimizer):
    grad = torch.empty_like(shard)
    dist.reduce_scatter_single(grad, flat_grad)
    shard.grad = grad.div_(dist.get_world_size())
    optimizer.step()
    dist.all_gather_single(flat_param, shard.clone())
"""
_ALL_REDUCE = """
import torch, torch.distributed as dist
def sharded_step(flat_param, flat_grad, shard, optimizer):
    dist.all_reduce(flat_grad)
    start = dist.get_rank() * shard.numel()
    shard.grad = flat_grad[start:start + shard.numel()] / dist.get_world_size()
    optimizer.step()
    dist.all_gather_single(flat_param, shard.clone())
"""


def test_shard_update_check(tmp_path, capsys):
    good, wasteful = tmp_path / "good.py", tmp_path / "wasteful.py"
    good.write_text(_STAGE1)
    wasteful.write_text(_ALL_REDUCE)
    exercises.check_shard_update(good)
    assert "correct: same parameters as stage 0" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="An all-reduce plus an all-gather"):
        exercises.check_shard_update(wasteful)


_NO_DIVIDE = """
import torch, torch.distributed as dist
def sharded_step(flat_param, flat_grad, shard, optimizer):
    grad = torch.empty_like(shard)
    dist.reduce_scatter_single(grad, flat_grad)
    shard.grad = grad  # the sum, not the average
    optimizer.step()
    dist.all_gather_single(flat_param, shard.clone())
"""
_NO_GATHER = """
import torch, torch.distributed as dist
def sharded_step(flat_param, flat_grad, shard, optimizer):
    grad = torch.empty_like(shard)
    dist.reduce_scatter_single(grad, flat_grad)
    shard.grad = grad.div_(dist.get_world_size())
    optimizer.step()  # the other ranks' slices stay stale
"""


@pytest.mark.parametrize(
    "code, words",
    [(_NO_DIVIDE, "parameters differ"), (_NO_GATHER, "parameters differ")],
    ids=["sum-not-mean", "no-all-gather"],
)
def test_shard_update_check_refuses_plausible_mistakes(tmp_path, code, words):
    path = tmp_path / "answer.py"
    path.write_text(code)
    with pytest.raises(AssertionError, match=words):
        exercises.check_shard_update(path)


def test_shard_update_check_labels_its_bytes(tmp_path, capsys):
    path = tmp_path / "good.py"
    path.write_text(_STAGE1)
    exercises.check_shard_update(path)
    out = capsys.readouterr().out
    assert "modelled" in out and "counted on rank 0's sockets" in out


def test_smallest_world_size_check_refuses_searches_and_near_misses():
    def search(num_params, device_bytes, stage):  # tries every N: runs out of time
        n = 1
        while True:
            need = model_state_bytes(num_params, world_size=n, zero_stage=stage)
            if need.total <= device_bytes:
                return n
            if stage == 0:
                return None
            n += 1

    def bounded(num_params, device_bytes, stage):  # the old 4096 cap
        for n in range(1, 4097):
            need = model_state_bytes(num_params, world_size=n, zero_stage=stage)
            if need.total <= device_bytes:
                return n
        return None

    def no_ceil(num_params, device_bytes, stage):  # solved, but shards not rounded
        whole = exercises.REPLICATED_BYTES[stage]
        room = device_bytes - whole * num_params
        if whole == 16:
            return 1 if room >= 0 else None
        if room <= 0:
            return None
        return max(1, -(-(16 - whole) * num_params // room))

    def fp32_bytes(num_params, device_bytes, stage):  # 4 + 4 + 8, not 2 + 2 + 12
        whole = {0: 16, 1: 8, 2: 4, 3: 0}[stage]
        room = device_bytes - whole * num_params
        if whole == 16:
            return 1 if room >= 0 else None
        k = room // (16 - whole)
        return None if k < 1 else -(-num_params // k)

    for wrong, words in (
        (search, "Solve the inequality"),
        (bounded, "solve the inequality"),
        (no_ceil, "ceil"),
        (fp32_bytes, "expected"),
    ):
        with pytest.raises(AssertionError, match=words):
            exercises.check_smallest_world_size(wrong)


def test_smallest_world_size_reference_is_the_fewest_ranks():
    for num_params in (1, 3, 1000, 7_500_000_000):
        for device in (15, 16 * 1000, 40 * 10**9, 80 * 10**9):
            for stage in range(4):
                n = exercises.smallest_world_size(num_params, device, stage)
                fits = [
                    model_state_bytes(num_params, world_size=k, zero_stage=stage).total
                    <= device
                    for k in range(1, 70)
                ]
                want = fits.index(True) + 1 if True in fits else None
                if want is None and n is not None:
                    assert n >= 70
                else:
                    assert n == want, (num_params, device, stage)


_HOOK = """
import torch, torch.distributed as dist
def on_grad_ready(param, bucket):
    if bucket.full is None:
        bucket.full = torch.zeros(bucket.numel)
    start, end = bucket.span(param)
    bucket.full[start:end].copy_(param.grad.reshape(-1))
    param.grad = None
    bucket.arrived += 1
    if bucket.arrived == len(bucket.params):
        mine = torch.empty_like(bucket.grad_shard)
        dist.reduce_scatter_single(mine, bucket.full)
        bucket.grad_shard.add_(mine / dist.get_world_size())
        bucket.full, bucket.arrived = None, 0
"""
_HOOK_KEEPS_GRADS = _HOOK.replace("    param.grad = None\n", "")
_HOOK_NO_DIVIDE = _HOOK.replace("mine / dist.get_world_size()", "mine")
_HOOK_ALL_REDUCE = _HOOK.replace(
    """        mine = torch.empty_like(bucket.grad_shard)
        dist.reduce_scatter_single(mine, bucket.full)""",
    """        dist.all_reduce(bucket.full)
        r, s = dist.get_rank(), bucket.grad_shard.numel()
        mine = bucket.full[r * s:(r + 1) * s]""",
)
_HOOK_KEEPS_BUFFER = _HOOK.replace(
    "bucket.full, bucket.arrived = None, 0",
    "bucket.arrived = 0; bucket.kept = bucket.full",
).replace("if bucket.full is None:", "if bucket.full is None or bucket.arrived == 0:")
_HOOK_AT_THE_END = """
import torch, torch.distributed as dist
state = {"done": 0}
def on_grad_ready(param, bucket):
    # keeps every bucket's buffer until the last gradient of backward, then reduces
    if bucket.full is None:
        bucket.full = torch.zeros(bucket.numel)
    start, end = bucket.span(param)
    bucket.full[start:end].copy_(param.grad.reshape(-1))
    param.grad = None
    bucket.arrived += 1
    state.setdefault("buckets", []).append(bucket) if bucket.arrived == 1 else None
    if bucket.arrived == len(bucket.params):
        state["done"] += 1
    if state["done"] == 3:
        for b in state.pop("buckets"):
            mine = torch.empty_like(b.grad_shard)
            dist.reduce_scatter_single(mine, b.full)
            b.grad_shard.add_(mine / dist.get_world_size())
            b.full, b.arrived = None, 0
        state["done"] = 0
"""


def test_grad_hook_check(tmp_path, capsys):
    path = tmp_path / "hook.py"
    path.write_text(_HOOK)
    exercises.check_grad_hook(path)
    assert "correct: same parameters as stage 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "code, words",
    [
        (_HOOK_KEEPS_GRADS, "still had a .grad"),
        (_HOOK_NO_DIVIDE, "parameters differ"),
        (_HOOK_ALL_REDUCE, "expected exactly one reduce-scatter per bucket"),
        (_HOOK_AT_THE_END, "not yet reduce-scattered"),
        (_HOOK_KEEPS_BUFFER, "more gradient elements"),
    ],
    ids=[
        "keeps-grads",
        "sum-not-mean",
        "all-reduce",
        "reduces-at-the-end",
        "keeps-buffer",
    ],
)
def test_grad_hook_check_refuses_plausible_mistakes(tmp_path, code, words):
    path = tmp_path / "hook.py"
    path.write_text(code)
    with pytest.raises(AssertionError, match=words):
        exercises.check_grad_hook(path)


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_stage3_on_nccl_matches_gloo():
    cfg = replace(TINY, world_size=2, stage=3, precision="mixed")
    gpu = {impl: lab.run(replace(cfg, impl=impl, backend="nccl")) for impl in IMPLS}
    cpu = lab.run(replace(cfg, backend="gloo"))
    for reports in gpu.values():
        assert reports[0].backend == "nccl"
        torch.testing.assert_close(reports[0].losses, cpu[0].losses, rtol=0, atol=2e-2)
        assert reports[0].memory[-1]["allocator"] is not None
