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
    "offload": ["--offload", "optimizer", "--steps", "2"],
    "model_parallel": ["--mode", "tensor", "--n-layers", "2", "--steps", "2"],
    "pipeline_parallel": ["--schedule", "1f1b", "--micro-batches", "2", "--steps", "2"],
    "failures": ["--fault", "none", "--steps", "2"],
    "combined": [
        "--dp-size",
        "1",
        "--tp-size",
        "1",
        "--pp-size",
        "2",
        "--micro-batches",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "2",
    ],
}
"""Every training lab with a quick configuration (chapter 6's lab measures loops,
not training: tests/test_simd_mimd.py runs it)."""
RANK_AXIS = {"model_parallel": "tp", "pipeline_parallel": "pp", "combined": "pp"}
"""The axis a 2-rank run spreads its ranks over (data parallel otherwise)."""
PHASES = {"pipeline_parallel": {"F", "B", "step"}, "combined": {"F", "B", "step"}}
"""Memory marks each lab's timeline has (forward, backward, step otherwise)."""


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
            axis = RANK_AXIS.get(lab, "dp")
            assert r["coords"][axis] == r["rank"], r["coords"]
            assert all(v == 0 for k, v in r["coords"].items() if k != axis)
            assert r["comm_source"] in ("counted", "modelled", "counted+modelled")
            assert r["wire_bytes"] > 0  # the kernel counted this rank's sends
            phases = [p["phase"] for p in r["memory"]]
            assert PHASES.get(lab, {"forward", "backward", "step"}) <= set(phases)
            for p in r["memory"]:
                assert set(p["current"]) == set(p["peak"]) == set(CATEGORIES)
    assert [r["losses"] for r in direct] == [r["losses"] for r in joined]
    assert [r["num_params"] for r in direct] == [r["num_params"] for r in joined]


BAD_WORLD_SIZE = {"combined": ("-1", ">= 0")}
"""A world size each lab refuses, and its lower bound (combined: 0 means the
layout's dp x tp x pp)."""


