"""What every lab's command line shares: common flags, summaries, progress.

Introduced in chapter 0 ("Why one device is not enough"). Every lab accepts
``--world-size``, ``--backend {auto,gloo,nccl}``, ``--steps``, ``--seed`` and
``--json PATH``, so ``python -m labs.<name> --world-size 4`` and
``torchrun --nproc-per-node 4 -m labs.<name>`` behave the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from utils.report import CATEGORIES, RankReport, save_reports

BACKENDS = ("auto", "gloo", "nccl")


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass(frozen=True)
class LabConfig:
    """The fields every lab's Config starts with, one per shared CLI flag.

    A lab's Config subclasses it (redeclaring a field to change its default) and
    calls ``super().__post_init__()`` before checking its own fields.
    """

    world_size: int = 2
    """Ranks to start (under torchrun: the world torchrun started)."""
    backend: str = "auto"
    """auto: NCCL with one GPU per rank if there are enough GPUs, else gloo on CPU."""
    steps: int = 3
    """Training steps."""
    seed: int = 0
    """Seed of the weights and of the synthetic batches (every rank builds the same)."""

    def __post_init__(self):
        check_int("world_size", self.world_size)
        check_choice("backend", self.backend, BACKENDS)
        check_int("steps", self.steps)
        check_int("seed", self.seed, minimum=0)


def lab_parser(description: str, defaults) -> argparse.ArgumentParser:
    """A parser with the flags every lab shares; defaults come from a Config."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ["WORLD_SIZE"])
        if under_torchrun
        else defaults.world_size,
        help="number of ranks (under torchrun: the world torchrun started)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="auto: NCCL if there is one GPU per rank, else gloo on CPU",
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="training steps"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for weights and data"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the per-rank reports as JSON to PATH",
    )
    return parser


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    """Build ``config_cls`` from the parsed flags whose names match its fields.

    Validation happens in the Config's ``__post_init__``; a bad value exits with
    the Config's message (before any process starts), not a traceback.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        sys.exit(f"error: {err}")


def run_from_cli(parser: argparse.ArgumentParser, config_cls, run, argv=None):
    """A lab's ``main``: parse ``argv``, build the Config (bad values exit with its
    message), run the lab, then write ``--json`` or print the summary.

    Returns ``(reports, args)`` for a lab that prints more.
    """
    args = parser.parse_args(argv)
    reports = run(config_from_args(config_cls, args))
    finish(reports, args.json)
    return reports, args


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as memory is counted)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(reports: list[RankReport]) -> str:
    """A short human summary: losses, then memory after the last step per rank."""
    r0 = reports[0]
    lines = [
        f"{r0.world_size} ranks on {r0.backend} ({r0.device}), "
        f"{r0.num_params:,} parameters",
    ]
    if r0.losses:
        first, last = r0.losses[0], r0.losses[-1]
        lines.append(f"loss: {first:.4f} -> {last:.4f} over {len(r0.losses)} steps")
    lines.append("memory after the last phase, per rank:")
    lines.append("  rank " + " ".join(f"{c:>12}" for c in CATEGORIES) + "   peak total")
    for r in reports:
        if not r.memory:
            continue
        last = r.memory[-1]
        cells = " ".join(f"{format_bytes(last['current'][c]):>12}" for c in CATEGORIES)
        peak = max(sum(p["peak"].values()) for p in r.memory)
        lines.append(f"  {r.rank:>4} {cells}   {format_bytes(peak)}")
    if r0.comm_bytes:
        lines.append(f"bytes sent per step per rank: {format_bytes(r0.comm_bytes)}")
    for key, value in r0.timings.items():
        lines.append(f"{key}: {value * 1e3:.1f} ms (rank 0)")
    return "\n".join(lines)


def finish(reports: list[RankReport], json_path: Path | None) -> None:
    """Write ``--json`` or print the summary; under torchrun only rank 0 does."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_path is not None:
        save_reports(reports, json_path)
        print(f"wrote {len(reports)} rank reports to {json_path}")
    else:
        print(summary(reports))


def progress(
    steps: Iterable[int],
    *,
    rank: int,
    total: int,
    label: str = "step",
    min_seconds: float = 2.0,
) -> Iterator[int]:
    """Yield ``steps``; rank 0 draws a progress bar once a run lasts > min_seconds."""
    start = time.perf_counter()
    shown = False
    for i, step in enumerate(steps):
        yield step
        elapsed = time.perf_counter() - start
        if rank == 0 and elapsed > min_seconds:
            done = (i + 1) / total
            bar = "#" * int(30 * done)
            print(
                f"\r{label} {i + 1}/{total} [{bar:<30}] {elapsed:.0f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
            shown = True
    if shown:
        print(file=sys.stderr, flush=True)
