"""Chapter 1, data parallelism: the lab and the from-scratch DDP wrappers.

Every implementation (naive, bucketed, torch's DDP, and the ring all-reduce) must
give the parameters and losses of one process training on the full batch, at world
sizes 2 and 4 (fp32, ``torch.testing.assert_close``'s default tolerances); send
2(N-1)/N of the gradient bytes per step; and hold the full replica on every rank.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

import labs.data_parallel as lab
from tests import _data_parallel_workers as W
from utils.comm import bus_factor
from utils.data_parallel import demos as D
from utils.data_parallel import exercises as ex
from utils.data_parallel import figures as figs
from utils.exercises import exercise_file
from utils.launch import LaunchError, launch
from utils.memory_model import model_state_bytes
from utils.models import MLP, mlp_batch

# ------------------------------------------------------------- pure: validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bucket_mb": 0}, "bucket_mb must be a number > 0, got 0"),
        ({"bucket_mb": -1.5}, "bucket_mb must be a number > 0"),
        ({"accum_steps": 0}, "accum_steps must be an integer >= 1, got 0"),
        ({"world_size": 3}, "batch_size=16 must divide into world_size=3"),
        ({"world_size": 4, "accum_steps": 8}, r"4 x accum_steps=8 = 32"),
        ({"impl": "fsdp"}, "impl must be one of"),
        ({"allreduce": "tree"}, "allreduce must be one of"),
        ({"impl": "ddp", "allreduce": "ring"}, "ring.*naive or bucketed"),
        ({"backend": "mpi"}, "backend must be one of"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(change, message):
    with pytest.raises(ValueError, match=message):
        replace(lab.TINY, **change)


@pytest.mark.parametrize(
    "argv",
    [
        ["--bucket-mb", "0"],
        ["--accum-steps", "0"],
        ["--world-size", "3", "--batch-size", "64"],
    ],
)
def test_cli_errors_come_before_any_process_starts(argv, monkeypatch, capsys):
    def no_launch(*a, **k):
        raise AssertionError("a process was started for a bad config")

    monkeypatch.setattr(lab, "launch", no_launch)
    monkeypatch.setattr("utils.lab.launch", no_launch)  # what lab.run calls
    with pytest.raises(SystemExit) as exit_info:
        lab.main(argv)
    assert "error:" in str(exit_info.value)


def test_split_times_measures_overlap_from_intervals():
    events = [
        {"kind": "compute", "name": "forward", "start": 0.0, "end": 1.0},
        {"kind": "compute", "name": "backward", "start": 1.0, "end": 3.0},
        {"kind": "comm", "name": "bucket 0", "start": 2.0, "end": 3.5},
        {"kind": "comm", "name": "bucket 1", "start": 2.5, "end": 4.0},
        {"kind": "wait", "name": "sync", "start": 3.0, "end": 4.0},
        {"kind": "compute", "name": "step", "start": 4.0, "end": 4.5},
    ]
    t = lab.split_times([events])
    assert t == pytest.approx(
        {"step": 4.5, "compute": 3.5, "comm": 2.0, "overlap": 1.0, "exposed_comm": 1.0}
    )


# -------------------------------------------------- the lab against one process


def reference(cfg: lab.Config):
    """One process, no wrapper, the full global batch, Adam: the ground truth."""
    model = MLP(cfg.sizes, seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        x, y = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


VARIANTS = [
    {"impl": "naive"},
    {"impl": "bucketed"},
    {"impl": "ddp"},
    {"impl": "naive", "allreduce": "ring"},
    {"impl": "bucketed", "allreduce": "ring"},
    {"impl": "bucketed", "accum_steps": 2},
    {"impl": "ddp", "accum_steps": 2},
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_implementation_matches_one_process_on_the_full_batch(world_size):
    base = replace(lab.TINY, world_size=world_size, backend="gloo", return_params=True)
    cfgs = [replace(base, **v) for v in VARIANTS]
    per_rank = launch(W.lab_runs, cfgs, world_size=world_size, backend="gloo")
    ref_losses, ref_params = reference(base)
    expected_state = model_state_bytes(
        per_rank[0][0].num_params, mixed_precision=False
    ).total
    for i, variant in enumerate(VARIANTS):
        reports = [runs[i] for runs in per_rank]
        for r in reports:
            where = f"{variant} rank {r.rank}/{world_size}"
            # The global batch is fixed, so the losses are those of one process.
            assert_close(
                torch.tensor(r.losses, dtype=torch.float32),
                torch.tensor(ref_losses),
                msg=lambda m, w=where: f"{w}: losses differ\n{m}",
            )
            for name, value in r.extra.params.items():
                assert_close(torch.tensor(value), ref_params[name], msg=where)
            # Ring all-reduce accounting (nccl-tests busbw): 2(N-1)/N x grad bytes.
            grad_bytes = r.extra.grad_bytes
            assert grad_bytes == 4 * r.num_params
            expected = bus_factor("all_reduce", world_size) * grad_bytes
            assert r.extra.comm_bytes_per_step == [expected] * base.steps, where
            # Memory after the step: the full replica on every rank, 16 B/param.
            after = [e for e in r.memory if e["phase"] == "step"][-1]["current"]
            states = after["params"] + after["grads"] + after["optimizer"]
            assert states == pytest.approx(expected_state, rel=0.01), where
            assert after["grads"] == grad_bytes, where
            assert r.extra.rows_per_rank == base.batch_size // world_size
        checksums = {r.extra.param_checksum for r in reports}
        assert len(checksums) == 1, f"{variant}: replicas diverged {checksums}"


@pytest.fixture(scope="module")
def naive_and_bucketed():
    """TINY at world size 2, naive and bucketed, in one launch (memory tracked)."""
    cfg = replace(lab.TINY, world_size=2, backend="gloo", steps=2)
    cfgs = [replace(cfg, impl="naive"), replace(cfg, impl="bucketed")]
    naive, bucketed = zip(*launch(W.lab_runs, cfgs, world_size=2, backend="gloo"))
    return {"naive": list(naive), "bucketed": list(bucketed)}


def test_bucketed_overlaps_backward_and_naive_does_not(naive_and_bucketed):
    for r in naive_and_bucketed["naive"]:
        assert r.timings["overlap"] == 0.0
        comm = [e for e in r.extra.timeline[-1] if e["kind"] == "comm"]
        backward = [e for e in r.extra.timeline[-1] if e["name"] == "backward"]
        assert len(comm) == 6  # one all-reduce per parameter tensor
        assert min(e["start"] for e in comm) >= backward[-1]["end"]
    for r in naive_and_bucketed["bucketed"]:
        comm = [e for e in r.extra.timeline[-1] if e["kind"] == "comm"]
        backward = [e for e in r.extra.timeline[-1] if e["name"] == "backward"][0]
        assert len(comm) >= 2  # several buckets
        # The first bucket is launched before backward has finished.
        assert min(e["start"] for e in comm) < backward["end"]
        assert r.timings["overlap"] > 0.0


# ------------------------------------------------------------------ the figures


def test_memory_scaling_rows_show_a_constant_replica(naive_and_bucketed):
    one = launch(W.lab_runs, [replace(lab.TINY, world_size=1)], world_size=1)[0]
    runs = {1: one, 2: naive_and_bucketed["bucketed"]}
    rows = figs.memory_scaling_rows(runs)
    assert [(r["world_size"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert len({r["states"] for r in rows}) == 1  # the same on every rank and N
    for r in rows:
        assert r["states"] == pytest.approx(r["predicted_states"], rel=0.01)
    assert [r["rows_per_rank"] for r in rows] == [16, 8, 8]
    forward = figs.memory_scaling_rows(runs, phase="forward")
    assert forward[1]["activations"] < forward[0]["activations"]  # half the rows
    for fig in (
        figs.draw_memory_scaling(runs),
        figs.draw_memory_scaling(runs, "backward", "peak"),
    ):
        assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="no phase 'sync'"):
        figs.memory_scaling_rows(runs, phase="sync")


def test_timeline_rows_and_figure(naive_and_bucketed):
    rows = figs.timeline_rows(naive_and_bucketed["bucketed"])
    assert {r["rank"] for r in rows} == {0, 1}
    assert {r["what"] for r in rows} >= {"forward", "backward", "step", "comm", "wait"}
    assert all(r["end"] >= r["start"] >= 0 for r in rows)
    fig = figs.draw_timeline(naive_and_bucketed)
    assert len(fig.axes) == 2


def test_dp_memory_rows_states_do_not_shrink_with_ranks():
    rows = figs.dp_memory_rows("LLaMA-2 7B", global_batch=512)
    assert [r["world_size"] for r in rows] == list(figs.WORLD_SIZES)
    assert len({r["total"] for r in rows}) == 1  # nothing falls with N
    assert [r["rows_per_rank"] for r in rows] == [512 // n for n in figs.WORLD_SIZES]
    states = rows[0]["params"] + rows[0]["grads"] + rows[0]["optimizer"]
    assert states == 16 * int(figs.MODELS["LLaMA-2 7B"]["params"])
    assert states > 80e9  # more than an 80 GB device, at any N
    assert len(figs.draw_dp_memory_limit("LLaMA-2 7B", "H100 SXM").axes) == 2


def test_busbw_figure_has_one_line_per_impl():
    rows = [
        {"impl": i, "bytes": b, "busbw": b / 1e-3}
        for i in ("builtin", "ring")
        for b in (1024, 4096)
    ]
    fig = figs.draw_busbw(rows, world_size=4)
    assert len(fig.axes[0].lines) == 2
    for r in rows:  # with the spread of the iterations: a shaded band per impl
        r.update(time_s=1e-3, time_p10_s=0.8e-3, time_p90_s=1.5e-3)
    fig = figs.draw_busbw(rows, world_size=4)
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[0].collections) == 2


# ---------------------------------------------------------------- the exercises

SOLUTION = """
import torch.distributed as dist


