"""Tensor parallelism's pieces (utils/model_parallel): the f/g operators, each layer
against the torch layer it was cut from, the vocabulary-parallel loss against
``F.cross_entropy``, the whole GPT against one process (with and without sequence
parallelism, tied and untied, and dp x tp), collective counts against torch's own
``parallelize_module``.

Every rank check of one world size runs in a single launch (a module fixture), so
the file costs two launches: tp=2, and tp=4 (which also runs dp=2 x tp=2).
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch.testing import assert_close

from tests import _model_parallel_workers as workers
from utils.launch import launch
from utils.model_parallel.apply import SP_PLAN, TP_PLAN, check_tensor_parallel
from utils.models import GPT, GPTConfig

CFG = workers.CFG
L = CFG.n_layers


@pytest.fixture(scope="module", params=[2, 4], ids=["tp=2", "tp=4"])
def ranks(request):
    n = request.param
    return n, launch(workers.suite, world_size=n, backend="gloo", timeout=180)


def _pairs(tree: dict):
    """Every ``(actual, expected)`` tensor pair in a nested dict, with its path."""
    for key, value in tree.items():
        if isinstance(value, dict):
            for path, pair in _pairs(value):
                yield f"{key}.{path}", pair
        elif (
            isinstance(value, tuple)
            and len(value) == 2
            and all(isinstance(t, torch.Tensor) for t in value)
        ):
            yield str(key), value


def _close_all(tree: dict, rank: int) -> int:
    n = 0
    for path, (actual, expected) in _pairs(tree):
        assert_close(actual, expected, msg=lambda m, p=path: f"rank {rank} {p}: {m}")
        n += 1
    return n


# ------------------------------------------------------------------ pure checks
@pytest.mark.parametrize(
    ("tp", "sp", "named"),
    [
        (3, False, ["n_heads=4", "d_model=32", "vocab_size=64"]),
        (8, False, ["n_heads=4"]),
        (4, True, ["seq_len (sequence parallel)=6"]),
    ],
)
def test_a_tp_that_does_not_divide_is_refused_before_any_process(tp, sp, named):
    cfg = GPTConfig(vocab_size=64, seq_len=6 if sp else 16, d_model=32, n_heads=4)
    with pytest.raises(ValueError, match=f"tp={tp} does not divide") as err:
        check_tensor_parallel(cfg, tp, sequence_parallel=sp)
    for value in named:
        assert value in str(err.value)


@pytest.mark.parametrize("tp", [0, -2, True, 2.0])
def test_a_tp_that_is_not_a_positive_int_is_refused(tp):
    with pytest.raises(ValueError, match="positive int"):
        check_tensor_parallel(CFG, tp)


def test_dividing_degrees_pass():
    for tp in (1, 2, 4):
        check_tensor_parallel(CFG, tp, sequence_parallel=True)


def test_the_plan_names_modules_of_the_course_gpt():
    names = [name for name, _ in GPT(CFG).named_modules()]
    for pattern, _ in TP_PLAN + SP_PLAN:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        assert hits, pattern
        if "blocks.*" in pattern:
            per_block = 3 if pattern.endswith("[qkv]") else 1
            assert len(hits) == per_block * L, (pattern, hits)


# ------------------------------------------------------------------ in ranks
def test_f_g_and_the_sequence_pair(ranks):
    n, results = ranks
    for r in results:
        assert _close_all(r["operators"], r["rank"]) == 8
        # Each operator recorded its one collective under its phase.
        assert r["operators"]["meter_calls"] == {
            f"{op}.{phase}": 1
            for op in ("all_reduce", "all_gather", "reduce_scatter")
            for phase in ("fwd", "bwd")
        }


@pytest.mark.parametrize("case", ["column", "column_sp", "row", "row_sp"])
def test_layer_equals_nn_linear_forward_and_backward(ranks, case):
    n, results = ranks
    for r in results:
        checked = _close_all(r["layers"][case], r["rank"])
        assert checked == 5  # forward, input grad, weight, weight grad, bias grad


def test_row_bias_grad_is_partial_under_sequence_parallelism(ranks):
    """Added to this rank's tokens only, the row bias's gradient is a partial sum:
    wrong alone, right once summed over the group (the layer tags it)."""
    n, results = ranks
    for r in results:
        case = r["layers"]["row_sp"]
        assert not torch.allclose(
            case["bias_grad_unsynced_is_partial"], case["bias_grad_ref"]
        )


def test_vocab_parallel_embedding_and_loss(ranks):
    n, results = ranks
    for r in results:
        # embedding (+SP): forward, weight grad; loss at two scales: mean, none, grad
        assert _close_all(r["vocab"], r["rank"]) == 4 + 6


def test_apply_refuses_heads_it_cannot_split(ranks):
    n, results = ranks
    for r in results:
        message, q_type = r["refused"]
        assert f"tp={n} does not divide n_heads=3" in message
        assert q_type == "Linear"  # refused before anything was replaced
        assert "already tensor-parallel" in r["refused_twice"]


def test_the_tp_group_from_a_parallel_mesh_a_device_mesh_or_a_group(ranks):
    n, results = ranks
    for r in results:
        assert r["tp_group_of"] == [list(range(n))] * 4


def _check_gpt(run: dict, rank: int) -> None:
    assert_close(run["losses"], run["ref_losses"])
    assert run["grads"].keys() == run["ref_grads"].keys()
    for name, want in run["ref_grads"].items():
        assert_close(run["grads"][name], want, msg=lambda m, k=name: f"{k}: {m}")
    for name, want in run["ref_params"].items():
        assert_close(run["params"][name], want, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_gpt_matches_one_process_loss_grads_and_adamw_steps(ranks, sp, tie):
    n, results = ranks
    for r in results:
        run = r["gpt"][(sp, tie)]
        assert run["n_heads"] == CFG.n_heads // n
        assert run["tied"] == tie
        _check_gpt(run, r["rank"])


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_gpt_dp_times_tp(ranks, sp):
    n, results = ranks
    if n != 4:
        pytest.skip("dp=2 x tp=2 runs in the 4-rank launch")
    for r in results:
        _check_gpt(r["gpt_dp_tp"][sp], r["rank"])


def test_sequence_parallel_layer_norm_grads_need_the_tp_all_reduce(ranks):
    """The classic bug: with sequence parallelism, leaving out
    ``sync_sequence_parallel_grads`` gives wrong layer-norm (and position, and row
    bias) gradients; with it they equal one process's. Without sequence
    parallelism the replicated gradients are already whole."""
    n, results = ranks
    for r in results:
        run = r["gpt"][(True, True)]
        names = run["sequence_parallel_names"]
        assert {f"blocks.{i}.ln{j}.weight" for i in range(L) for j in (1, 2)} <= set(
            names
        )
        assert {"ln_f.weight", "ln_f.bias", "pos.weight"} <= set(names)
        for name in names:
            wrong, want = run["grads_unsynced"][name], run["ref_grads"][name]
            assert not torch.allclose(wrong, want), name
            assert_close(run["grads"][name], want)
        plain = r["gpt"][(False, True)]
        assert plain["sequence_parallel_names"] == []
        for name, want in plain["ref_grads"].items():
            assert_close(plain["grads_unsynced"][name], want)


def test_gpt_collective_counts(ranks):
    """Per step, L blocks: without SP one all-reduce per region in forward (g) and
    backward (f), plus the embedding's g, the head's f and the loss's two; with SP
    each becomes a reduce-scatter / all-gather pair, plus one all-reduce of the
    replicated gradients. Our meter and CommDebugMode agree."""
    n, results = ranks
    want = {
        False: {
            "forward": {"all_reduce.fwd": 1 + 2 * L},
            "loss": {"all_reduce.fwd": 2},
            "backward": {"all_reduce.bwd": 2 * L + 1},
            "sync": {},
        },
        True: {
            "forward": {"reduce_scatter.fwd": 1 + 2 * L, "all_gather.fwd": 2 * L + 1},
            "loss": {"all_reduce.fwd": 2},
            "backward": {"all_gather.bwd": 1 + 2 * L, "reduce_scatter.bwd": 2 * L + 1},
            "sync": {"all_reduce.sp_grads": 1},
        },
    }
    for r in results:
        for sp in (False, True):
            run = r["gpt"][(sp, True)]
            assert run["counts"] == want[sp]
            for phase, calls in run["counts"].items():
                by_kind: dict[str, int] = {}
                for label, k in calls.items():
                    kind = label.split(".")[0]
                    by_kind[kind] = by_kind.get(kind, 0) + k
                assert run["torch_counts"][phase] == by_kind, phase


def test_mlp_counts_and_values_match_torch_tensor_parallel(ranks):
    """Column then row, ours and torch's ``parallelize_module`` (Colwise/Rowwise/
    SequenceParallel on gloo): the same collectives in forward and backward and
    the same values as the whole MLP. The difference is where the replicated
    parameters' partial gradients are summed: ours in one all-reduce after the
    backward; torch keeps them as ``Partial`` DTensors and sums them when they
    are used (here, in the optimizer step)."""
    n, results = ranks
    one = {"all_reduce": 1}
    pair = {"all_gather": 1, "reduce_scatter": 1}
    for r in results:
        cases = r["torch"]
        for name, case in cases.items():
            for impl in ("ours", "torch"):
                got = case[impl]
                for key in ("y", "x_grad"):
                    assert_close(got[key], case["ref"][key])
                for key in ("grads", "params"):
                    for k, want in case["ref"][key].items():
                        assert_close(
                            got[key][k],
                            want,
                            msg=lambda m, p=(name, impl, key, k): f"{p}: {m}",
                        )
            ours, torch_ = case["ours"]["counts"], case["torch"]["counts"]
            assert ours["forward"] == torch_["forward"], name
            assert ours["backward"] == torch_["backward"], name
            assert ours["step"] == {}
        assert cases["mlp"]["ours"]["counts"]["forward"] == one
        assert cases["mlp"]["ours"]["counts"]["backward"] == one
        for name in ("mlp_sp", "norm_mlp_sp"):
            assert cases[name]["ours"]["counts"]["forward"] == pair
            assert cases[name]["ours"]["counts"]["backward"] == pair
            assert cases[name]["ours"]["counts"]["sync"] == one
        # torch: the layer norm's gradients are left Partial and summed in the step
        norm = cases["norm_mlp_sp"]["torch"]
        assert norm["grad_placements"]["0.weight"] == "(Partial(sum),)"
        assert norm["counts"]["step"].get("all_reduce", 0) >= 2
        assert cases["mlp_sp"]["torch"]["counts"]["step"] == {}
