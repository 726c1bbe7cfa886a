"""What starting a 4-rank job costs: ``utils.launch`` (cold, warm) beside torchrun.

Run with ``python -m bench launch``. The job is ``bench/_launch_worker.py``: one
all_reduce per rank on gloo. Each figure is wall time from the start of the job
until every rank has returned:

- launch, cold: the first ``launch`` in a fresh Python process that has already
  imported torch (as a notebook kernel has): it starts the fork server, which
  imports torch once, then forks the ranks. Median of ``REPEATS`` fresh processes.
- launch, warm: a relaunch in the same process (the fork server is running),
  median of ``WARM_RUNS``. This is what re-running a notebook cell costs.
- torchrun: ``python -m torch.distributed.run --nproc-per-node 4 -m
  bench._launch_worker``, the whole command (its agent and four fresh interpreters
  each import torch). Median of ``REPEATS``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORLD_SIZE = 4
REPEATS = 3  # fresh processes are slow (seconds each): a median of three
WARM_RUNS = 10
ROOT = Path(__file__).resolve().parents[1]

_COLD = """
import time, torch, utils.launch
from bench._launch_worker import all_reduce_once
start = time.perf_counter()
out = utils.launch.launch(all_reduce_once, world_size={n}, backend="gloo")
took = time.perf_counter() - start
assert out == [float(sum(range({n})))] * {n}, out
print("COLD", took)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def cold() -> float:
    """Seconds for the first launch in a fresh process (torch already imported)."""
    code = _COLD.format(n=WORLD_SIZE)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(proc.stdout.split("COLD")[-1])


def warm() -> list[float]:
    """Seconds for each of ``WARM_RUNS`` relaunches in this process."""
    from bench._launch_worker import all_reduce_once
    from utils.launch import launch

    def once() -> float:
        start = time.perf_counter()
        out = launch(all_reduce_once, world_size=WORLD_SIZE, backend="gloo")
        took = time.perf_counter() - start
        assert out == [float(sum(range(WORLD_SIZE)))] * WORLD_SIZE, out
        return took

    once()  # start the fork server
    return [once() for _ in range(WARM_RUNS)]


def torchrun() -> float:
    """Seconds for the same job started by torchrun (the whole command)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc-per-node", str(WORLD_SIZE), "-m", "bench._launch_worker"]
    with tempfile.TemporaryDirectory() as tmp:  # torchrun leaves torchelastic_* there
        start = time.perf_counter()
        subprocess.run(
            cmd,
            cwd=ROOT,
            env={**_env(), "TMPDIR": tmp},
            capture_output=True,
            check=True,
        )
        return time.perf_counter() - start


def main() -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # launch's one-line notes
        warm_runs = warm()
    figures = {
        "torchrun --nproc-per-node 4": statistics.median(
            torchrun() for _ in range(REPEATS)
        ),
        "launch, cold (first in a process)": statistics.median(
            cold() for _ in range(REPEATS)
        ),
        f"launch, warm (median of {WARM_RUNS})": statistics.median(warm_runs),
    }
    base = figures["torchrun --nproc-per-node 4"]
    cpus = len(os.sched_getaffinity(0))
    print(f"{WORLD_SIZE}-rank gloo job, one all_reduce per rank, on {cpus} CPU cores")
    print("(start until every rank has returned; median)")
    print(f"  {'':36}{'seconds':>9}{'torchrun / this':>17}")
    for name, seconds in figures.items():
        print(f"  {name:36}{seconds:9.3f}{base / seconds:16.1f}x")
    print(f"  warm runs: min {min(warm_runs):.3f} s, max {max(warm_runs):.3f} s")


if __name__ == "__main__":
    main()