def average_gradients(model):
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
"""


def test_exercise_check_passes_the_solution_and_explains_a_sum(tmp_path, capsys):
    good = tmp_path / "good.py"
    good.write_text(SOLUTION)
    ex.check_average_gradients(good)
    assert "Correct" in capsys.readouterr().out
    summed = tmp_path / "summed.py"
    summed.write_text(SOLUTION.replace("p.grad /= dist.get_world_size()", "pass"))
    with pytest.raises(AssertionError, match="sum over ranks: divide"):
        ex.check_average_gradients(summed)


def test_exercise_checks_for_bytes_and_memory(naive_and_bucketed):
    report = naive_and_bucketed["bucketed"][0]
    n, psi = report.world_size, report.num_params
    ex.check_bytes_per_rank(2 * (n - 1) / n * 4 * psi, report)
    with pytest.raises(AssertionError, match="too high"):
        ex.check_bytes_per_rank(2 * 4 * psi, report)
    ex.check_memory_per_rank(16 * psi, report)
    with pytest.raises(AssertionError, match="too low"):
        ex.check_memory_per_rank(16 * psi / n, report)  # that is ZeRO-3, not DP
    assert exercise_file("x.py").parent.is_dir()


# ------------------------------------------------------------ the wrappers alone

CASES = [
    {"impl": impl, "optimizer": opt, "allreduce": ar}
    for impl, ar in [
        ("naive", "builtin"),
        ("bucketed", "builtin"),
        ("bucketed", "ring"),
        ("ddp", "builtin"),
    ]
    for opt in ("sgd", "adamw")
] + [
    # Without the used map, a parameter no rank used gets a zero gradient: SGD
    # without momentum ignores it, so the result is still exact.
    {"impl": "naive", "optimizer": "sgd", "find_unused": False},
    {"impl": "bucketed", "optimizer": "sgd", "find_unused": False},
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_wrappers_handle_tied_frozen_and_unused_params(world_size):
    per_rank = launch(W.wrapper_cases, CASES, world_size=world_size, backend="gloo")
    refs = {opt: W.toy_reference(opt, world_size) for opt in ("sgd", "adamw")}
    for i, case in enumerate(CASES):
        ref = refs[case["optimizer"]]
        for rank, runs in enumerate(per_rank):
            got, where = runs[i], f"{case} rank {rank}/{world_size}"
            assert got["scale"] == 1.0, f"{where}: buffer not broadcast"
            assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]))
            params = {k: torch.from_numpy(v) for k, v in got["params"].items()}
            assert_close(params, ref["params"], msg=lambda m, w=where: f"{w}: {m}")
            # The tied weight is one parameter; the frozen one has no gradient.
            assert "gpt.head.weight" not in params
            assert got["grads"]["gpt.pos.weight"] is None
            if case.get("find_unused", True):
                assert got["grads"]["never.weight"] is None, where
            else:
                assert not got["grads"]["never.weight"].any(), where
            if case["impl"] == "bucketed":
                assert got["buckets"] >= 3, where


def test_a_second_backward_before_synchronising_is_refused():
    with pytest.raises(LaunchError, match="second gradient.*no_sync"):
        launch(W.double_backward, world_size=2, backend="gloo", timeout=20)


def test_cli_runs_and_writes_json(tmp_path):
    path = tmp_path / "dp.json"
    lab.main(
        ["--world-size", "2", "--backend", "gloo", "--steps", "2", "--impl", "naive"]
        + ["--batch-size", "8", "--json", str(path)]
    )
    from utils.report import load_reports

    reports = load_reports(path)
    assert [r.rank for r in reports] == [0, 1]
    assert len(reports[0].losses) == 2


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, CUDA memory)"
)
def test_lab_on_gpus_matches_one_process():
    cfgs = [
        replace(lab.TINY, world_size=2, backend="nccl", impl=i, return_params=True)
        for i in ("naive", "bucketed", "ddp")
    ]
    per_rank = launch(W.lab_runs, cfgs, world_size=2, backend="nccl")
    ref_losses, ref_params = reference(cfgs[0])
    for runs in per_rank:
        for r in runs:
            assert r.device.startswith("cuda")
            assert_close(
                torch.tensor(r.losses, dtype=torch.float32), torch.tensor(ref_losses)
            )
            for name, value in r.extra.params.items():
                assert_close(torch.tensor(value), ref_params[name])


# ------------------------------------------- the exercises: plausible wrong answers


@pytest.fixture(scope="module")
def ddp_accumulating_on_4():
    """TINY on 4 ranks, torch's DDP, 2 micro-batches per step (3 steps)."""
    cfg = replace(lab.TINY, world_size=4, backend="gloo", impl="ddp", accum_steps=2)
    return lab.run(cfg)


