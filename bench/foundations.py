"""Chapter 0's figures on this machine: the default lab's wall time and the
all-reduce sweep.

Run with ``python -m bench foundations`` (``make bench`` runs every benchmark).

- Wall time of ``labs.foundations`` with its default Config (4 ranks, all three
  parts), launch included: what a reader waits for when the chapter runs.
- The all-reduce sweep it measured (rank 0's rows, the same on every rank): per
  size, the median and the p10-p90 spread of the slowest rank's time over
  ``Config.iters`` iterations after ``Config.warmup`` untimed ones, and the busbw
  nccl-tests defines, as the chapter plots them.
"""

from __future__ import annotations

import os
import time

from labs.foundations import Config, run
from utils.report import format_bytes


def main() -> None:
    cfg = Config()
    print(f"machine: {os.cpu_count()} CPUs visible; ranks: {cfg.world_size}")
    start = time.perf_counter()
    reports = run(cfg)
    wall = time.perf_counter() - start
    print(f"labs.foundations default run (all parts): {wall:.1f} s wall")
    print(f"all-reduce: {cfg.warmup} warm-up + {cfg.iters} timed iterations per size")
    for row in reports[0].extra.busbw:
        print(
            f"all-reduce {format_bytes(row['bytes']):>10}: median "
            f"{row['time_s'] * 1e6:8.0f} us (p10-p90 {row['time_p10_s'] * 1e6:.0f}-"
            f"{row['time_p90_s'] * 1e6:.0f}), busbw {row['busbw'] / 1e9:6.3f} GB/s"
        )


if __name__ == "__main__":
    main()
