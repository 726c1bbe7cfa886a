"""utils.launch: results, faults (raise, hang, kill, interrupt), bad input, torchrun.

Worker functions live in tests/_launch_workers.py because the ranks import them by
module path. Everything here runs on CPU/gloo; GPU tests skip without CUDA. Where
``auto`` puts the ranks (one GPU per rank, sharing the GPUs, CPU) is tested with the
GPU count mocked in tests/test_shared_gpu.py.
"""

import _thread
import functools
import glob
import multiprocessing.forkserver as forkserver
import multiprocessing.resource_tracker as resource_tracker
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests import _launch_workers as w
from utils import launch as launch_module
from utils.launch import (
    LaunchConfigError,
    LaunchError,
    in_torchrun,
    launch,
    rank_device,
    rank_print,
    resolve_backend,
    synchronize,
)

ROOT = Path(__file__).resolve().parents[1]
GPUS = launch_module.cuda_gpus()
HAVE = f"{GPUS} CUDA GPU" + ("" if GPUS == 1 else "s")  # as the messages count them


def rank_processes() -> list[psutil.Process]:
    """Our descendants, minus multiprocessing's long-lived helpers."""
    helpers = {
        forkserver._forkserver._forkserver_pid,
        resource_tracker._resource_tracker._pid,
    }
    return [
        p for p in psutil.Process().children(recursive=True) if p.pid not in helpers
    ]