def test_bytes_check_compares_with_counted_bytes_and_refuses_wrong_answers(
    ddp_accumulating_on_4, capsys
):
    report = ddp_accumulating_on_4[0]
    n, psi = report.world_size, report.num_params
    right = 2 * (n - 1) / n * 4 * psi
    ex.check_bytes_per_rank(right, report)
    out = capsys.readouterr().out
    assert "Correct" in out and "counted by the kernel" in out
    wrong = {
        "synchronised every micro-batch": 2 * right,
        "no (N-1)/N factor": 2 * 4 * psi,
        "the gradients once": 4 * psi,
        "only the all-gather half": (n - 1) / n * 4 * psi,
        "ZeRO's share": right / n,
    }
    for why, answer in wrong.items():
        with pytest.raises(AssertionError, match="too (high|low)"):
            ex.check_bytes_per_rank(answer, report)
            pytest.fail(f"accepted {why}")
    for nonsense in ("1.5 MB", None, True):
        with pytest.raises(AssertionError, match="answer with a number"):
            ex.check_bytes_per_rank(nonsense, report)


def test_bytes_check_falls_back_to_the_modelled_figure_and_says_so(
    naive_and_bucketed, capsys
):
    report = replace(naive_and_bucketed["bucketed"][0], wire_bytes=None)
    ex.check_bytes_per_rank(report.comm_bytes, report)
    assert "modelled: no TCP counters" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="too high"):
        ex.check_bytes_per_rank(2 * report.comm_bytes, report)


