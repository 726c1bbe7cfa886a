"""Every lab's two entry points: ``python -m labs.<name>`` and ``torchrun -m``.

Both must give the same training (same losses) and the same report format, the
one the issue fixes for ``--json``: rank, world_size, backend, num_params, losses,
memory phases with five categories, comm_bytes and timings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.report import CATEGORIES

ROOT = Path(__file__).resolve().parents[1]
LABS = {
    "foundations": ["--part", "anatomy", "--steps", "2"],
    "data_parallel": ["--impl", "bucketed", "--steps", "2"],
    "zero": ["--stage", "3", "--steps", "2"],
}


def _run(cmd, tmp_path) -> list[dict]:
    out = tmp_path / "reports.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["TMPDIR"] = str(tmp_path)  # torchrun leaves a torchelastic_* folder there
    proc = subprocess.run(
        [*cmd, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("lab", sorted(LABS))
def test_python_m_and_torchrun_give_the_same_run_and_report(lab, tmp_path):
    args = LABS[lab]
    direct = _run(
        [sys.executable, "-m", f"labs.{lab}", "--world-size", "2", *args], tmp_path
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    joined = _run([*torchrun, "-m", f"labs.{lab}", *args], tmp_path)
    for reports in (direct, joined):
        assert [r["rank"] for r in reports] == [0, 1]
        for r in reports:
            assert r["world_size"] == 2 and r["backend"] == "gloo"
            assert r["num_params"] > 0 and r["comm_bytes"] > 0 and r["timings"]
            assert len(r["losses"]) == 2
            phases = [p["phase"] for p in r["memory"]]
            assert {"forward", "backward", "step"} <= set(phases)
            for p in r["memory"]:
                assert set(p["current"]) == set(p["peak"]) == set(CATEGORIES)
    assert [r["losses"] for r in direct] == [r["losses"] for r in joined]
    assert [r["num_params"] for r in direct] == [r["num_params"] for r in joined]


@pytest.mark.parametrize("lab", sorted(LABS))
def test_bad_world_size_is_refused_before_any_rank_starts(lab):
    proc = subprocess.run(
        [sys.executable, "-m", f"labs.{lab}", "--world-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "world_size must be an integer >= 1, got 0" in proc.stderr
    assert "launch:" not in proc.stdout  # no rank was started