def wait_no_rank_processes(seconds=3.0) -> list[psutil.Process]:
    end = time.monotonic() + seconds
    while (left := rank_processes()) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def _no_orphans():
    """Every test must leave no rank process behind."""
    yield
    assert wait_no_rank_processes() == []


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_in_rank_order(world_size, capsys):
    results = launch(w.rank_info, world_size=world_size, backend="gloo")
    expected_sum = sum(range(world_size))
    threads = max(1, len(os.sched_getaffinity(0)) // world_size)
    assert results == [
        (r, world_size, expected_sum, threads, "cpu") for r in range(world_size)
    ]
    assert (
        f"launch: {world_size} ranks on gloo (CPU processes)" in capsys.readouterr().out
    )


def test_auto_backend_says_why(capsys):
    if GPUS >= 1:
        pytest.skip("auto puts the ranks on the GPUs here")
    launch(w.rank_info, world_size=2)
    out = capsys.readouterr().out
    assert "launch: 2 ranks on gloo (CPU processes): 0 CUDA GPUs < 2 ranks" in out


def test_rank_output_reaches_the_caller(capsys):
    assert launch(w.print_and_return, "hi", world_size=2) == [("hi", 0), ("hi", 1)]
    out = capsys.readouterr().out
    assert "[rank 0] hello hi\n" in out and "[rank 1] hello hi\n" in out


def test_raising_rank_is_named_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(w.raise_on, 1, world_size=4, timeout=30)
    assert time.monotonic() - start < 10
    err = info.value
    assert (err.rank, err.kind) == (1, "raised")
    text = str(err)
    assert text.startswith("rank 1 raised")
    assert "ValueError: boom from rank 1" in text
    assert "in raise_on" in text and "Traceback (most recent call last)" in text
    assert wait_no_rank_processes(seconds=1.0) == []  # the others were stopped


def test_hanging_rank_is_named_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(w.hang_in_collective, 1, world_size=3, timeout=2)
    took = time.monotonic() - start
    assert 2 <= took < 8
    err = info.value
    assert (err.rank, err.kind, err.ranks) == (1, "hung", [1])
    assert str(err).startswith("rank 1 hung")
    assert "Timed out" in str(err)  # the waiting rank's error, as context


def test_rank_that_never_returns_is_named_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(w.never_return, 1, world_size=2, timeout=1.5)
    assert 1.5 <= time.monotonic() - start < 6
    assert (info.value.rank, info.value.kind) == (1, "hung")
    assert "still running 1.5 s after the first rank returned" in str(info.value)


def test_killed_rank_is_named_with_the_signal():
    with pytest.raises(LaunchError) as info:
        launch(w.kill_self, 1, world_size=3, timeout=30)
    assert (info.value.rank, info.value.kind) == (1, "killed")
    assert "rank 1 was killed by SIGKILL" in str(info.value)


def test_mismatched_collectives_name_the_waiting_rank():
    with pytest.raises(LaunchError) as info:
        launch(w.mismatched, world_size=2, timeout=2)
    assert (info.value.rank, info.value.kind) == (0, "hung")
    assert "failed waiting for other ranks" in str(info.value)


def test_an_error_that_mentions_timeout_is_still_blamed_on_its_rank():
    with pytest.raises(LaunchError) as info:
        launch(w.user_timeout_error, 1, world_size=2, timeout=30)
    assert (info.value.rank, info.value.kind) == (1, "raised")
    assert "ValueError: timeout must be positive" in str(info.value)


def test_unpicklable_result_is_reported_by_its_rank():
    with pytest.raises(LaunchError) as info:
        launch(w.unpicklable_result, world_size=2)
    assert info.value.kind == "raised" and "pickle" in str(info.value)


def test_result_the_caller_cannot_unpickle_is_reported():
    with pytest.raises(LaunchError) as info:
        launch(w.result_only_the_rank_can_unpickle, world_size=2)
    assert info.value.kind == "raised"
    assert re.search(r"could not unpickle rank [01]'s result", str(info.value))
    assert "OnlyInTheRank" in str(info.value)


def test_a_crashed_rank_shows_where_it_crashed(capfd):
    """A SIGSEGV kills the rank before Python can send a traceback back; its
    faulthandler prints the Python stack to the rank's stderr, which we forward."""
    with pytest.raises(LaunchError) as info:
        launch(w.segfault_in_native_code, 1, world_size=2, timeout=30)
    assert (info.value.rank, info.value.kind) == (1, "killed")
    assert "rank 1 was killed by SIGSEGV" in str(info.value)
    assert "Python stacks are in its stderr above" in str(info.value)
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err
    assert "segfault_in_native_code" in err  # the function it died in


def test_ranks_die_when_the_caller_is_killed():
    """PR_SET_PDEATHSIG: SIGKILL the caller, its fork server and ranks follow."""
    code = (
        "from utils.launch import launch\n"
        "from tests._launch_workers import pid_then_sleep\n"
        "launch(pid_then_sleep, 60, world_size=2)\n"
    )
    caller = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = []
        for line in caller.stdout:
            if "] pid " in line:
                pids.append(int(line.split()[-1]))
            if len(pids) == 2:
                break
        assert len(pids) == 2
    finally:
        caller.kill()
        caller.wait()
    end = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < end:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.05)
    assert alive == []
    # The killed caller could not remove its rendezvous folder; the next launch does.
    left = glob.glob(os.path.join(tempfile.gettempdir(), f"parlaunch-{caller.pid}-*"))
    assert left, "expected the killed caller's rendezvous folder"
    launch(w.tensor_result, 1, world_size=1, backend="gloo")
    assert not any(os.path.exists(p) for p in left)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, seconds=5.0) -> list[int]:
    """The pids still running (not zombies) after up to ``seconds``."""
    end = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]
    return alive


def printed_pids(text: str, word: str) -> list[int]:
    return [int(m) for m in re.findall(rf"\] {word} (\d+)", text)]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(world_size=0), ValueError, "world_size must be a positive int, got 0"),
        (dict(world_size=-2), ValueError, "got -2"),
        (dict(world_size=True), TypeError, "got True"),
        (dict(world_size=2.0), TypeError, "got 2.0"),
        (dict(world_size="2"), TypeError, "got '2'"),
        (dict(world_size=2, backend="mpi"), ValueError, "'auto'"),
        (dict(world_size=2, timeout=0), ValueError, "timeout"),
        (dict(world_size=2, timeout=-1.0), ValueError, "timeout"),
        (dict(world_size=2, timeout="5"), ValueError, "timeout"),
        (dict(world_size=2, timeout=float("nan")), ValueError, "timeout"),
    ],
)
def test_bad_input_is_refused_before_any_process_starts(kwargs, error, words):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(error, match=words):
        launch(w.rank_info, **kwargs)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError) as info:
        resolve_backend("mpi", 2)
    assert all(repr(b) in str(info.value) for b in launch_module.BACKENDS)
    assert "'gloo-cuda'" in str(info.value)


