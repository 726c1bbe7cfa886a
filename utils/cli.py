"""Every lab's command line, generated from its Config dataclass.

Introduced in chapter 0 ("Why one device is not enough"). A lab declares one frozen
dataclass ``Config(LabConfig)`` with a one-line docstring under each field; the
parser is made from it: one flag per field (``d_model`` -> ``--d-model``), the
field's docstring as its help, its default shown, ``choices`` shown where the
Config lists them in ``CHOICES``, ``--flag/--no-flag`` for booleans and
comma-separated values for tuples. Every lab therefore accepts
``--world-size``, ``--backend {auto,gloo,gloo-cuda,nccl}``, ``--steps``, ``--seed``
and ``--json PATH``, so ``python -m labs.<name> --world-size 4`` and
``torchrun --nproc-per-node 4 -m labs.<name>`` behave the same.

``--backend`` says where the ranks run (``utils.launch.resolve_placement``): ``auto``
(the default) is NCCL with one GPU per rank when there are as many GPUs as ranks,
gloo with CUDA tensors on the GPUs there are when there are fewer (ranks share them,
round-robin: one GPU on Colab or a laptop runs any lab with N ranks, each measuring
its own CUDA memory), and gloo on CPU processes without a GPU. ``gloo`` forces CPU
processes even where there are GPUs, ``gloo-cuda`` forces gloo with CUDA tensors,
``nccl`` refuses to run without one GPU per rank. The launch line says which and why.

A bad value exits with status 2 and one line naming it and what is allowed, before
any process starts; so does a ``--json`` path that could not be written (checked
first, written atomically at the end, so a long run is never lost to it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.checks import SEED_MAX, check_choice, check_int
from utils.launch import BACKENDS, LaunchConfigError
from utils.report import CATEGORIES, RankReport, check_output_path, format_bytes
from utils.report import save_reports as _save_reports

MAX_WORLD_SIZE = 64
"""The most ranks a lab starts on one machine. Each rank is a process holding its
own torch (about 150-300 MB resident) and gloo opens a connection between every
pair (n(n-1)/2 of them); past 64 a laptop swaps long before it teaches anything,
and the course's layouts need at most 8. Under torchrun the world is the
launcher's, and this cap does not apply."""


@dataclass(frozen=True)
class LabConfig:
    """The fields every lab's Config starts with, one per shared CLI flag.

    A lab's Config subclasses it (redeclaring a field to change its default) and
    calls ``super().__post_init__()`` before checking its own fields. ``CHOICES``
    maps a field to its allowed values (shown by ``--help``); ``CLI_HIDDEN`` names
    fields that only tests set.
    """

    CHOICES: ClassVar[dict[str, tuple]] = {"backend": BACKENDS}
    CLI_HIDDEN: ClassVar[tuple[str, ...]] = ()

    world_size: int = 2
    """Ranks to start (under torchrun: the world torchrun started)."""
    backend: str = "auto"
    """auto: NCCL with a GPU per rank if there are enough GPUs, else gloo sharing the
    GPUs there are (gloo-cuda), else gloo on CPU; gloo: CPU even with GPUs."""
    steps: int = 3
    """Training steps."""
    seed: int = 0
    """Seed of the weights and of the synthetic batches (every rank builds the same)."""

    def __post_init__(self):
        check_int("world_size", self.world_size)
        if self.world_size > MAX_WORLD_SIZE and "RANK" not in os.environ:
            raise ValueError(
                f"world_size={self.world_size} is more than the {MAX_WORLD_SIZE} "
                "ranks a lab starts on one machine (each rank is a process of a "
                "few hundred MB); use torchrun on several machines for more"
            )
        check_int("steps", self.steps, maximum=100_000)
        check_int("seed", self.seed, minimum=0, maximum=SEED_MAX)
        for name, choices in self.CHOICES.items():
            check_choice(name, getattr(self, name), choices)


# ------------------------------------------------------------------- the parser
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string right under it), from the class source
    and its bases', the nearest class winning."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(getattr(after, "value", None), ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _tuple_of(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s such as 1,2,3: {err}"
            ) from None

    return parse


def lab_parser(config_cls, description: str) -> argparse.ArgumentParser:
    """The parser of a lab: a flag per Config field, plus ``--json PATH``."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = config_cls()
    docs = field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    for f in dataclasses.fields(config_cls):
        if f.name in config_cls.CLI_HIDDEN:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "world_size" and under_torchrun:
            default = int(os.environ["WORLD_SIZE"])
        kind = hints[f.name]
        kw: dict = {"default": default, "dest": f.name}
        help_text = docs.get(f.name, "")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            kw["type"] = _tuple_of(item)
            kw["metavar"] = ",".join([item.__name__.upper()] * 2) + ",..."
            default = ",".join(map(str, default))
        else:
            kw["type"] = kind
            if f.name in config_cls.CHOICES:
                # Shown, not enforced by argparse: the Config refuses a bad value
                # with the same message from the CLI, a notebook or a test.
                choices = config_cls.CHOICES[f.name]
                kw["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        kw["help"] = f"{help_text} (default: {default})".strip()
        parser.add_argument(flag, **kw)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the per-rank reports as JSON to PATH (checked before the run)",
    )
    return parser


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    """Build ``config_cls`` from the parsed flags whose names match its fields.

    Validation happens in the Config's ``__post_init__``; a bad value exits with
    status 2 and the Config's message (before any process starts), not a traceback.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        _fail(err)


def _fail(err) -> typing.NoReturn:
    """Print ``error: <message>`` and exit with status 2, as argparse does for a
    bad flag: no traceback. The SystemExit carries the message too, for callers
    (tests, notebooks) that catch it."""
    message = f"error: {err}"
    print(message, file=sys.stderr)
    exit_ = SystemExit(message)
    exit_.code = 2
    raise exit_


def run_from_cli(config_cls, run, argv=None, description: str | None = None):
    """A lab's ``main``: parse ``argv``, build the Config, check ``--json``, run the
    lab, then write ``--json`` or print the summary. Bad input (a value, the output
    path, a launch the machine cannot hold) exits with status 2 before any rank
    starts. Returns ``(reports, args)`` for a lab that prints more."""
    module = sys.modules[config_cls.__module__]
    parser = lab_parser(config_cls, description or module.__doc__ or "")
    args = parser.parse_args(argv)
    cfg = config_from_args(config_cls, args)
    if args.json is not None:
        try:
            check_output_path(args.json)
        except ValueError as err:
            _fail(f"--json {args.json}: {err}")
    try:
        reports = run(cfg)
    except LaunchConfigError as err:  # refused before any rank started
        _fail(err)
    finish(reports, args.json)
    return reports, args


# -------------------------------------------------------------------- output
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
        lines.append(
            f"bytes sent per step per rank ({r0.comm_source}): "
            f"{format_bytes(r0.comm_bytes)}"
        )
    for key, value in r0.timings.items():
        lines.append(f"{key}: {value * 1e3:.1f} ms (rank 0)")
    return "\n".join(lines)


def finish(reports: list[RankReport], json_path: Path | None) -> None:
    """Write ``--json`` or print the summary; under torchrun only rank 0 does."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if json_path is not None:
        _save_reports(reports, json_path)
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
