"""Run every benchmark in bench/, or the ones named: ``python -m bench [NAME ...]``.

A benchmark is a module ``bench/<name>.py`` (name not starting with ``_``) with a
``main()`` that prints its figures. They run in ``ORDER`` first (quick ones before
the book build), then any others alphabetically.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

import bench

ORDER = [
    "launch",
    "foundations",
    "data_parallel",
    "zero",
    "offload",
    "model_parallel",
    "pipeline_parallel",
    "simd_mimd",
    "combined",
    "book",
]
"""Cheap benchmarks first, so a slow one does not hide the others' figures."""


def discover() -> list[str]:
    """Names of the benchmark modules in bench/, in the order they run."""
    names = [
        m.name
        for m in pkgutil.iter_modules(bench.__path__)
        if not m.name.startswith("_") and not m.ispkg
    ]
    return sorted(
        names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)
    )


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(available)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in available]
    if unknown:
        parser.error(f"no benchmark {unknown}; available: {', '.join(available)}")
    ran = 0
    for name in args.names or available:
        module = importlib.import_module(f"bench.{name}")
        if not callable(getattr(module, "main", None)):
            continue  # a helper module without figures of its own
        print(f"== bench.{name} ==", flush=True)
        start = time.perf_counter()
        module.main()
        print(
            f"   (bench.{name} took {time.perf_counter() - start:.1f} s)\n", flush=True
        )
        ran += 1
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
