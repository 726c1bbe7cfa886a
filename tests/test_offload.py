"""CPU offloading (chapter 3): every mode against no offload and one process; device
and host bytes per rank against ZeRO-Offload's accounting (measured); bytes moved
per step (counted); the device budget; activation offload and recomputation per
block against the formulas; the device/host pools of the memory ledger; the pieces
on their own; the exercises; bad input.

The lab configurations of one world size run in one launch each (module fixtures):
world size 1 (ZeRO-Offload's single-GPU numbers, then the budget), 2 (every mode,
both implementations, both precisions, and the pieces) and 4 (the summation order
of ZeRO-3 against ZeRO-2 in fp32).
"""

from __future__ import annotations

import json
import pickle
import re
import threading
from dataclasses import replace
from functools import partial

import pytest
import torch

import labs.offload as lab
from labs.offload import IMPLS, PRECISIONS, TINY, TORCH_MODES, Config, check_fits
from tests import _offload_workers
from utils.lab import each
from utils.launch import launch
from utils.memory import MemoryTracker, current_placement, placement
from utils.models import MLP
from utils.offload import exercises, figures
from utils.offload.accounting import (
    MODES,
    bytes_moved,
    gpt_block_saved_bytes,
    layer_activation_bytes,
    offload_state_bytes,
    paper_table1,
)
from utils.offload.activations import apply_activations
from utils.offload.adam import HostAdamW, naive_adam_
from utils.offload.transfer import CrossDeviceCopies, Transfers, pcie_seconds

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

STATES = ("params", "grads", "optimizer")
LAYERS = 3  # activations per block are measured from the second block on
BASE = replace(TINY, n_layers=LAYERS, return_params=True)
SCRATCH = [replace(BASE, offload=m, precision=p) for p in PRECISIONS for m in MODES]
TORCH = [replace(c, impl="torch") for c in SCRATCH if c.offload in TORCH_MODES]
DELAYED = [
    replace(BASE, offload="optimizer+grads", precision="fp32", delayed_update=True,
            steps=4),
]  # fmt: skip
SAME_LAYOUT = ("optimizer", "optimizer+grads", "activations", "recompute")
"""Modes on "none"'s ZeRO-2 buckets: the same reductions, the same Adam arithmetic
(HostAdamW is torch's AdamW bit for bit), exact copies: bit-equal to "none"."""


def _key(c: Config) -> tuple:
    return (c.offload, c.precision, c.impl, c.delayed_update)


def _launch(fn, cfgs, world_size):
    cfgs = [replace(c, world_size=world_size) for c in cfgs]
    return launch(fn, cfgs, world_size=world_size, backend="gloo", timeout=120)


def _lab(cfgs, world_size):
    """The lab's worker for each configuration in one launch: results per rank."""
    return _launch(partial(each, lab.worker), cfgs, world_size)


@pytest.fixture(scope="module")
def two_ranks():
    """World size 2, one launch: every mode, both impls and precisions; the
    pieces; the delayed update's thread (each rank's results)."""
    return _launch(_offload_workers.lab_and_pieces, SCRATCH + TORCH + DELAYED, 2)


@pytest.fixture(scope="module")
def two(two_ranks):
    """World size 2: {mode key: reports per rank}, and rank 0's pieces."""
    cfgs = SCRATCH + TORCH + DELAYED
    runs = {_key(c): [r[0][k] for r in two_ranks] for k, c in enumerate(cfgs)}
    return runs, two_ranks[0][1]


def by_mode(runs, delayed=False):
    """(mode, precision, impl) -> reports."""
    return {(m, p, i): r for (m, p, i, d), r in runs.items() if d == delayed}


ONE = [
    replace(TINY, offload=m, precision="mixed", d_model=64, n_layers=2)
    for m in ("none", "optimizer+grads", "params")
]


@pytest.fixture(scope="module")
def one():
    """World size 1 (the paper's single GPU), then the same runs under a device
    budget between the offload mode's peak and no offload's."""
    first = _lab(ONE, 1)[0]
    peaks = {c.offload: figures.peak_of(r) for c, r in zip(ONE, first)}
    budget = (peaks["none"] + peaks["optimizer+grads"]) / 2 / lab.MIB
    budgeted = [replace(c, device_mem_mb=budget) for c in ONE[:2]]
    second = _lab(budgeted, 1)[0]
    runs = {c.offload: r for c, r in zip(ONE, first)}
    return runs, dict(zip(("none", "optimizer+grads"), second)), peaks


