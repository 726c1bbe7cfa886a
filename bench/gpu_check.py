"""Every lab with its ranks sharing this machine's GPUs: ``python -m bench.gpu_check``.

The device check of "one GPU, many ranks" (the publishing issue), for a session or
a machine that has a CUDA GPU. For each lab and world size 1, 2 and 4 it runs the
lab's ``TINY`` preset with ``backend="gloo-cuda"`` (gloo with CUDA tensors, rank r
on cuda:(r % GPUs): ``utils.launch``), then the same preset on CPU processes
(``backend="gloo"``), and prints one table row per run:

- the wall time of each run (measured: ``time.perf_counter`` around the lab's
  ``run``; the ranks' start-up, CUDA's initialisation in each included, the fork
  server's own start not: a warm-up job starts it first);
- each rank's peak CUDA memory, from that rank's own caching allocator (measured:
  the largest ``max_memory_allocated`` over the lab's memory marks);
- the largest difference between the GPU and CPU runs' losses (rank 0's, the
  global-batch mean), and whether it is within ``RTOL``/``ATOL``.

A run the lab refuses (a Config invalid at that world size, or a part that gloo
cannot run on CUDA tensors, refused by ``utils.launch.check_cuda_p2p``) or one that
fails is a row saying so; the check goes on. It writes every row to a JSON file
(``--json``, default ``$OUT/gpu_check.json`` where ``$OUT`` is set, else in the temp
folder). On one H200 the whole check is meant to take under about 8 minutes; past
``--budget`` seconds the remaining runs are skipped and marked so.

It is not a benchmark of ``make bench``: it has no ``main()`` (``python -m bench``
runs only modules that have one, see bench/__main__.py, and it is not in that
module's ``ORDER``), so CI, which has no GPU, never runs it. Without a GPU it says
so and exits with status 2. Options: ``--labs data_parallel,zero``,
``--world-sizes 2,4``, ``--no-cpu`` (skip the CPU runs), ``--budget SECONDS``. Exit
status 1 if a run failed or the losses differ.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

LABS = (
    "foundations",
    "data_parallel",
    "zero",
    "offload",
    "model_parallel",
    "pipeline_parallel",
    "simd_mimd",
    "combined",
)
WORLD_SIZES = (1, 2, 4)
LAYOUTS = {"combined": {1: (1, 1, 1), 2: (1, 1, 2), 4: (1, 2, 2)}}
"""(dp, tp, pp) per world size, for labs whose TINY fixes its layout: 2 ranks are a
pipeline of 2 stages, 4 ranks tensor x pipeline parallel."""
RTOL, ATOL = 1e-3, 1e-4
"""Loss agreement, GPU against CPU: fp32 kernels differ in summation order only."""
BUDGET_S = 450.0
"""Seconds after which no new run starts (about 8 minutes with the last runs)."""
MiB = 1 << 20


def _warm() -> int:
    """A trivial rank: run once first, so that the fork server's start (seconds,
    once per process) is not counted in the first lab's time."""
    return 0


def peak_cuda_bytes(report) -> int | None:
    """This rank's peak CUDA memory from its allocator, or None (no CUDA marks)."""
    peaks = [e["allocator"]["peak"] for e in report.memory if e.get("allocator")]
    return max(peaks) if peaks else None


def run_once(lab: str, world_size: int, backend: str) -> dict:
    """One run of ``lab``'s TINY preset; a row of plain data, whatever happens."""
    from utils.launch import LaunchConfigError

    module = importlib.import_module(f"labs.{lab}")
    row = {"lab": lab, "world_size": world_size, "backend": backend}
    layout = LAYOUTS.get(lab, {}).get(world_size)
    degrees = dict(zip(("dp_size", "tp_size", "pp_size"), layout or ()))
    try:
        cfg = replace(module.TINY, world_size=world_size, backend=backend, **degrees)
    except ValueError as err:
        return {**row, "status": f"invalid: {err}"}
    printed = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            reports = module.run(cfg)
    except LaunchConfigError as err:
        return {**row, "status": f"refused: {err}"}
    except Exception as err:  # noqa: BLE001 - a LaunchError or other: a row
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        last = [ln for ln in lines if not ln.startswith("(ranks still")] or [""]
        return {  # the rank's own exception line, the last of its traceback
            **row,
            "status": f"failed: {type(err).__name__}: {last[-1].strip()}",
            "detail": str(err)[-4000:],
            "printed": printed.getvalue()[-2000:],
        }
    launch_lines = [ln for ln in printed.getvalue().splitlines() if "launch:" in ln]
    return {
        **row,
        "status": "ok",
        "seconds": time.perf_counter() - start,
        "launch": launch_lines[:1],
        "devices": [r.device for r in reports],
        "peak_cuda_bytes": [peak_cuda_bytes(r) for r in reports],
        "losses": list(reports[0].losses),
    }


