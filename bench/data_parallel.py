"""Data parallelism's two figures: what overlap buys, and how fast our ring is.

Run with ``python -m bench data_parallel`` (``make bench`` runs every benchmark).
Chapter 1
("Data parallelism") explains both.

- Step time, naive against bucketed, at world size 4: ``labs.data_parallel`` with its
  default model (~0.7 M parameters, 0.25 MiB buckets) and no memory tracking; the
  mean step time over all steps but the first, median of ``REPEATS`` runs each,
  alternating the two. The ratio naive / bucketed is the gain from overlapping the
  all-reduces with backward (> 1 means bucketed is faster).
- Bus bandwidth of ``utils.comm.ring_all_reduce`` (send/recv) as a fraction of the
  backend's built-in all-reduce, at 16 MiB with 4 ranks: the median over ``ITERS``
  of the slowest rank's time (``labs.data_parallel.bandwidth_worker``); busbw as
  nccl-tests defines it. Target: >= 0.7.
- Bytes rank 0 sent per step in the last run of each impl, both kinds: modelled
  (``RankReport.comm_bytes``: nccl-tests' 2(N-1)/N x the gradients) and counted on
  the wire (``RankReport.wire_bytes``, the kernel's TCP counters: payload plus
  gloo's framing; "n/a" on NCCL or off Linux).

On CPU the ranks are gloo processes sharing this machine's cores, so "bandwidth" is
memory copies between processes, and compute competes with communication for the
same cores: the figures describe this machine, not a GPU cluster.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import replace

from labs.data_parallel import Config, measure_bandwidth, run

WORLD_SIZE = 4
STEPS = 8
REPEATS = 3
MESSAGE_BYTES = 16 * 2**20
ITERS = 10
TARGET = 0.7


def step_times() -> tuple[dict[str, dict[str, float]], dict[str, object]]:
    """Median (over REPEATS runs) of each impl's mean per-step timings on the
    slowest rank, and each impl's last rank-0 report."""
    base = Config(
        world_size=WORLD_SIZE, backend="auto", steps=STEPS, track_memory=False
    )
    runs: dict[str, list[dict]] = {"naive": [], "bucketed": []}
    last = {}
    for _ in range(REPEATS):
        for impl in runs:
            reports = run(replace(base, impl=impl))
            slowest = max(reports, key=lambda r: r.timings["step"])
            runs[impl].append(slowest.timings)
            last[impl] = reports[0]
    medians = {
        impl: {k: statistics.median(t[k] for t in rows) for k in rows[0]}
        for impl, rows in runs.items()
    }
    return medians, last


def main() -> None:
    print(f"machine: {os.cpu_count()} CPUs visible; ranks: {WORLD_SIZE}")
    times, last = step_times()
    for impl, r in last.items():
        wire = "n/a" if r.wire_bytes is None else f"{r.wire_bytes:,} B"
        print(
            f"{impl:>8}: rank 0 sent per step {r.comm_bytes:,} B ({r.comm_source}), "
            f"{wire} counted on the wire"
        )
    for impl, t in times.items():
        print(
            f"{impl:>8}: step {t['step'] * 1e3:7.1f} ms  compute "
            f"{t['compute'] * 1e3:6.1f}  comm {t['comm'] * 1e3:6.1f}  overlap "
            f"{t['overlap'] * 1e3:6.1f}  exposed comm {t['exposed_comm'] * 1e3:6.1f}"
        )
    ratio = times["naive"]["step"] / times["bucketed"]["step"]
    print(f"step time naive / bucketed at world size {WORLD_SIZE}: {ratio:.2f}x")

    rows = measure_bandwidth(WORLD_SIZE, [MESSAGE_BYTES], iters=ITERS)
    busbw = {r["impl"]: r["busbw"] for r in rows}
    for r in rows:
        print(
            f"{r['impl']:>8} all-reduce of {MESSAGE_BYTES / 2**20:.0f} MiB on "
            f"{WORLD_SIZE} ranks: {r['time_s'] * 1e3:.1f} ms, busbw "
            f"{r['busbw'] / 1e9:.2f} GB/s"
        )
    fraction = busbw["ring"] / busbw["builtin"]
    verdict = "meets" if fraction >= TARGET else "misses"
    print(
        f"ring busbw / built-in busbw at 16 MiB, {WORLD_SIZE} ranks: {fraction:.2f} "
        f"({verdict} the {TARGET} target)"
    )


if __name__ == "__main__":
    main()