def test_ddp_bucket_check_refuses_plausible_wrong_counts(ddp_accumulating_on_4, capsys):
    report = ddp_accumulating_on_4[0]
    per_step = [
        sum(e["kind"] == "comm" for e in step) for step in report.extra.timeline
    ]
    # TINY in DDP's rule (close a bucket once it reaches 0.01 MiB): 2 buckets after
    # the rebuild; the first iteration has every parameter in one bucket.
    assert per_step == [1, 2, 2]
    ex.check_ddp_buckets((1, 2), report)
    assert "Correct" in capsys.readouterr().out
    for wrong, hint in [
        ((2, 2), "one bucket"),  # buckets from the start
        ((1, 3), "closes once"),  # our BucketedDDP's count for TINY
        ((6, 6), "one bucket"),  # one per parameter tensor
        ((1, 1), "closes once"),  # never rebuilt
    ]:
        with pytest.raises(AssertionError, match=hint):
            ex.check_ddp_buckets(wrong, report)
    for nonsense in (2, "1, 2", (1.0, 2.0), (True, 2)):
        with pytest.raises(AssertionError, match="two integers"):
            ex.check_ddp_buckets(nonsense, report)


def test_average_check_refuses_an_unchanged_and_a_halved_gradient(tmp_path):
    unchanged = tmp_path / "unchanged.py"
    unchanged.write_text("def average_gradients(model):\n    pass\n")
    with pytest.raises(AssertionError, match="were not changed"):
        ex.check_average_gradients(unchanged)
    local = tmp_path / "local.py"  # divides without summing: the local mean / N
    local.write_text(
        "import torch.distributed as dist\n\n\ndef average_gradients(model):\n"
        "    for p in model.parameters():\n"
        "        p.grad /= dist.get_world_size()\n"
    )
    with pytest.raises(AssertionError, match="differ from DDP"):
        ex.check_average_gradients(local)


