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
