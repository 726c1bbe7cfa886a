"""Benchmarks whose figures the book quotes: ``python -m bench`` (``make bench``).

Each ``bench/<name>.py`` with a ``main()`` prints its own figures; ``python -m bench
launch`` runs only ``bench/launch.py``. Modules whose name starts with ``_`` are
helpers (e.g. the worker that torchrun starts), not benchmarks.
"""