@pytest.fixture(scope="module")
def four():
    """World size 4, fp32: ZeRO-3 (params) against ZeRO-2 (none): four
    contributions per element, summed in another order."""
    cfgs = [replace(BASE, offload=m, precision="fp32") for m in ("none", "params")]
    per_rank = _lab(cfgs, 4)
    return {c.offload: [r[k] for r in per_rank] for k, c in enumerate(cfgs)}


# ------------------------------------------------------------------ equivalence
def _params(report) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in report.extra.params.items()}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_mode_matches_no_offload(two, precision):
    runs = by_mode(two[0])
    base = runs[("none", precision, "scratch")][0]
    for (mode, prec, impl), ranks in runs.items():
        if prec != precision:
            continue
        for r in ranks:  # every rank: the same global loss, no budget hit
            assert r.losses == ranks[0].losses and r.extra.out_of_memory is None
        tol = dict(rtol=0, atol=1e-5 if precision == "fp32" else 0)
        torch.testing.assert_close(
            ranks[0].losses, base.losses, **tol, msg=f"{mode} {impl}"
        )
        got, want = _params(ranks[-1]), _params(base)
        assert got.keys() == want.keys()
        for k in want:
            if precision == "fp32":  # torch's float32 tolerances
                torch.testing.assert_close(got[k], want[k], msg=f"{mode} {impl} {k}")
            else:  # the bf16 parameters each run computes with: on 2 ranks, equal
                assert torch.equal(got[k], want[k]), f"{mode} {impl} {k}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_layout_modes_are_bit_equal_to_no_offload(two, precision):
    runs = by_mode(two[0])
    base = runs[("none", precision, "scratch")][0]
    want = _params(base)
    for mode in SAME_LAYOUT:
        r = runs[(mode, precision, "scratch")][0]
        got = _params(r)
        assert all(torch.equal(got[k], want[k]) for k in want), mode
        assert r.losses == base.losses, mode


def test_fp32_matches_one_process(two, four):
    losses, ref = _offload_workers.reference(replace(BASE, precision="fp32"))
    runs = by_mode(two[0])
    everything = [(k, v) for k, v in runs.items() if k[1] == "fp32"]
    everything += [((m, "fp32", "scratch, N=4"), v) for m, v in four.items()]
    for key, ranks in everything:
        torch.testing.assert_close(ranks[0].losses, losses, rtol=0, atol=1e-5)
        got = _params(ranks[0])
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v.reshape(-1), msg=f"{key} {k}")


def test_delayed_update_is_a_one_step_delayed_adam(two):
    ranks = two[0][("optimizer+grads", "fp32", "scratch", True)]
    cfg = replace(BASE, precision="fp32", steps=4)
    losses, ref = _offload_workers.reference(cfg, delayed=True)
    plain, _ = _offload_workers.reference(cfg)
    torch.testing.assert_close(ranks[0].losses, losses, rtol=0, atol=1e-5)
    assert ranks[0].losses[1] != pytest.approx(plain[1], abs=1e-4)  # really delayed
    got = _params(ranks[0])
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v.reshape(-1), msg=k)
    # the host update of step k runs while step k + 1 computes: timed from step 2
    assert all(t["host_update"] > 0 for t in ranks[0].extra.times_per_step[1:])


def test_delayed_update_thread_writes_tensor_data_only(two_ranks):
    """While the host update is in flight the calling thread's ledger reads the masters'
    ``.grad`` and the optimizer's state at every mark (when the thread set
    ``master.grad = None`` itself, a rank died by SIGSEGV in such a read now and
    then: see ``utils.offload.optim``). So: the first update (it creates the state)
    runs in the calling thread; the later ones in a thread that leaves ``.grad`` and
    the state's tensors as they were; the calling thread drops the gradients after
    joining it. Checked with an update held in flight at a gate, not by timing."""
    for rank in two_ranks:
        seen = rank[2]
        n = seen["buckets"]
        assert n >= 2 and seen["held"]
        assert seen["threads"][0] == seen["main"]  # the first update: here
        assert seen["threads"][1] != seen["main"]  # the second: overlapped
        assert seen["first"] == dict(grads_none=[True] * n, states=n)
        assert seen["in_flight"] == dict(
            grads_set=[True] * n, same_grads=[True] * n, same_state=True
        )
        assert seen["finished_grads_none"] == [True] * n


