"""labs.failures and utils.failures: each injected fault, run at 2 gloo ranks, is
diagnosed from what the tools printed, ends within its bound, and leaves no process.

Each fault's run is made once per module (``outputs``) and shared by the tests
that read it; the launcher's fork server is started first, so that the time
bounds below measure the jobs, not that start.
"""

from __future__ import annotations

import multiprocessing.forkserver as forkserver
import multiprocessing.resource_tracker as resource_tracker
import re
import time
from dataclasses import replace

import psutil
import pytest
import torch

from labs import failures as lab
from tests import _launch_workers as w
from utils import _procs
from utils.failures import (
    DIAGNOSES,
    Captured,
    capture,
    check_diagnosis,
    diagnose,
)
from utils.launch import LaunchError, launch
from utils.models import MLP, count_params

BASE = replace(lab.TINY, backend="gloo")
CASES = {
    "none": dict(fault="none"),
    "size": dict(fault="collective_mismatch", rank=1),
    "size_rank0": dict(fault="collective_mismatch", rank=0),
    "op": dict(fault="collective_mismatch", mismatch="op"),
    "checked_size": dict(fault="collective_mismatch", check_collectives=True),
    "checked_op": dict(
        fault="collective_mismatch", mismatch="op", check_collectives=True
    ),
    "hung": dict(fault="hung_rank", rank=1),
    "oom": dict(fault="oom", rank=1),
    "loss_scaling": dict(fault="loss_scaling"),
}
"""Every run the tests read: a name -> the Config's changes from ``BASE``."""
WAITS = {"op", "hung"}
"""The runs that end by a collective timing out (the others end at once)."""
SLACK_S = 4.0
"""What a job may take beyond its bound: training two steps, the launcher's
``GRACE_S`` and ``WATCH_S``, on a loaded 2-core machine."""


def cfg_of(name: str) -> lab.Config:
    return replace(BASE, **CASES[name])


def rank_processes() -> list[psutil.Process]:
    """Our descendants, minus multiprocessing's long-lived helpers."""
    helpers = {
        forkserver._forkserver._forkserver_pid,
        resource_tracker._resource_tracker._pid,
    }
    return [
        p for p in psutil.Process().children(recursive=True) if p.pid not in helpers
    ]


