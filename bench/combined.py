"""The combined lab: its default run's wall time, and step time per layout of 8 ranks.

Run with ``python -m bench combined``. Two measurements (gloo on CPU here):

1. The default lab (``labs.combined.Config()``: 2 x 2 x 2, ZeRO-1, 1F1B, 4
   micro-batches, memory tracked after every action), wall time of ``run``
   including the launch. Target: at most 30 s on 8 CPU ranks.
2. Step time (measured on rank 0, from the barrier that starts a step to the end
   of its optimizer step, ``CombinedData.step_seconds``; median of the steps but
   the first) for several layouts of the same 8 ranks and the same GPT and batch,
   memory tracking off, all in one launch. No target: the figures show what each
   axis costs on this machine (on 2 cores, 8 ranks time-share them, so these are
   not a GPU cluster's ratios).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from labs.combined import Config, run, run_many

LAB_TARGET_S = 30.0
BASE = Config(d_model=64, n_layers=8, batch_size=32, micro_batches=4, steps=4,
              track_memory=False)  # fmt: skip
LAYOUTS = {
    "dp 8": dict(dp_size=8, tp_size=1, pp_size=1, micro_batches=1),
    "dp 2 x tp 2 x pp 2": {},
    "tp 4 x dp 2": dict(tp_size=4, pp_size=1),
    "tp 2 x pp 4": dict(dp_size=1, pp_size=4),
    "pp 8": dict(dp_size=1, tp_size=1, pp_size=8, micro_batches=8),
}


def measure_layouts() -> dict[str, float]:
    """Median step seconds (rank 0, all steps but the first) per layout."""
    cfgs = [replace(BASE, **kw) for kw in LAYOUTS.values()]
    out = {}
    for name, reports in zip(LAYOUTS, run_many(cfgs, timeout=600)):
        out[name] = statistics.median(reports[0].extra.step_seconds[1:])
    return out


def measure_lab() -> float:
    """Seconds for the default lab run, launch included."""
    start = time.perf_counter()
    run(Config())
    return time.perf_counter() - start


def main() -> None:
    seconds = measure_lab()
    verdict = "met" if seconds <= LAB_TARGET_S else "MISSED"
    print(
        f"default lab (python -m labs.combined, 2 x 2 x 2 on 8 CPU ranks): "
        f"{seconds:.1f} s wall, launch included (target <= {LAB_TARGET_S:.0f} s: "
        f"{verdict})"
    )
    g = BASE.gpt()
    print(
        f"step time per layout, 8 ranks, GPT d_model={g.d_model}, {g.n_layers} "
        f"blocks, batch {BASE.batch_size} (measured, median, rank 0):"
    )
    for name, step in measure_layouts().items():
        print(f"  {name:20s} {step * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