# ----------------------------------------------------------- memory: the formulas
def test_model_state_bytes_per_rank_match_the_accounting(two):
    """Measured after the step, every rank, both pools, each category: the mode's
    formula (``offload_state_bytes``) to the padding and Adam's 4-byte step
    counters (torch's AdamW in "none" keeps one per bucket)."""
    for (mode, prec, impl), ranks in by_mode(two[0]).items():
        if impl == "torch":
            continue  # FSDP2 keeps fp32 shards and gradients: see the chapter
        for r in ranks:
            after = figures._after_step(r)
            want = r.extra.predicted
            slack = r.extra.padding_bytes + 4 * 8
            for pool in ("device", "host"):
                for cat in STATES:
                    got = after[pool][cat]
                    assert abs(got - want[pool][cat]) <= slack, (mode, prec, pool, cat)


def test_zero_offload_accounting_on_one_rank(one):
    """The paper's single GPU, mixed precision: 16 Psi on the device without
    offload; 2 Psi on the device and 14 Psi on the host with optimizer+grads."""
    runs, _, _ = one
    psi = runs["none"].num_params
    none = figures._after_step(runs["none"])
    zo = figures._after_step(runs["optimizer+grads"])
    assert sum(none["device"][c] for c in STATES) == 16 * psi + 4 * 3  # AdamW steps
    assert sum(none["host"].values()) == 0
    assert sum(zo["device"][c] for c in STATES) == 2 * psi
    assert sum(zo["host"][c] for c in STATES) == 14 * psi
    assert zo["host"]["grads"] == 2 * psi and zo["host"]["optimizer"] == 12 * psi
    params = figures._after_step(runs["params"])
    assert sum(params["device"][c] for c in STATES) == 0
    assert sum(params["host"][c] for c in STATES) == 16 * psi


def test_four_bytes_per_parameter_moved_with_zero_offload(one, two):
    """Counted: the copies the pieces made, every step."""
    runs, _, _ = one
    r = runs["optimizer+grads"]
    for moved in r.extra.moved_per_step:
        assert moved == {"h2d": 2 * r.num_params, "d2h": 2 * r.num_params}
    assert r.extra.copies_per_step[-1]["h2d"] >= 1
    for (mode, prec, impl, delayed), ranks in two[0].items():
        if impl != "scratch" or mode not in ("optimizer", "optimizer+grads", "params"):
            continue
        for rank in ranks:
            want = bytes_moved(
                rank.num_params, mode, world_size=2, mixed_precision=prec == "mixed"
            )
            steps = (
                rank.extra.moved_per_step[1:] if delayed else rank.extra.moved_per_step
            )
            for moved in steps:
                pad = rank.extra.padding_bytes
                assert abs(moved["h2d"] - want["h2d"]) <= 2 * pad, (mode, prec)
                assert abs(moved["d2h"] - want["d2h"]) <= pad, (mode, prec)


def test_activation_offload_moves_what_it_saves_and_torch_moves_nothing_on_cpu(two):
    runs = by_mode(two[0])
    for prec in PRECISIONS:
        r = runs[("activations", prec, "scratch")][0]
        for moved in r.extra.moved_per_step:
            assert moved["h2d"] == moved["d2h"] > 0  # each storage down once, up once
        host = [m for m in r.memory if m["phase"] == "forward"][-1]["pools"]["host"]
        assert host["current"]["activations"] == r.extra.moved_per_step[-1]["d2h"]
    for (_, _, impl), ranks in runs.items():
        if impl == "torch":  # tensor.cpu() of a CPU tensor is no copy
            assert all(m == {"h2d": 0, "d2h": 0} for m in ranks[0].extra.moved_per_step)
            assert "torch made" in ranks[0].extra.moved_source


