"""Two "nodes" on this machine's loopback: a lab runs unchanged under torchrun's
multi-node rendezvous (``--nnodes 2 --rdzv-backend c10d``), and its ranks train
exactly as a single-machine launch of the same world size does.

Each node is one torchrun agent with two processes; the agents meet at a c10d
rendezvous on 127.0.0.1 and a free port, the way two machines would meet at
``HOST:PORT`` (README, "Clusters").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from labs.data_parallel import Config, run
from utils.report import load_reports

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    port = _free_port()
    outs = [tmp / f"node{i}.json" for i in range(2)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(tmp))  # torchelastic_* folders
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    cmd += ["--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-id", "t"]
    cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1"]
    cmd += ["-m", "labs.data_parallel", "--steps", "2", "--impl", "ddp"]
    nodes = [
        subprocess.Popen(
            cmd + ["--json", str(outs[i])],  # written where rank 0 runs
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    written = [o for o in outs if o.exists()]
    return [p.returncode for p in nodes], logs, written


def test_two_torchrun_nodes_form_one_world(two_nodes):
    codes, logs, written = two_nodes
    assert codes == [0, 0], "\n".join(logs)
    assert "4 ranks on gloo" in "".join(logs)
    assert len(written) == 1, "one node (rank 0's) writes the reports"
    reports = load_reports(written[0])
    assert sorted(r.rank for r in reports) == [0, 1, 2, 3]
    assert {r.world_size for r in reports} == {4}


def test_two_nodes_train_as_one_machine_does(two_nodes):
    codes, logs, written = two_nodes
    assert codes == [0, 0], "\n".join(logs)
    got = load_reports(written[0])
    ref = run(replace(Config(), world_size=4, steps=2, impl="ddp"))
    assert got[0].losses == pytest.approx(ref[0].losses, rel=1e-6)