def wait_no_rank_processes(seconds: float = 3.0) -> list[psutil.Process]:
    end = time.monotonic() + seconds
    while (left := rank_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


class Outputs(dict):
    """name -> ``Captured`` of that run, made on first use; ``survivors[name]``:
    the processes it left behind (a rank, or anything a rank started)."""

    def __init__(self):
        super().__init__()
        self.survivors: dict[str, list] = {}

    def __missing__(self, name: str) -> Captured:
        captured = capture(lab.run_and_describe, cfg_of(name), echo=False)
        self[name] = captured
        self.survivors[name] = wait_no_rank_processes()
        return captured


@pytest.fixture(scope="module")
def outputs() -> Outputs:
    launch(w.rank_info, world_size=2, backend="gloo")  # starts the fork server
    return Outputs()


# ---------------------------------------------------- each fault, diagnosed
EXPECTED = {
    "none": ("none", None),
    "size": ("collective_mismatch", 1),
    "size_rank0": ("collective_mismatch", 0),
    "op": ("collective_mismatch", None),
    "checked_size": ("collective_mismatch", None),
    "checked_op": ("collective_mismatch", None),
    "hung": ("hung_rank", 1),
    "oom": ("oom", 1),
    "loss_scaling": ("loss_scaling", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_fault_is_diagnosed_bounded_and_leaves_no_process(outputs, name):
    cfg, out = cfg_of(name), outputs[name]
    found = diagnose(out)
    assert (found.fault, found.rank) == EXPECTED[name], (str(found), out.text[-2000:])
    assert found.evidence and found.evidence in out.text
    assert outputs.survivors[name] == []
    assert out.seconds < cfg.timeout + _procs.GRACE_S + SLACK_S
    if name in WAITS:  # a collective timed out: not before the timeout
        assert out.seconds >= cfg.timeout
    if EXPECTED[name][0] in ("none", "loss_scaling"):
        assert out.error is None
    else:
        assert isinstance(out.error, LaunchError)


def test_a_size_mismatch_aborts_the_rank_with_the_smaller_buffer(outputs):
    for name in ("size", "size_rank0"):
        out, cfg = outputs[name], cfg_of(name)
        assert (out.error.kind, out.error.rank) == ("killed", cfg.rank)
        assert "SIGABRT" in str(out.error)
        assert "Is there a distributed collective mismatch" in out.text
        # the rank's faulthandler: the collective it died in, by its Python stack
        assert "Fatal Python error: Aborted" in out.text
        assert re.search(r"in all_reduce\n.*in sync_gradients", out.text)
        found = diagnose(out).numbers
        assert found["message_bytes"] > found["receive_bytes"]


def test_a_checked_group_names_both_collectives(outputs):
    size, op = diagnose(outputs["checked_size"]), diagnose(outputs["checked_op"])
    n = count_params(MLP(BASE.sizes))
    last_bias = BASE.sizes[-1]  # what the faulty rank leaves out
    assert size.numbers["ops"] == {
        0: f"ALLREDUCE[{n}]",
        1: f"ALLREDUCE[{n - last_bias}]",
    }
    assert op.numbers["ops"] == {0: f"ALLREDUCE[{n}]", 1: f"BROADCAST[{n}]"}
    assert size.numbers["ranks"] == op.numbers["ranks"] == (0, 1)


def test_a_hung_rank_is_named_with_the_timeout_its_peer_waited(outputs):
    found, cfg = diagnose(outputs["hung"]), cfg_of("hung")
    assert found.numbers["timeout_s"] == cfg.timeout
    assert found.numbers["waiting_rank"] == 1 - cfg.rank
    assert f"rank {cfg.rank} hung" in found.fact
    assert "Timed out" in outputs["hung"].text  # the waiting rank's error


def test_the_oom_names_the_budget_and_a_clean_rank_fits_it(outputs):
    found, cfg = diagnose(outputs["oom"]), cfg_of("oom")
    assert found.numbers["budget"] == cfg.device_budget
    assert found.numbers["pool"] == "device"
    assert 0 < found.numbers["need"] < cfg.device_budget
    # the same budget holds a rank that trains on its share, with room to spare
    for report in outputs["none"].result:
        assert report.extra.peak_device_bytes < cfg.device_budget


def test_a_clean_run_is_the_single_process_reference(outputs):
    reports, ref = outputs["none"].result, lab.reference(BASE)
    for r in reports:
        torch.testing.assert_close(r.losses, ref["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            r.extra.grad_norms, ref["grad_norms"], rtol=1e-5, atol=1e-7
        )
    assert diagnose(outputs["none"]).numbers["factor"] == pytest.approx(1, rel=1e-3)


def test_summed_gradients_are_world_size_times_the_reference(outputs):
    reports, ref = outputs["loss_scaling"].result, lab.reference(BASE)
    r0 = reports[0]
    assert r0.extra.grad_norms[0] == pytest.approx(
        BASE.world_size * ref["grad_norms"][0], rel=1e-5
    )
    assert r0.losses[0] == pytest.approx(ref["losses"][0], rel=1e-5)  # same start
    assert r0.losses[-1] != pytest.approx(ref["losses"][-1], rel=1e-4)  # then not
    factor = diagnose(outputs["loss_scaling"]).numbers["factor"]
    assert factor == pytest.approx(BASE.world_size, rel=1e-3)


# ------------------------------------------------------- the exercise check
def test_check_diagnosis_accepts_the_right_reading(outputs, capsys):
    cfg = cfg_of("oom")
    check_diagnosis(outputs["oom"], "oom", cfg.rank, budget=cfg.device_budget)
    check_diagnosis(outputs["hung"].text, "hung_rank", 1, timeout_s=cfg.timeout)
    check_diagnosis(outputs["loss_scaling"], "loss_scaling", None, factor=2)
    assert capsys.readouterr().out.count("correct: ") == 3


@pytest.mark.parametrize(
    "name, answer, words",
    [
        ("hung", ("collective_mismatch", 1), "does not show 'collective_mismatch'"),
        ("hung", ("hung_rank", 0), "rank=0 is not the rank at fault"),
        ("op", ("collective_mismatch", 1), "rank=1 is not the rank at fault"),
        ("oom", ("oom", 1, {"budget": 2**20}), "budget=1048576 does not match"),
        ("oom", ("oom", 1, {"speed": 1}), "no figure 'speed'"),
    ],
)
def test_check_diagnosis_refuses_a_wrong_reading_with_a_hint(
    outputs, name, answer, words
):
    fault, rank, *facts = answer
    with pytest.raises(AssertionError, match=words) as info:
        check_diagnosis(outputs[name], fault, rank, **(facts[0] if facts else {}))
    assert diagnose(outputs[name]).evidence in str(info.value) or "figure" in words


def test_check_diagnosis_wants_a_known_fault_and_a_rank(outputs):
    with pytest.raises(ValueError, match="fault must be one of"):
        check_diagnosis(outputs["hung"], "hang", 1)
    with pytest.raises(TypeError, match="say which rank"):
        check_diagnosis(outputs["hung"], "hung_rank")


# ---------------------------------------------------------- diagnose itself
def test_diagnose_reads_a_string_an_exception_or_a_capture(outputs):
    out = outputs["hung"]
    assert diagnose(out) == diagnose(out.text) == diagnose(out.error)
    assert diagnose("all went well").fault == "unknown"
    assert set(EXPECTED[n][0] for n in CASES) <= set(DIAGNOSES)
    with pytest.raises(TypeError, match="reads a str"):
        diagnose(42)


def test_the_tools_other_messages_are_diagnosed_too():
    """Messages of the course's tools this lab does not provoke, made by them."""
    from utils.lab import check_finite

    with pytest.raises(FloatingPointError) as info:
        check_finite(float("nan"), step=4)
    found = diagnose(info.value)
    assert (found.fault, found.numbers["step"]) == ("diverged", 4)
    with pytest.raises(LaunchError) as info:
        launch(w.raise_on, 1, world_size=2, backend="gloo", timeout=30)
    found = diagnose(info.value)
    assert (found.fault, found.rank) == ("raised", 1)
    assert "ValueError: boom from rank 1" in found.fact
    assert wait_no_rank_processes() == []


# ----------------------------------------------------------- config and CLI
@pytest.mark.parametrize(
    "change, words",
    [
        (dict(fault="hung_rank", rank=2), "rank must be an integer <= 1, got 2"),
        (dict(fault="oom", world_size=1, rank=0), "needs world_size >= 2"),
        (dict(fault="hung_rank", steps=1), "needs steps >= 2"),
        (dict(timeout=0), "timeout must be a number > 0"),
        (dict(fault="stall"), "fault must be one of"),
        (dict(mismatch="dtype"), "mismatch must be one of"),
        (dict(rows_per_rank=0), "rows_per_rank must be an integer >= 1"),
    ],
)
def test_bad_configs_are_refused_before_any_rank_starts(change, words):
    with pytest.raises(ValueError, match=words):
        replace(BASE, **change)


def test_a_run_without_a_one_rank_fault_ignores_rank():
    assert lab.Config(world_size=1).rank == 1  # `--world-size 1` runs as it is
    assert replace(BASE, fault="loss_scaling", world_size=4, rank=7).rank == 7
    assert count_params(MLP(lab.Config().sizes)) == 76_296  # Config.sizes says so


def test_the_command_line_prints_the_launchers_verdict_and_exits_1(outputs, capsys):
    argv = ["--fault", "oom", "--steps", "2", "--backend", "gloo"]
    with pytest.raises(SystemExit) as info:
        lab.main(argv)  # what `python -m labs.failures ...` runs
    assert info.value.code == 1
    printed = capsys.readouterr()
    assert "error: LaunchError: rank 1 raised" in printed.err
    found = diagnose(printed.out + printed.err)
    assert (found.fault, found.rank) == ("oom", 1)
    assert wait_no_rank_processes() == []


def test_the_command_line_prints_the_verdict_on_a_run_that_finished(outputs, capsys):
    lab.main(["--fault", "loss_scaling", "--steps", "2", "--backend", "gloo"])
    found = diagnose(capsys.readouterr().out)
    assert found.fault == "loss_scaling"
    assert found.numbers["world_size"] == 2