# ----------------------------------------------------------------- the budget
def test_device_budget_fails_without_offload_and_fits_with_it(one):
    runs, budgeted, peaks = one
    budget = budgeted["none"].extra.device_budget
    assert peaks["optimizer+grads"] < budget < peaks["none"]
    message = budgeted["none"].extra.out_of_memory
    assert message and "Device pool out of memory" in message
    assert "Tried to allocate" in message and f"{budget:,} bytes" in message
    assert budgeted["none"].losses == []
    fits = budgeted["optimizer+grads"]
    assert fits.extra.out_of_memory is None
    assert fits.losses == runs["optimizer+grads"].losses
    assert figures.peak_of(fits) <= budget
    with pytest.raises(torch.OutOfMemoryError, match="rank 0: Device pool out of"):
        check_fits([budgeted["none"]])
    check_fits([fits])  # no error


def test_a_rank_that_runs_out_alone_stops_the_run_with_its_message():
    """Ranks whose peaks differ (3 ranks of this small model do) reach
    a budget between them at different points: the rank that runs out alone says so
    and the run stops, instead of the others waiting in a collective until the
    launcher's timeout."""
    cfg = Config(world_size=3, batch_size=3, d_model=20, n_layers=3, steps=3)
    cfg = replace(cfg, offload="activations", precision="fp32", device_mem_mb=0.1898)
    with pytest.raises(Exception) as err:
        launch(partial(each, lab.worker), [cfg], world_size=3, timeout=60)
    said = str(err.value)
    assert "Device pool out of memory" in said
    assert re.match(r"rank \d raised", said) and "timeout" not in said
    assert (
        f"did not run out of memory at the same point within {lab.OOM_WAIT_S:g} s"
        in said
    )


def test_budget_in_the_ledger_is_checked_before_it_grows():
    mem = MemoryTracker("cpu", device_budget=10_000)
    with mem:
        mem.mark("init")
        kept = torch.zeros(1000)  # 4,000 bytes
        with placement("host"):
            host = torch.zeros(10_000)  # the host pool has no budget
        with pytest.raises(torch.OutOfMemoryError) as err:
            torch.zeros(2000)  # 8,000 more would be 12,000 > 10,000
        e = mem.mark("after")
    text = str(err.value)
    assert "Tried to allocate 7.8 KiB (8,000 bytes)" in text
    assert "budget of 9.8 KiB (10,000 bytes)" in text and "5.9 KiB is free" in text
    assert e["peak_total"] == 4000 and e["pools"]["host"]["peak_total"] == 40_000
    assert isinstance(err.value, torch.cuda.OutOfMemoryError)  # the same class
    mem.assign("activations", kept, pool="host")  # moving out frees the device pool
    with mem:
        made = torch.zeros(2000)  # fits now: 8,000 of 10,000
        assert mem.current()["activations"] == 8000
    del made
    del host
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="device_budget"):
            MemoryTracker("cpu", device_budget=bad)


# ------------------------------------------------------------------ activations
def test_activations_per_block_follow_the_formulas(two):
    """From the second block on, each block adds (measured, rank 0): without a
    policy, what it saves (``gpt_block_saved_bytes``: Korthikanti et al.'s 34sbh
    less the dropout masks, with flash attention); recomputed, only its input
    (sbh elements: Table 2's "full activation recomputation"); offloaded, nothing
    on the device and what it saves on the host. Gradients are unchanged
    (bit-equal, above)."""
    rows = figures.activation_rows(by_mode(two[0]))
    rows = {(r["mode"], r["precision"], r["impl"]): r for r in rows}
    for prec in PRECISIONS:
        for impl in IMPLS:
            none = rows[("none", prec, impl)]
            off = rows[("activations", prec, impl)]
            rec = rows[("recompute", prec, impl)]
            saved, inp = none["saved_formula"], none["input_formula"]
            assert set(none["per_block"]["device"]) == {saved}, (prec, impl)
            assert set(rec["per_block"]["device"]) == {inp}, (prec, impl)
            assert set(off["per_block"]["device"]) == {0}, (prec, impl)
            assert set(off["per_block"]["host"]) == {saved}, (prec, impl)
            assert off["forward_peak"] < rec["forward_peak"] < none["forward_peak"]
    # the formula for the course's block against the paper's per-layer count
    assert (
        gpt_block_saved_bytes(16, 4, 32, 4, bytes_per_element=2)
        < (layer_activation_bytes(16, 4, 32, 4)["device"])
    )