# ---------------------------------------------------- counted against modelled


def test_counted_bytes_are_the_modelled_ones_plus_gloo_framing(naive_and_bucketed):
    from utils import wire

    rows = figs.comm_bytes_rows(naive_and_bucketed)
    assert [r["run"] for r in rows] == ["naive", "bucketed"]
    for r in rows:
        assert r["modelled"] == r["reported"] and r["source"] == "modelled"
        assert r["calls"] == (6 if r["impl"] == "naive" else 3)
        if wire.supported():
            assert r["wire"] == r["modelled"] + r["framing"], r
    assert "counted on the wire" in figs.comm_bytes_table(rows)


def test_gloo_transfer_counts_are_those_of_test_wire():
    # tests/test_wire.py's gloo_sent: 4 MiB over 2 and 4 ranks.
    assert figs.gloo_allreduce_transfers(4 << 20, 2) == 4
    assert figs.gloo_allreduce_transfers(4 << 20, 4) == 12
    assert figs.gloo_allreduce_transfers(64 << 20, 4) == 2 * (64 - 16)
    assert figs.gloo_framing_bytes(3, 4, ring=False) == 3 * 12 * 144
    assert figs.gloo_framing_bytes(3, 4, ring=True) == 3 * 6 * 144


# ------------------------------------------------------------- the ring, traced


@pytest.mark.parametrize("n", [3, 4])
def test_ring_schedule_is_what_ring_all_reduce_sends(n):
    traces = launch(D.ring_trace_rank, 4, world_size=n, backend="gloo")
    schedule = figs.ring_schedule(n)
    keys = ("exchange", "send_chunk", "send_ranks", "recv_into", "to", "from")
    for rank, trace in enumerate(traces):
        assert len(trace) == 2 * (n - 1)
        mine = [row for row in schedule if row["rank"] == rank]
        assert [{k: t[k] for k in keys} for t in trace] == [
            {k: s[k] for k in keys} for s in mine
        ]
        # ring_all_reduce counted one chunk (4 fp64 elements) per exchange.
        assert [t["counted_bytes"] for t in trace] == [32] * (2 * (n - 1))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ring_states_reduce_then_gather(n):
    states = figs.ring_states(n)
    assert len(states) == 2 * (n - 1) + 1
    everyone = frozenset(range(n))
    after_rs = states[n - 1]
    for r in range(n):  # after reduce-scatter rank r owns chunk (r + 1) % n
        assert after_rs[r][(r + 1) % n] == everyone
        assert sum(c == everyone for c in after_rs[r]) == 1
    assert all(c == everyone for rank in states[-1] for c in rank)
    assert len(figs.draw_ring_schedule(n).axes) >= 2 * (n - 1) + 1


# ------------------------------------------------------------ the demonstrations


def test_chapter_demos_on_two_ranks():
    out = launch(D.chapter_demos_rank, (12, 4), 1 << 14, world_size=2, backend="gloo")
    demo = out[0]
    tokens = demo["token_mean"]
    assert tokens["mean_of_means"]["relative"] > 1e-2  # unequal counts: wrong
    for fixed in ("global_count", "global_count_ddp"):
        assert tokens[fixed]["relative"] < 1e-5
        assert tokens[fixed]["loss"] == pytest.approx(tokens["reference_loss"])
    buckets = demo["ddp_buckets"]
    for view in (False, True):
        rows = [r for r in buckets if r["gradient_as_bucket_view"] is view]
        assert [r["buckets"] for r in rows] == [1, 2, 2]  # one, then rebuilt
        assert all(r["grads_are_bucket_views"] is view for r in rows)
        assert all(r["bytes_of_buckets"] == r["bytes_of_grads"] for r in rows)
    dtype = demo["reduce_dtype"]
    assert dtype["fp32"]["relative"] < 1e-6
    assert dtype["bf16_cast"]["relative"] <= dtype["bf16"]["relative"]
    assert 1e-4 < dtype["bf16"]["relative"] < dtype["bf16_unit_roundoff"]
    assert [t["send_chunk"] for t in demo["ring_trace"]] == [0, 1]
    acc = D.accumulation_error(micro_batches=8, numel=1 << 12)
    assert acc["bf16"] > 1e3 * acc["fp32"]