def compare(gpu: dict, cpu: dict | None) -> dict:
    """The GPU run's losses against the CPU run's: largest difference, verdict."""
    if not cpu or cpu.get("status") != "ok" or gpu.get("status") != "ok":
        return {}
    a, b = gpu["losses"], cpu["losses"]
    if not a or len(a) != len(b):
        return {"loss_diff": None, "losses_match": None}
    diff = max(abs(x - y) for x, y in zip(a, b))
    ok = all(math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL) for x, y in zip(a, b))
    return {"loss_diff": diff, "losses_match": ok}


def _mib(values) -> str:
    if not values or all(v is None for v in values):
        return "-"
    return " ".join("-" if v is None else f"{v / MiB:.1f}" for v in values)


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width table, one line per (lab, world size)."""
    head = (
        f"{'lab':<18} {'n':>2} {'GPU s':>7} {'CPU s':>7} "
        f"{'peak CUDA MiB per rank':<28} {'max |dloss|':>11}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cpu = r.get("cpu") or {}
        gpu_s = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        cpu_s = f"{cpu['seconds']:.1f}" if "seconds" in cpu else "-"
        diff = r.get("loss_diff")
        dtext = "-" if diff is None else f"{diff:.2e}"
        status = r["status"]
        if r.get("losses_match") is False:
            status = f"LOSSES DIFFER (rtol {RTOL:g}, atol {ATOL:g})"
        elif cpu.get("status", "ok") != "ok":
            status += f"; cpu {cpu['status']}"
        lines.append(
            f"{r['lab']:<18} {r['world_size']:>2} {gpu_s:>7} {cpu_s:>7} "
            f"{_mib(r.get('peak_cuda_bytes')):<28} {dtext:>11}  {status[:90]}"
        )
    return "\n".join(lines)


def _default_json() -> Path:
    return Path(os.environ.get("OUT") or tempfile.gettempdir()) / "gpu_check.json"


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__
    )
    parser.add_argument("--labs", default=",".join(LABS), help="comma-separated")
    parser.add_argument(
        "--world-sizes", default=",".join(map(str, WORLD_SIZES)), help="e.g. 2,4"
    )
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU runs")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds")
    parser.add_argument("--json", type=Path, default=None, help="where to write")
    args = parser.parse_args(argv)
    labs = [name for name in args.labs.split(",") if name]
    unknown = sorted(set(labs) - set(LABS))
    if unknown:
        parser.error(f"no lab {unknown}; labs: {', '.join(LABS)}")
    sizes = [int(n) for n in args.world_sizes.split(",") if n]

    import torch

    from utils.launch import cuda_gpus, resolve_placement

    gpus = cuda_gpus()
    if gpus == 0:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False)")
        return 2
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    print(f"gpu_check: torch {torch.__version__}, {gpus} CUDA GPU(s): {names}")
    for n in sizes:
        print(
            f"  {n} ranks: gloo-cuda -> {resolve_placement('gloo-cuda', n).describe()}"
        )
    from utils.launch import launch

    with contextlib.redirect_stdout(io.StringIO()):
        launch(_warm, world_size=1, backend="gloo")
    start, rows = time.perf_counter(), []
    for lab in labs:
        for n in sizes:
            if time.perf_counter() - start > args.budget:
                rows.append({"lab": lab, "world_size": n, "status": "skipped: budget"})
                continue
            row = run_once(lab, n, "gloo-cuda")
            if not args.no_cpu and row["status"] == "ok":
                row["cpu"] = run_once(lab, n, "gloo")
                row.update(compare(row, row["cpu"]))
            rows.append(row)
            print(f"  {lab} n={n}: {row['status'][:100]}", flush=True)
    took = time.perf_counter() - start
    print()
    print(table(rows))
    print(f"\ngpu_check: {len(rows)} rows in {took:.0f} s (measured wall time)")
    path = args.json or _default_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "gpus": names, "seconds": took}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"gpu_check: wrote {path}")
    bad = [
        r
        for r in rows
        if r.get("losses_match") is False
        or r["status"].startswith("failed")
        or (r.get("cpu") or {}).get("status", "ok").startswith("failed")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(cli())