def test_activation_policies_apply_to_any_module():
    """One process, an MLP as one unit: same gradients under every policy and
    implementation; fewer device activation bytes after forward."""
    x = torch.randn(64, 32)
    grads, after = {}, {}
    for policy in ("none", "offload", "recompute"):
        for impl in IMPLS:
            model = MLP((32, 256, 256, 8), seed=5)
            transfers = Transfers("cpu")
            mem = MemoryTracker("cpu").watch(model)
            apply_activations(model, policy, impl=impl, units=[model],
                              transfers=transfers, track=mem.assign)  # fmt: skip
            with mem:
                mem.mark("init")
                loss = model(x).square().mean()
                after[policy, impl] = mem.mark("forward")["current"]["activations"]
                loss.backward()
            grads[policy, impl] = [p.grad.clone() for p in model.parameters()]
            if policy == "offload" and impl == "scratch":
                assert transfers.bytes["d2h"] == transfers.bytes["h2d"] > 0
    for key, g in grads.items():
        for a, b in zip(g, grads["none", "scratch"]):
            assert torch.equal(a, b), key
    for impl in IMPLS:
        assert after["recompute", impl] < after["none", impl]
        assert after["offload", impl] < after["none", impl]
    with pytest.raises(ValueError, match="policy must be one of"):
        apply_activations(MLP(), "swap")
    with pytest.raises(ValueError, match="transfers"):
        apply_activations(MLP(), "offload", units=[MLP()])


# ----------------------------------------------------------------- the pieces
def test_offload_optimizer_takes_any_optimizer_and_micro_batches(two):
    _, pieces = two
    for key, p in pieces.items():
        assert p["diff"] < 1e-5, (key, p)
        assert p["buckets"] >= 2
        # fp32: 4 bytes up per element of my slice; down, once per micro-batch
        # when the gradients live on the host, once per step when they do not
        down = 2 if key.endswith("True") else 1
        for moved in p["moved"]:
            assert moved["h2d"] == p["shard_bytes"], key
            assert moved["d2h"] == down * p["shard_bytes"], key


def test_host_adamw_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    shapes = (1000, 70_001, 7)
    for wd, tile in ((1e-2, 4096), (0.0, None), (0.1, 333)):
        ours = [torch.randn(n, requires_grad=True) for n in shapes]
        theirs = [p.detach().clone().requires_grad_() for p in ours]
        a = HostAdamW(ours, lr=1e-2, weight_decay=wd, tile_numel=tile)
        cls = torch.optim.AdamW if wd else torch.optim.Adam
        b = cls(theirs, lr=1e-2, weight_decay=wd)
        for _ in range(3):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            a.step()
            b.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), (wd, tile)
    # the scalar loop agrees in value (it runs in double precision)
    p, g = [0.5, -1.0, 2.0], [0.1, 0.2, -0.3]
    m, v = [0.0] * 3, [0.0] * 3
    naive_adam_(p, g, m, v, step=1, lr=1e-2)
    t = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    t.grad = torch.tensor(g)
    HostAdamW([t], lr=1e-2).step()
    torch.testing.assert_close(t.detach(), torch.tensor(p))
    with pytest.raises(ValueError, match="tile_numel"):
        HostAdamW([t], tile_numel=0)


def test_transfers_count_every_copy_and_torch_copies_are_seen():
    t = Transfers("cpu")
    mem = MemoryTracker("cpu")
    with mem:
        mem.mark("init")
        src = torch.ones(1000)
        down = t.to_host(src)
        up = t.to_device(down)
        e = mem.mark("copied")
    assert t.bytes == {"h2d": 4000, "d2h": 4000} and t.copies == {"h2d": 1, "d2h": 1}
    assert torch.equal(up, src) and up.data_ptr() != down.data_ptr()
    assert e["pools"]["host"]["current"]["activations"] == 4000  # down is host
    assert e["current"]["activations"] == 8000  # src and up are device
    assert t.reset()["bytes"] == {"h2d": 4000, "d2h": 4000} and t.bytes["h2d"] == 0
    assert pcie_seconds(32e9) == pytest.approx(1.0)  # 32 GB/s per direction
    with CrossDeviceCopies("cpu") as copies:
        torch.ones(10).to("meta")  # a device that is not the host: counted "h2d"
        torch.ones(10).cpu()  # the same tensor: no copy
        torch.ones(10).clone()
    assert copies.bytes == {"h2d": 40, "d2h": 0}