@pytest.mark.parametrize("lab", sorted(LABS))
def test_bad_world_size_is_refused_before_any_rank_starts(lab):
    bad, bound = BAD_WORLD_SIZE.get(lab, ("0", ">= 1"))
    proc = subprocess.run(
        [sys.executable, "-m", f"labs.{lab}", "--world-size", bad],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"world_size must be an integer {bound}, got {bad}" in proc.stderr
    assert "launch:" not in proc.stdout  # no rank was started


# ------------------------------------------------ the parser made from a Config
def _help(lab: str) -> str:
    import importlib

    from utils.cli import lab_parser

    module = importlib.import_module(f"labs.{lab}")
    return lab_parser(module.Config, module.__doc__).format_help()


@pytest.mark.parametrize("lab", sorted(LABS))
def test_every_config_field_is_a_flag_with_its_docstring_as_help(lab):
    import dataclasses
    import importlib

    from utils.cli import field_docs

    config = importlib.import_module(f"labs.{lab}").Config
    docs = field_docs(config)
    text = " ".join(_help(lab).split())
    for f in dataclasses.fields(config):
        if f.name in config.CLI_HIDDEN:
            assert f"--{f.name.replace('_', '-')}" not in text
            continue
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert docs[f.name], f"{lab}.Config.{f.name} has no docstring"
        # argparse wraps lines, also after a hyphen ("all- reduced"): compare
        # without any whitespace
        assert "".join(docs[f.name].split()) in "".join(text.split()), f.name
    for name, choices in config.CHOICES.items():
        shown = "{" + ",".join(map(str, choices)) + "}"
        assert shown in text, f"--{name} shows its choices {shown}"


def test_flags_parse_bools_and_tuples_and_choices_are_shown():
    from labs.data_parallel import Config
    from utils.cli import config_from_args, lab_parser

    parser = lab_parser(Config, "")
    args = parser.parse_args(["--no-track-memory", "--sizes", "8,16,4"])
    cfg = config_from_args(Config, args)
    assert cfg.track_memory is False and cfg.sizes == (8, 16, 4)
    assert "{naive,bucketed,ddp}" in parser.format_help()


BAD = [
    ("data_parallel", ["--seed", str(2**70)], "seed must be an integer <= "),
    ("data_parallel", ["--bucket-mb", "inf"], "bucket_mb must be a finite number"),
    ("data_parallel", ["--lr", "nan"], "lr must be a finite number"),
    ("data_parallel", ["--lr", "inf"], "lr must be a finite number"),
    ("zero", ["--stage", "5"], "stage must be one of (0, 1, 2, 3), got 5"),
    ("zero", ["--world-size", "100000"], "world_size=100000 is more than the 64"),
    ("foundations", ["--max-bytes", str(2**40)], "max_bytes must be an integer <="),
    ("zero", ["--backend", "mpi"], "backend must be one of"),
]


@pytest.mark.parametrize(("lab", "argv", "message"), BAD, ids=lambda v: str(v)[:30])
def test_bad_values_exit_2_with_one_line_before_any_rank(lab, argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", f"labs.{lab}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "launch:" not in proc.stdout  # no rank was started


def test_nccl_without_gpus_prints_the_message_alone(tmp_path):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs for NCCL")
    proc = subprocess.run(
        [sys.executable, "-m", "labs.zero", "--backend", "nccl", "--steps", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nccl" in proc.stderr and "GPU" in proc.stderr


@pytest.mark.parametrize("kind", ["folder", "missing", "unwritable", "symlink"])
def test_a_bad_json_path_is_refused_before_the_run(kind, tmp_path):
    import os as _os

    if kind == "folder":
        target = tmp_path
    elif kind == "missing":
        target = tmp_path / "no" / "such" / "run.json"
    elif kind == "unwritable":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        target = folder / "run.json"
        if _os.access(folder, _os.W_OK):  # root writes anywhere: use a file path
            target = Path("/proc/version/run.json")
    else:
        victim = tmp_path / "victim.txt"
        victim.write_text("keep me")
        target = tmp_path / "run.json"
        target.symlink_to(victim)
    proc = subprocess.run(
        [sys.executable, "-m", "labs.zero", "--steps", "1", "--json", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--json" in proc.stderr and "Traceback" not in proc.stderr
    assert "launch:" not in proc.stdout  # refused before any rank started
    if kind == "symlink":
        assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_reports_are_written_atomically_and_round_trip(tmp_path):
    from labs.zero import ZeroData
    from utils.report import RankReport, load_reports, save_reports

    report = RankReport(
        rank=0,
        world_size=1,
        backend="gloo",
        device="cpu",
        num_params=3,
        coords={"dp": 0, "tp": 0, "pp": 0},
        extra=ZeroData(config={"stage": 3}, events=[{"event": "gather"}]),
    )
    path = tmp_path / "r.json"
    path.write_text("old")
    save_reports([report], path)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left
    (back,) = load_reports(path)
    assert back == report and isinstance(back.extra, ZeroData)
    assert json.loads(path.read_text())[0]["extra_type"] == "labs.zero:ZeroData"


def test_a_diverging_run_stops_naming_the_step():
    from dataclasses import replace

    from labs.data_parallel import TINY, run
    from utils.launch import LaunchError

    with pytest.raises(LaunchError, match=r"loss is (nan|inf) at step \d"):
        run(replace(TINY, lr=1e5, sizes=(32, 256, 256, 8), steps=20))


def test_a_run_too_big_for_the_machine_is_refused_with_the_estimate():
    from dataclasses import replace

    from labs.zero import TINY, run

    huge = replace(TINY, d_model=8192, n_layers=256, world_size=2)
    with pytest.raises(ValueError, match=r"needs about .* available"):
        run(huge)