# ------------------------------------------------------------- analytic models


def _saved_bytes(fn, *args, params=()) -> int:
    """Bytes autograd saves for backward while ``fn(*args)`` runs, each storage
    once, leaving out the storage of ``params`` (a linear layer saves a transposed
    view of its weight)."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(saved.values())


def test_swiglu_count_matches_what_autograd_saves_for_its_mlp_and_attention():
    s, b, h, a, f = 16, 2, 32, 4, 88
    bf16 = torch.bfloat16
    torch.manual_seed(0)
    w1, w3 = torch.nn.Linear(h, f, bias=False), torch.nn.Linear(h, f, bias=False)
    w2 = torch.nn.Linear(f, h, bias=False)
    for m in (w1, w2, w3):
        m.to(bf16)
    x = torch.randn(s * b, h, dtype=bf16, requires_grad=True)
    params = [m.weight for m in (w1, w2, w3)]
    mlp = _saved_bytes(lambda t: w2(F.silu(w1(t)) * w3(t)), x, params=params)
    assert mlp == 2 * s * b * h + 8 * s * b * f  # the docstring's SwiGLU term
    q, k, v = (
        torch.randn(b, a, s, h // a, dtype=bf16, requires_grad=True) for _ in range(3)
    )
    core = _saved_bytes(
        lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v
    )
    assert core == 8 * s * b * h + 4 * a * s * b  # Q, K, V, output, fp32 log-sum-exp
    total = figs.swiglu_layer_activation_bytes(s, b, h, a, f)
    norms = 2 * (2 * s * b * h + 4 * s * b)
    qkv_input = 2 * s * b * h
    assert total == norms + qkv_input + core + mlp


def test_dp_memory_rows_use_the_swiglu_count_for_llama_and_gpt_for_gpt2():
    llama = figs.dp_memory_rows("LLaMA-2 7B")[0]["activations"]
    shape = figs.MODELS["LLaMA-2 7B"]
    per_layer = figs.swiglu_layer_activation_bytes(
        2048, 1, shape["hidden"], shape["heads"], 11008
    )
    assert llama == 32 * per_layer
    assert 37 < per_layer / (2048 * shape["hidden"]) < 38  # ~37.5 sbh, not 34
    gpt = figs.dp_memory_rows("GPT-2 XL (1.5B)")[0]["activations"]
    g = figs.MODELS["GPT-2 XL (1.5B)"]
    assert gpt == 34 * 2048 * g["hidden"] * g["layers"]  # Korthikanti, selective
    assert figs.logits_bytes(2048, 1, 32000) == 6 * 2048 * 32000


def test_dp_memory_limit_legend_is_outside_the_bars():
    fig = figs.draw_dp_memory_limit("LLaMA-2 7B", "H100 SXM")
    assert fig.legends and all(ax.get_legend() is None for ax in fig.axes)
    assert fig.get_size_inches()[0] <= figs.WIDTH


def test_critical_batch_balances_compute_and_communication():
    for n, busbw in [(8, 450e9), (64, 50e9)]:
        b_star = figs.critical_tokens_per_device(n, busbw)
        for psi in (1e9, 7e9, 70e9):  # independent of the model's size
            t = figs.dp_step_times(psi, b_star, n, busbw)
            assert t["compute"] == pytest.approx(t["comm"])
    fast = figs.critical_tokens_per_device(8, 450e9)
    slow = figs.critical_tokens_per_device(8, 50e9)
    assert slow == pytest.approx(9 * fast)
    fp32 = figs.critical_tokens_per_device(8, 450e9, grad_bytes=4)
    assert fp32 == pytest.approx(2 * fast)
    assert len(figs.draw_compute_vs_comm().axes) == 1


def test_overlap_rows_and_zoom(naive_and_bucketed):
    rows = figs.overlap_rows(naive_and_bucketed["bucketed"])
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["messages"] == 3
        assert 0 <= r["hidden_s"] <= r["comm_s"]
        assert r["comm"][0] < r["backward"][1]  # the first bucket starts in backward
    naive = figs.overlap_rows(naive_and_bucketed["naive"])
    assert all(r["comm"][0] >= r["backward"][1] for r in naive)
    assert len(figs.draw_overlap_zoom(naive_and_bucketed["bucketed"]).axes) == 1