def _nested_worker():
    def inner():
        return 1

    return inner


def _in_main():
    return 1


_in_main.__module__ = "__main__"  # what a notebook cell or script function reports


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda: 1, "it is a lambda"),
        (_nested_worker(), "defined inside another function"),
        (_in_main, "defined in '__main__'"),
        (functools.partial(lambda x: x, 1), "it is a lambda"),
    ],
)
def test_non_importable_function_is_refused(fn, why, monkeypatch):
    # What a notebook kernel looks like: a __main__ with no module name.
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(TypeError) as info:
        launch(fn, world_size=2)
    assert why in str(info.value)
    assert "module path" in str(info.value) and "labs/" in str(info.value)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_unpicklable_arguments_are_refused():
    with pytest.raises(TypeError, match="must pickle"):
        launch(w.print_and_return, threading.Lock(), world_size=2)


def test_two_launches_at_once_do_not_collide():
    results = {}

    def run(tag, world_size):
        results[tag] = launch(w.tagged_sum, tag, 1.0, world_size=world_size)

    jobs = {"a": 2, "b": 3}
    threads = [threading.Thread(target=run, args=job) for job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {tag: [r[0] for r in rs] for tag, rs in results.items()} == {
        tag: [(tag, r, sum(range(n))) for r in range(n)] for tag, n in jobs.items()
    }
    spans = [r[1] for rs in results.values() for r in rs]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all ran at once


def test_keyboard_interrupt_leaves_no_rank_processes():
    launch(w.rank_info, world_size=2)  # warm: the interrupt lands while ranks run
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch(w.sleep_then_return, 60, world_size=2)
    assert time.monotonic() - start < 5
    assert wait_no_rank_processes() == []


def test_nccl_without_enough_gpus_is_a_value_error():
    with pytest.raises(ValueError, match=f"{HAVE} < {GPUS + 1} ranks"):
        launch(w.rank_info, world_size=GPUS + 1, backend="nccl")


def test_bad_backend_is_a_launch_config_error_before_any_process_starts():
    n = GPUS + 1
    expected = (
        f"backend='nccl' needs one GPU per rank: {HAVE} < {n} ranks "
        "(use backend='auto' or 'gloo')"
    )
    with pytest.raises(LaunchConfigError) as info:
        resolve_backend("nccl", n)
    assert str(info.value) == expected
    assert isinstance(info.value, ValueError)  # what callers caught so far
    launch_module.shutdown()  # so that we see whether launch starts a fork server
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(LaunchConfigError, match=re.escape(expected)):
        launch(w.rank_info, world_size=n, backend="nccl")
    assert forkserver._forkserver._forkserver_pid is None
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    # Every refusal before a start is one: wrong types stay TypeErrors too.
    for kwargs in (dict(world_size=0), dict(world_size=2, backend="mpi")):
        with pytest.raises(LaunchConfigError):
            launch(w.rank_info, **kwargs)
    with pytest.raises(LaunchConfigError) as info:
        launch(w.rank_info, world_size=True)
    assert isinstance(info.value, TypeError)
    with pytest.raises(LaunchConfigError, match="must pickle"):
        launch(w.print_and_return, threading.Lock(), world_size=2)


@pytest.mark.skipif(GPUS >= 2, reason="nccl would start here")
def test_a_command_line_shows_bad_launch_input_alone_and_exits_2():
    """What a lab's main does: catch LaunchConfigError, print it, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests._launch_workers", "--backend", "nccl"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: backend='nccl' needs one GPU per rank: {HAVE} < 2 ranks "
        "(use backend='auto' or 'gloo')\n"
    )
    assert "launch:" not in proc.stdout  # refused before it said what it starts


def test_helpers_outside_a_rank(capsys, monkeypatch):
    assert rank_device() == torch.device("cpu")
    synchronize(torch.device("cpu"))  # no-op, must not touch CUDA
    monkeypatch.setenv("RANK", "3")
    rank_print("a", 1)
    assert capsys.readouterr().out == "[rank 3] a 1\n"
    for key in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert not in_torchrun()
    for key, value in dict(WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="h").items():
        monkeypatch.setenv(key, value)
    assert in_torchrun()


def test_under_torchrun_launch_joins_the_existing_world(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    env["TMPDIR"] = str(tmp_path)  # torchrun leaves a torchelastic_* folder there
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        + ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]  # no fixed port
        + ["-m", "tests._launch_workers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    threads = 1  # torchrun sets OMP_NUM_THREADS=1; launch leaves its ranks alone
    assert "launch: joined torchrun's 2 ranks on gloo" in proc.stdout
    assert f"results: [(0, 2, 1, {threads}, 'cpu'), (1, 2, 1," in proc.stdout
    assert proc.stdout.count("results:") == 1  # printed by rank 0 only


def test_python_dash_m_module_can_launch_its_own_worker():
    """``python -m labs.x`` launches ``worker`` from its own ``__main__``."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests._launch_workers"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"results: [(0, 2, 1, {threads}, 'cpu'), (1, 2, 1, {threads}," in proc.stdout


def test_from_a_notebook_kernel():
    """The main use: ranks' output lands in the cell, cell functions are refused."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = [
        "from utils.launch import launch\n"
        "from tests._launch_workers import print_and_return",
        "launch(print_and_return, 'nb', world_size=2)",
        "def in_a_cell():\n    return 1\n"
        "try:\n    launch(in_a_cell, world_size=2)\n"
        "except TypeError as e:\n    print('refused:', e)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        nb, timeout=60, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute(env={**os.environ, "PYTHONPATH": str(ROOT)})

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs)

    assert "[rank 0] hello nb" in text(nb.cells[1])
    assert "[rank 1] hello nb" in text(nb.cells[1])
    assert "('nb', 1)" in nb.cells[1].outputs[-1]["data"]["text/plain"]
    assert "refused: launch cannot run 'in_a_cell'" in text(nb.cells[2])


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_one_nccl_rank_on_one_gpu(capsys):
    assert launch(w.rank_info, world_size=1)[0][4] == "cuda:0"
    assert "1 ranks on nccl (one GPU per rank)" in capsys.readouterr().out
    # More ranks than GPUs: auto shares them through gloo, rank r on cuda:(r % GPUs).
    results = launch(w.rank_info, world_size=GPUS + 1)
    assert [r[4] for r in results] == [f"cuda:{r % GPUS}" for r in range(GPUS + 1)]
    assert [r[2] for r in results] == [sum(range(GPUS + 1))] * (GPUS + 1)
    assert f"ranks on gloo (sharing {HAVE})" in capsys.readouterr().out
    # gloo alone still means CPU processes, GPUs or not.
    assert launch(w.rank_info, world_size=2, backend="gloo")[0][4] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
def test_nccl_ranks_get_one_gpu_each(capsys):
    results = launch(w.rank_info, world_size=2)
    assert [r[4] for r in results] == ["cuda:0", "cuda:1"]
    assert [r[2] for r in results] == [1, 1]
    assert "ranks on nccl (one GPU per rank)" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
def test_nccl_raising_rank_is_named():
    with pytest.raises(LaunchError) as info:
        launch(w.raise_on, 1, world_size=2, timeout=30)
    assert (info.value.rank, info.value.kind) == (1, "raised")


def test_doctor_passes_here(capsys):
    from utils import doctor

    code = doctor.main()
    out = capsys.readouterr().out
    assert code == 0, out
    for words in ("Python", "torch", "GPUs", "/dev/shm", "4-rank lab", "2-rank gloo"):
        assert words in out
    assert "FAIL" not in out
    assert re.search(r"OK +gloo bind address +launch's ranks: 127\.0\.0\.1", out)


def test_doctor_reports_a_failing_check_and_runs_the_others(capsys, monkeypatch):
    from utils import doctor

    def low_memory():
        raise MemoryError("cannot allocate 64 MiB")

    monkeypatch.setattr(doctor, "_shm", low_memory)
    code = doctor.main()
    out = capsys.readouterr().out
    assert code != 0
    assert re.search(r"FAIL +/dev/shm +MemoryError: cannot allocate 64 MiB", out)
    for words in ("Python", "torch", "GPUs", "4-rank lab", "2-rank gloo", "bind"):
        assert words in out
    assert "something FAILed" in out


def test_ranks_can_return_tensors():
    results = launch(w.tensor_result, 3, world_size=2, backend="gloo")
    assert [r.tolist() for r in results] == [[0.0] * 3, [1.0] * 3]


def test_no_rendezvous_folder_outlives_its_job():
    # Ours only: other processes on this machine may be launching jobs meanwhile.
    pattern = os.path.join(tempfile.gettempdir(), f"parlaunch-{os.getpid()}-*")
    before = set(glob.glob(pattern))
    launch(w.tensor_result, 2, world_size=2, backend="gloo")
    with pytest.raises(LaunchError):
        launch(w.raise_on, 1, world_size=2, backend="gloo")
    assert set(glob.glob(pattern)) == before


# ---------------------------------------------------------------- what ranks start
@pytest.mark.parametrize("kind", ["plain", "session", "orphan"])
@pytest.mark.parametrize("then", ["return", "raise"])
def test_no_process_a_rank_started_outlives_the_job(kind, then, capsys):
    """Each rank leads its own process group (killed after the job) and is the
    subreaper of what it starts (killed by the rank itself as it ends)."""
    if then == "return":
        pids = launch(w.start_grandchild, kind, world_size=2)
    else:
        with pytest.raises(LaunchError) as info:
            launch(w.start_grandchild, kind, "raise", world_size=2)
        assert info.value.kind == "raised"
        pids = printed_pids(capsys.readouterr().out, "grandchild")
    assert len(pids) == 2
    assert wait_gone(pids, seconds=2.0) == []


def test_ranks_can_start_dataloader_workers():
    assert launch(w.dataloader_sum, 2, world_size=2) == [66.0, 66.0]


def test_non_ascii_output_survives_the_pipe_chunks(capsys):
    n = 200_000  # 400,000 bytes: about six reads of 64 KiB
    launch(w.print_wide, "é", n, world_size=1)
    out = capsys.readouterr().out
    assert "<" + "é" * n + ">\n" in out
    assert "\ufffd" not in out


# ---------------------------------------------------------------- caller signals
_CALLER = (
    "from utils.launch import launch\n"
    "from tests._launch_workers import start_grandchild\n"
    "launch(start_grandchild, {kind!r}, 'sleep', world_size=2)\n"
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_caller_stopped_by_a_signal_leaves_nothing_behind(signum):
    """SIGTERM / SIGHUP: the job is cleaned up, then the caller dies of it."""
    caller = subprocess.Popen(
        [sys.executable, "-c", _CALLER.format(kind="plain")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        grandchildren = []
        for line in caller.stdout:
            grandchildren += printed_pids(line, "grandchild")
            if len(grandchildren) == 2:
                break
        ranks = [p.pid for p in psutil.Process(caller.pid).children(recursive=True)]
        caller.send_signal(signum)
        assert caller.wait(20) == -signum  # it dies of the signal, as it would have
    finally:
        caller.kill()
        caller.wait()
    assert len(grandchildren) == 2
    pattern = os.path.join(tempfile.gettempdir(), f"parlaunch-{caller.pid}-*")
    assert glob.glob(pattern) == []
    assert wait_gone(ranks + grandchildren) == []


def test_second_ctrl_c_during_the_cleanup_still_cleans_up():
    """A fast double Ctrl-C: the second lands while the ranks are being stopped."""
    launch(w.rank_info, world_size=1)  # warm, so the first interrupt finds it running
    pattern = os.path.join(tempfile.gettempdir(), f"parlaunch-{os.getpid()}-*")
    before = set(glob.glob(pattern))
    # The rank ignores SIGTERM and holds the GIL: stopping it takes 1 s (SIGKILL).
    timers = [threading.Timer(t, _thread.interrupt_main) for t in (1.5, 2.0)]
    for t in timers:
        t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(w.spin_holding_the_gil, world_size=1)
        assert set(glob.glob(pattern)) == before
        assert wait_no_rank_processes(seconds=1.0) == []
    finally:
        for t in timers:
            t.join()
        for p in rank_processes():  # before the fix: do not leave it spinning
            p.kill()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_our_own_folders_of_dead_callers():
    tmp = tempfile.gettempdir()
    pid = _dead_pid()
    ours = tempfile.mkdtemp(prefix=f"parlaunch-{pid}-", dir=tmp)
    theirs = tempfile.mkdtemp(prefix=f"parlaunch-{pid}-", dir=tmp)
    live = tempfile.mkdtemp(prefix=f"parlaunch-{os.getpid()}-", dir=tmp)
    try:
        if os.getuid() == 0:
            os.chown(theirs, 12345, 12345)  # another user's job
        launch_module._sweep_rendezvous()
        assert not os.path.exists(ours)
        assert os.path.exists(live)  # its caller (this process) is running
        if os.getuid() == 0:
            assert os.path.exists(theirs)
    finally:
        for path in (ours, theirs, live):
            shutil.rmtree(path, ignore_errors=True)


def test_rendezvous_folders_are_private():
    modes = launch(w.rendezvous_modes, os.getpid(), world_size=1)[0]
    assert len(modes) >= 2  # the job's FileStore folder and the fork server's
    assert set(modes) == {"0o700"}


# ---------------------------------------------------------------- bind address
def test_gloo_listens_on_loopback_only():
    for addresses in launch(w.listening_addresses, world_size=2, backend="gloo"):
        assert addresses and set(addresses) <= {"127.0.0.1", "::1"}


def _external_ipv4() -> str | None:
    return next(iter(_external_interfaces().values()), None)


def _external_interfaces() -> dict[str, str]:
    """{interface: its IPv4 address} for the interfaces other than loopback."""
    return {
        name: a.address
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family.name == "AF_INET" and not a.address.startswith("127.")
    }


def test_gloo_listens_where_the_user_says(monkeypatch):
    """A GLOO_SOCKET_IFNAME the caller set (now, after the fork server started)
    wins over loopback."""
    if not _external_interfaces():
        pytest.skip("no interface other than loopback")
    name, address = next(iter(_external_interfaces().items()))
    launch(w.rank_info, world_size=1)  # the fork server starts without it
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", name)
    for addresses in launch(w.listening_addresses, world_size=2, backend="gloo"):
        assert addresses == [address]


def test_gloo_listens_on_loopback_even_when_the_hostname_is_external(tmp_path):
    """Left to itself gloo binds the address the hostname resolves to: make the
    hostname resolve to this machine's external address (in private mount and UTS
    namespaces, as root) and check the ranks still listen on loopback only."""
    address = _external_ipv4()
    if address is None or os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root, unshare and a non-loopback IPv4 address")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{address} farhost\n")
    code = (
        "from utils.launch import launch\n"
        "from tests._launch_workers import listening_addresses\n"
        "print('addresses', launch(listening_addresses, world_size=2))\n"
    )
    script = (
        f"mount --bind {hosts} /etc/hosts && hostname farhost && "
        f'exec {sys.executable} -c "$0"'
    )
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "sh", "-c", "getent hosts $(hostname)"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare failed: {probe.stderr!r}")
    proc = subprocess.run(
        ["unshare", "--mount", "--uts", "sh", "-c", script, code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "addresses [['127.0.0.1'], ['127.0.0.1']]" in proc.stdout


# ---------------------------------------------------------------- torchrun hang
def test_under_torchrun_the_hung_rank_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    env["TMPDIR"] = str(tmp_path)  # torchrun leaves a torchelastic_* folder there
    start = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/torchrun"), "--nproc-per-node", "2"]
        + ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
        + ["-m", "tests._launch_workers", "--hang-rank", "1", "--timeout", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    assert "LaunchError: rank 1 hung" in proc.stderr, proc.stderr[-3000:]
