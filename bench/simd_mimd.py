"""Chapter 6's figures on this machine: SIMD throughputs and MIMD speedups.

Run with ``python -m bench simd_mimd`` (``make bench`` runs every benchmark).

- Wall time of ``labs.simd_mimd`` with its default Config (2 ranks, every part),
  launch included: what a reader waits for when the chapter runs.
- Per (op, implementation, dtype): the median time of ``Config.repeats`` runs,
  elements/s and FLOP/s (measured), and the fraction of the modelled 1-core peak.
- The scaling job's medians with 1..n threads and 1..n processes (the slowest
  worker of each round), their speedups, and the serial fractions fitted to them
  (Amdahl; Gustafson from the weak runs); the machine's load average beside them,
  since a busy machine changes every one of these figures.
- Which step kinds ran SPMD and which MPMD (recorded); the GPU divergence figures
  where there is a GPU.
"""

from __future__ import annotations

import os
import time

from labs.simd_mimd import Config, describe, run
from utils.simd_mimd import figures


def main() -> None:
    cfg = Config()
    print(f"machine: {os.cpu_count()} CPUs visible; ranks: {cfg.world_size}")
    start = time.perf_counter()
    reports = run(cfg)
    wall = time.perf_counter() - start
    print(f"labs.simd_mimd default run (all parts): {wall:.1f} s wall")
    print(f"load average (1 min) at start and end: {reports[0].extra.load_average}")
    for row in figures.simd_table(reports):
        print(
            f"{row['op']:>4} {row['impl']:>6} {row['dtype']:>8} "
            f"{row['numel']:>8,} elements: median {row['median_s'] * 1e6:10.1f} us "
            f"(p10-p90 {row['p10_s'] * 1e6:.1f}-{row['p90_s'] * 1e6:.1f}), "
            f"{row['elements_per_s']:9.3g} elements/s, {row['flops_per_s']:9.3g} "
            f"FLOP/s, {row['peak_fraction_text']} of the modelled peak"
        )
    fit = figures.scaling_fit(reports)
    for kind in ("threads", "processes"):
        for k, t in fit[kind]["times"].items():
            print(
                f"scaling, {k} {kind}: median {t * 1e3:.2f} ms, speedup "
                f"{fit[kind]['speedup'][k]:.2f}x"
            )
    for k, up in fit["weak"]["scaled_speedup"].items():
        print(f"weak scaling, {k} processes: scaled speedup {up:.2f}x")
    print(
        f"serial fraction (Amdahl, fitted): processes "
        f"{fit['processes']['serial_fraction']}, threads "
        f"{fit['threads']['serial_fraction']}; Gustafson s' {fit['gustafson']}"
    )
    print(describe(reports).split("\n", 1)[0])
    for line in describe(reports).splitlines():
        if line.startswith(("data_parallel", "pipeline_parallel", "divergence")):
            print(line)


if __name__ == "__main__":
    main()
