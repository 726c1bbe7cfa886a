"""ZeRO stage 3 (``utils.zero.fsdp.FullyShardedModule``) as FSDP2's users expect it.

Per-parameter shards with a ``.grad`` of their own (shape and dtype of the shard),
fp32 master weights in ``full_state_dict`` under mixed precision, the same losses,
parameters and sharded gradients as one process and as torch's ``fully_shard``,
gradient accumulation, any ``nn.Module`` (tied, frozen, unused, 0-dim and
unevenly divisible parameters), and the all-gather prefetch: the order of its
events, its results (unchanged) and its memory (at most two units gathered).

Everything of one world size runs in one launch (a module fixture), at world sizes
4 and 2.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from labs.zero import TINY
from tests import _zero_fsdp_workers as W
from utils.launch import launch

RUNS = [
    dict(precision=p, impl=i, prefetch=f)
    for p in ("fp32", "mixed")
    for i, f in (("scratch", True), ("scratch", False), ("torch", True))
] + [dict(precision="fp32", impl="scratch", micro=2)]
MODULES = ["mlp", "tied"]

# Mixed precision (bf16 compute and reduce-scatter, fp32 masters) against another
# bf16 implementation: bf16 keeps 8 significant bits, so one rounding apart is
# 2**-7 relative, and a gradient rounded differently can flip the sign of an Adam
# update of a near-zero gradient, moving that weight by up to 2 lr per step. The
# losses come from bf16 logits: 2e-3 apart at most (what tests/test_zero.py allows).
MIXED_PARAMS = dict(rtol=2**-7, atol=2 * TINY.lr * W.GPT_STEPS)
MIXED_LOSS = dict(rtol=0, atol=2e-3)
MIXED_GRAD = dict(rtol=2**-7, atol=1e-5)  # against FSDP2's, which reduces in bf16 too


@pytest.fixture(scope="module", params=[4, 2], ids=["N=4", "N=2"])
def results(request):
    n = request.param
    per_rank = launch(
        W.everything,
        RUNS,
        MODULES,
        world_size=n,
        backend="gloo",
        timeout=180,
    )
    runs = {}
    for k, kw in enumerate(RUNS):
        key = (
            kw["precision"],
            kw["impl"],
            kw.get("prefetch", True),
            kw.get("micro", 1),
        )
        runs[key] = [r["gpt"][k] for r in per_rank]
    modules = {kind: [r["modules"][kind] for r in per_rank] for kind in MODULES}
    return n, runs, modules, per_rank[0]["references"]


def _scratch(runs, precision, prefetch=True, micro=1):
    return runs[(precision, "scratch", prefetch, micro)]


def _torch(runs, precision):
    return runs[(precision, "torch", True, 1)]


def _mixed_close(actual, expected, **kw):
    assert_close(actual.bfloat16().float(), expected.bfloat16().float(), **kw)


# ------------------------------------------------------------------- gradients
@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_every_parameter_has_its_shard_of_the_gradient(results, precision):
    n, runs, _, refs = results
    full = refs[precision]["params"]
    for prefetch in (True, False):
        for rank, run in enumerate(_scratch(runs, precision, prefetch)):
            theirs = _torch(runs, precision)[rank]
            for step, grads in enumerate(run["grads"]):
                assert grads.keys() == theirs["grads"][step].keys()
                for name, g in grads.items():
                    want = W._chunk(full[name], n, rank).shape  # FSDP2's rows
                    assert g["shape"] == tuple(want), (rank, name)
                    assert g["grad"].shape == want and g["dtype"] == torch.float32
                    assert g["grad"].dtype == torch.float32  # the master dtype
                    other = theirs["grads"][step][name]["grad"]
                    if precision == "fp32":
                        assert_close(g["grad"], other)
                    else:
                        assert_close(g["grad"], other, **MIXED_GRAD)


def test_fp32_gradients_are_one_process_gradients_chunked(results):
    n, runs, _, refs = results
    for rank, run in enumerate(_scratch(runs, "fp32")):
        for step, grads in enumerate(run["grads"]):
            for name, g in grads.items():
                want = W._chunk(refs["fp32"]["grads"][step][name], n, rank)
                assert_close(g["grad"], want, msg=f"rank {rank} step {step} {name}")


# ------------------------------------------------------- losses and parameters
@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_losses_and_weights_match_one_process_and_fully_shard(results, precision):
    _, runs, _, refs = results
    ref = refs[precision]
    theirs = _torch(runs, precision)[0]
    for run in _scratch(runs, precision):
        assert run["losses"] == _scratch(runs, precision)[0]["losses"]  # all ranks
        for other in (ref, theirs):
            assert run["params"].keys() == other["params"].keys()
            losses = torch.tensor(run["losses"]), torch.tensor(other["losses"])
            if precision == "fp32":
                assert_close(*losses, rtol=0, atol=1e-5)
                for k, v in other["params"].items():
                    assert_close(run["params"][k], v.float(), msg=k)
            else:
                assert_close(*losses, **MIXED_LOSS)
                for k, v in other["params"].items():
                    _mixed_close(run["params"][k], v.float(), **MIXED_PARAMS, msg=k)


def test_full_state_dict_holds_the_fp32_masters_in_mixed_precision(results):
    _, runs, _, refs = results
    for run in _scratch(runs, "mixed"):
        assert run["params"].keys() == refs["mixed"]["params"].keys()
        assert {v.dtype for v in run["params"].values()} == {torch.float32}
        # not bf16 copies: the masters moved by updates that bf16 cannot hold
        assert any(
            not torch.equal(v, v.bfloat16().float()) for v in run["params"].values()
        )


def test_gradient_accumulation_over_two_micro_batches(results):
    n, runs, _, refs = results
    ref = refs["fp32"]
    for rank, run in enumerate(_scratch(runs, "fp32", micro=2)):
        assert_close(
            torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5
        )
        for k, v in ref["params"].items():
            assert_close(run["params"][k], v, msg=k)
        for step, grads in enumerate(run["grads"]):
            for name, g in grads.items():
                want = W._chunk(ref["grads"][step][name], n, rank)
                assert_close(g["grad"], want, msg=f"step {step} {name}")


@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_any_module_matches_one_process(results, kind):
    n, _, modules, _ = results
    for rank, run in enumerate(modules[kind]):
        assert_close(torch.tensor(run["losses"]), torch.tensor(run["ref_losses"]))
        assert run["params"].keys() == run["ref_params"].keys()
        for k, v in run["ref_params"].items():
            assert_close(run["params"][k], v, msg=k)
        for step, grads in enumerate(run["grads"]):
            assert grads.keys() == run["ref_grads"][step].keys()  # trainable ones
            for name, g in grads.items():
                want = run["ref_grads"][step][name]
                if want is None:  # never used: a zero gradient, as stage 0-2 give
                    want = torch.zeros(g["shape"])
                assert g["grad"].shape == want.shape == g["shape"], (rank, name)
                assert_close(g["grad"], want, msg=f"rank {rank} {name}")
    if kind == "tied":
        run = modules[kind][-1]
        assert run["tied"]  # the tie survives sharding
        # the tied weight goes to the root; rank N-1 holds no rows of a 9-row one
        assert run["units"] == ["", "layers.0", "layers.1", "layers.2"]
        assert run["grads"][0]["scale"]["shape"] == (0,)  # 0-dim: one row, rank 0's
        assert modules[kind][0]["grads"][0]["scale"]["shape"] == (1,)


# ------------------------------------------------------------------- prefetch
def _step_events(run, step=-1):
    return run["events"][run["marks"][step] :]


def _index(events, event, unit, phase):
    return next(i for i, e in enumerate(events) if e[1:] == (event, unit, phase))


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_prefetch_changes_the_schedule_not_the_results(results, precision):
    _, runs, _, _ = results
    for on, off in zip(_scratch(runs, precision), _scratch(runs, precision, False)):
        assert on["losses"] == off["losses"]
        for k, v in off["params"].items():
            assert torch.equal(on["params"][k], v), k
        for a, b in zip(on["grads"], off["grads"]):
            for name in a:
                assert torch.equal(a[name]["grad"], b[name]["grad"]), name


def test_prefetch_overlaps_the_collectives_with_compute(results):
    _, runs, _, _ = results
    blocks = [f"blocks.{i}" for i in range(TINY.n_layers)]
    for run in _scratch(runs, "fp32"):
        ev = _step_events(run)
        times = [e[0] for e in ev]
        assert times == sorted(times)
        kinds = [e[1:] for e in ev]
        units = len(run["unit_bytes"])
        for phase in ("forward", "backward"):
            assert kinds.count(("gather", "root", phase)) == 1
            assert sum(k[0] == "gather" and k[2] == phase for k in kinds) == units
        assert kinds.count(("reduce-scatter", "root", "backward")) == 1
        # forward: block k+1's all-gather starts before block k computes
        for k in range(len(blocks) - 1):
            start = _index(ev, "prefetch", blocks[k + 1], "forward")
            assert (
                _index(ev, "gather", blocks[k], "forward")
                < start
                < _index(ev, "free", blocks[k], "forward")
            )
        assert _index(ev, "prefetch", blocks[0], "forward") < _index(
            ev, "gather", blocks[0], "forward"
        )
        # backward, in reverse: the next block's all-gather during this one's
        # backward, and this one's reduce-scatter waited only after the next one
        # was gathered (it ran during that one's backward)
        for k in range(len(blocks) - 1, 0, -1):
            assert (
                _index(ev, "gather", blocks[k], "backward")
                < _index(ev, "prefetch", blocks[k - 1], "backward")
                < _index(ev, "free", blocks[k], "backward")
            )
            assert _index(ev, "gather", blocks[k - 1], "backward") < _index(
                ev, "reduced", blocks[k], "backward"
            )
        assert kinds[0] == ("gather", "root", "forward")
        assert kinds[-1] == ("free", "root", "backward")
    for run in _scratch(runs, "fp32", prefetch=False):
        kinds = [e[1:] for e in _step_events(run)]
        assert not any(k[0] == "prefetch" for k in kinds)
        for i, (event, unit, _) in enumerate(kinds):
            if event == "reduce-scatter":  # blocking: waited at once
                assert kinds[i + 1] == ("reduced", unit, "backward")


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_prefetch_holds_at_most_two_units_gathered(results, precision):
    _, runs, _, _ = results
    for on, off in zip(_scratch(runs, precision), _scratch(runs, precision, False)):
        sizes = on["unit_bytes"]
        layer = max(b for u, b in sizes.items() if u != "root")
        assert on["peak"]["units"] == 2  # besides the root: computing + in flight
        assert off["peak"]["units"] == 1
        # bytes: full buffers plus all-gather buffers. The copy-out needs a unit's
        # all-gather buffer next to its full one, so both peak at root + 2 layers
        assert on["peak"]["bytes"] == off["peak"]["bytes"] == sizes["root"] + 2 * layer