def test_pools_placement_threads_and_timeline():
    mem = MemoryTracker("cpu")
    assert current_placement() == "device"
    with mem:
        mem.mark("init")
        a = torch.zeros(100)
        with placement("host"):
            assert current_placement() == "host"
            h = torch.zeros(300)
            with placement("device"):
                d = torch.zeros(50)
        e = mem.mark("made")
        mem.assign("optimizer", h, pool="device")  # moved back
        f = mem.mark("moved")
    assert current_placement() == "device"
    assert e["current"]["activations"] == 600 and e["pools"]["device"] == {
        "current": e["current"], "peak": e["peak"], "peak_total": e["peak_total"]
    }  # fmt: skip
    assert e["pools"]["host"]["current"]["activations"] == 1200
    assert f["current"]["optimizer"] == 1200
    assert f["pools"]["host"]["current"] == dict.fromkeys(f["current"], 0)
    assert json.loads(json.dumps(mem.timeline())) == mem.timeline()
    assert pickle.loads(pickle.dumps(mem.timeline())) == mem.timeline()
    with pytest.raises(ValueError, match="pool must be one of"):
        mem.assign("other", a, pool="disk")
    with pytest.raises(ValueError, match="pool must be one of"):
        with placement("gpu"):
            pass
    del d
    # an optimizer step in another thread does not make this thread's tensors
    # step workspace (a dispatch mode and its step hooks are this thread's)
    model = MLP((8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mem2 = MemoryTracker("cpu").watch(model)
    with mem2:
        mem2.mark("init")
        model(torch.randn(2, 8)).sum().backward()
        worker = threading.Thread(target=opt.step)
        worker.start()
        worker.join()
        kept = torch.zeros(64)  # made after the other thread's step: an activation
        g = mem2.mark("after")
    assert g["current"]["activations"] >= 256 and g["current"]["other"] == 0
    del kept


# -------------------------------------------------------------- formulas, figures
def test_accounting_formulas_by_hand():
    psi, n = 1000, 3  # a slice is 334 elements
    z = {"params": 0, "grads": 0, "optimizer": 0}
    assert offload_state_bytes(psi, "none", world_size=n) == {
        "device": {"params": 2000, "grads": 668, "optimizer": 4008}, "host": z
    }  # fmt: skip
    assert offload_state_bytes(psi, "optimizer+grads", world_size=n) == {
        "device": {"params": 2000, "grads": 0, "optimizer": 0},
        "host": {"params": 0, "grads": 668, "optimizer": 4008},
    }
    fp32 = offload_state_bytes(psi, "optimizer", world_size=1, mixed_precision=False)
    assert fp32["host"]["optimizer"] == 12 * psi  # a master copy on the host too
    assert bytes_moved(psi, "params", world_size=n) == {"h2d": 1336, "d2h": 668}
    assert bytes_moved(psi, "recompute") == {"h2d": 0, "d2h": 0}
    t = paper_table1()
    assert (t["device"], t["host"], t["reduction"]) == (2, 14, 8)
    assert t["printed_device_reduction"] == 4  # "4M" would be a 4x reduction
    assert layer_activation_bytes(1, 1, 1, 1, "recompute")["device"] == 2
    with pytest.raises(ValueError, match="mode must be one of"):
        offload_state_bytes(10, "nvme")


def test_paper_13b_example_and_fits_sweep():
    ex = figures.paper_13b()
    assert ex["none"]["device_gb"] == pytest.approx(208) and not ex["none"]["fits"]
    assert ex["optimizer+grads"]["device_gb"] == pytest.approx(26)
    assert ex["optimizer+grads"]["host_gb"] == pytest.approx(182)
    assert ex["optimizer+grads"]["fits"] and ex["params"]["fits"]
    assert ex["none"]["largest_b"] == pytest.approx(2.0)  # 32 GB / 16 B
    assert ex["optimizer+grads"]["largest_b"] == pytest.approx(16.0)
    rows = figures.fits_rows([1e9, 13e9], 32e9, 1500e9)
    assert [r["fits"] for r in rows if r["params"] == 13e9] == [
        False,
        False,
        True,
        True,
    ]
    fig = figures.draw_fits()
    assert fig.get_size_inches()[0] <= 6.4


def test_fits_widget_prerenders_every_choice_for_the_static_book():
    """The static page's sliders switch between figures drawn at build time (a
    kernel-less page cannot redraw); the default is the paper's V100 in a DGX-2."""
    widget = figures.fits_widget()
    assert widget.values() == {"device_gb": figures.V100_GB, "host_gb": 1500}
    devices = widget.controls["device_gb"].options
    hosts = widget.controls["host_gb"].options
    assert len(widget.figure.children) == len(devices)  # a Stack per device size
    for stack in widget.figure.children:
        assert len(stack.children) == len(hosts)  # ... of one figure per host size
    assert len(widget.links) == 1 + len(devices)  # every control drives its Stacks
    live = figures.fits_widget(live=True)
    assert len(live.controls["device_gb"].options) > len(devices)
    live.controls["host_gb"].value = 64  # redraws in a kernel without raising
    assert live.figure.outputs[0]["output_type"] == "display_data"


def test_figures_draw_from_the_lab_reports(two, one):
    runs = by_mode(two[0])
    labelled = {m: runs[(m, "mixed", "scratch")] for m in MODES}
    figures.draw_pools(labelled)
    figures.draw_pools(labelled, rank=1, kind="after step")
    rows = figures.time_rows(labelled)
    assert len(rows) == len(MODES) and all(r["step"] > 0 for r in rows)
    figures.draw_step_time(rows)
    state = figures.state_rows(runs)
    assert all(r["worst"] <= 32 for r in state if r["impl"] == "scratch")
    assert figures.state_markdown(state).count("\n") == len(state) + 1
    moved = figures.moved_rows(runs)
    assert "per parameter" in figures.moved_markdown(moved)
    eq = figures.equivalence_rows(runs)
    same = [r for r in eq if r["impl"] == "scratch" and r["mode"] in SAME_LAYOUT]
    assert same and all(r["param_diff"] == 0 for r in same)
    assert figures.equivalence_markdown(eq).count("\n") == len(eq) + 1
    _, budgeted, _ = one
    pair = {m: [budgeted[m]] for m in ("none", "optimizer+grads")}
    fig = figures.draw_pools(pair)
    assert any("device budget" in t.get_text() for t in fig.axes[0].texts)


# ------------------------------------------------------------------ exercises
def test_device_bytes_check_accepts_the_answer_and_refuses_mistakes(capsys):
    exercises.check_device_bytes(exercises.device_bytes)
    assert "correct" in capsys.readouterr().out

    def all_sixteen(psi, layer, mode, n):  # forgets ZeRO-2's sharding in "none"
        if mode in ("none", "activations", "recompute"):
            return 16 * psi
        return exercises.device_bytes(psi, layer, mode, n)

    def no_working_set(psi, layer, mode, n):  # ZeRO-3 holds nothing on the device?
        return 0 if mode == "params" else exercises.device_bytes(psi, layer, mode, n)

    def floor_slice(psi, layer, mode, n):  # Psi // N elements, not ceil(Psi / N)
        got = exercises.device_bytes(psi - psi % n, layer, mode, n)
        whole = 2 * (psi % n) if mode not in ("params",) else 0  # the full 2 Psi
        return got + whole

    def grads_stay(psi, layer, mode, n):  # optimizer+grads keeps the 16-bit grads
        extra = 2 * -(-psi // n) if mode == "optimizer+grads" else 0
        return exercises.device_bytes(psi, layer, mode, n) + extra

    for wrong, words in ((all_sixteen, "ZeRO-2"), (no_working_set, "gathered"),
                         (floor_slice, "ceil"), (grads_stay, "expected")):  # fmt: skip
        with pytest.raises(AssertionError, match=words):
            exercises.check_device_bytes(wrong)


def test_bytes_moved_check_refuses_mistakes(capsys):
    exercises.check_bytes_moved(exercises.bytes_moved_reference)
    assert "correct" in capsys.readouterr().out

    def fp32_always(psi, mode, n, mixed):
        return bytes_moved(psi, mode, world_size=n, mixed_precision=False)

    def params_once(psi, mode, n, mixed):
        got = bytes_moved(psi, mode, world_size=n, mixed_precision=mixed)
        if mode == "params":
            got["h2d"] //= 2
        return got

    def whole_model(psi, mode, n, mixed):
        return bytes_moved(psi, mode, world_size=1, mixed_precision=mixed)

    for wrong in (fp32_always, params_once, whole_model):
        with pytest.raises(AssertionError, match="expected"):
            exercises.check_bytes_moved(wrong)


def _choose(forward_s: float, offload_s: float) -> str:
    return "recompute" if forward_s <= offload_s else "offload"


def _flops(s, b, h):
    return 24 * b * s * h * h + 4 * b * s * s * h


def test_recompute_or_offload_check_refuses_mistakes(capsys):
    exercises.check_recompute_or_offload(exercises.recompute_or_offload)
    assert "correct" in capsys.readouterr().out
    acts = layer_activation_bytes

    def one_way(s, b, h, a, bw, flops):  # forgets the trip back up in backward
        return _choose(_flops(s, b, h) / flops, acts(s, b, h, a)["device"] / bw)

    def whole_step(s, b, h, a, bw, flops):  # prices forward and backward again
        return _choose(3 * _flops(s, b, h) / flops, 2 * acts(s, b, h, a)["device"] / bw)

    def kept_bytes(s, b, h, a, bw, flops):  # moves only the 2sbh recompute keeps
        return _choose(_flops(s, b, h) / flops, 2 * 2 * s * b * h / bw)

    def no_attention(s, b, h, a, bw, flops):  # drops 5as/h and 4bs^2h
        return _choose(24 * b * s * h * h / flops, 2 * 34 * s * b * h / bw)

    for wrong in (one_way, whole_step, kept_bytes, no_attention):
        with pytest.raises(AssertionError, match="expected"):
            exercises.check_recompute_or_offload(wrong)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"offload": "nvme"}, "offload must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"impl": "deepspeed"}, "impl must be one of"),
        ({"impl": "torch", "offload": "optimizer"}, "impl='torch' has no offload"),
        ({"delayed_update": True, "offload": "params"}, "delayed_update applies"),
        ({"device_mem_mb": -1.0}, "device_mem_mb must be a number >= 0"),
        ({"device_mem_mb": float("nan")}, "device_mem_mb must be a finite"),
        ({"device_mem_mb": 1.0, "track_memory": False}, "needs track_memory"),
        ({"batch_size": 7}, "divide evenly"),
        ({"world_size": 0}, "world_size must be"),
    ],
)
def test_bad_config_raises_before_anything_starts(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Config(**kwargs)


def test_cli_error_comes_before_any_process(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launch must not be called")

    monkeypatch.setattr("utils.lab.launch", no_launch)
    with pytest.raises(SystemExit) as err:
        lab.main(["--offload", "gpu"])
    assert "offload must be one of" in str(err.value)
    with pytest.raises(SystemExit) as err:
        lab.main(["--impl", "torch", "--offload", "optimizer+grads"])
    assert "impl='torch' has no offload='optimizer+grads'" in str(err.value)


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_pieces_counted_copies_are_the_real_ones():
    cfg = replace(TINY, world_size=1, offload="optimizer+grads", backend="nccl")
    reports = lab.run(cfg)
    r = reports[0]
    assert r.backend == "nccl"
    for moved in r.extra.moved_per_step:
        assert moved == {"h2d": 2 * r.num_params, "d2h": 2 * r.num_params}
    after = figures._after_step(r)
    assert after["device"]["optimizer"] == 0 and after["host"]["optimizer"] > 0
    t = Transfers("cuda")
    with CrossDeviceCopies("cuda") as copies:
        host = t.to_host(torch.ones(256, device="cuda"))
        t.synchronize()
        t.to_device(host)
    assert copies.bytes == t.bytes == {"h2d": 1024, "d2h": 1024}
    assert t.seconds["h2d"] > 0
