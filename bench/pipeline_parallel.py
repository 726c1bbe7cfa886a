"""Pipeline parallelism: the course's 1F1B executor against torch's Schedule1F1B,
and the default lab's wall time.

Run with ``python -m bench pipeline_parallel``. Two measurements at p = 4 (gloo on
CPU here, NCCL on 4 GPUs), memory tracking off:

1. Step time (measured: the pipeline's step, from the barrier that starts it to
   the end of its last action, ``PipelineData.step_seconds``) of the scratch 1F1B
   (``utils.pipeline_parallel.executor``) over torch's ``Schedule1F1B``, on the
   same GPT, split and micro-batches, real compute (no padding). The two alternate
   inside one launch, ``ROUNDS`` times each; each round's figure is the median of
   its steps but the first, and the best round of each counts, so a noisy
   neighbour on a shared machine hurts both alike. Target: at most 1.0.
2. The default lab (``labs.pipeline_parallel.Config()``: 4 ranks, 1F1B, 8
   micro-batches, memory tracked after every action), wall time of ``run``
   including the launch. Target: at most 30 s on 4 CPU ranks.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from labs.pipeline_parallel import Config, run, run_many

ROUNDS = 3
RATIO_TARGET = 1.0
LAB_TARGET_S = 30.0
CONFIG = Config(
    world_size=4,
    schedule="1f1b",
    micro_batches=8,
    d_model=128,  # ~0.8 M parameters in 8 blocks: compute, not Python, dominates
    n_layers=8,
    batch_size=32,
    steps=5,
    track_memory=False,
)


def measure() -> dict[str, float]:
    """Best-round median step seconds of scratch and torch 1F1B, and their ratio."""
    cfgs = [
        replace(CONFIG, impl=impl)
        for _ in range(ROUNDS)
        for impl in ("scratch", "torch")
    ]
    best: dict[str, float] = {}
    for cfg, reports in zip(cfgs, run_many(cfgs, timeout=600)):
        step = statistics.median(reports[0].extra.step_seconds[1:])
        best[cfg.impl] = min(best.get(cfg.impl, step), step)
    return {**best, "ratio": best["scratch"] / best["torch"]}


def measure_lab() -> float:
    """Seconds for the default lab run, launch included."""
    start = time.perf_counter()
    run(Config())
    return time.perf_counter() - start


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    got = measure()
    print(
        f"pipeline 1F1B, p={CONFIG.pp}, m={CONFIG.micro_batches}, "
        f"d_model={CONFIG.d_model}, {CONFIG.n_layers} blocks (measured step time, "
        f"best of {ROUNDS} rounds): scratch {got['scratch'] * 1e3:.1f} ms, torch "
        f"Schedule1F1B {got['torch'] * 1e3:.1f} ms, ratio {got['ratio']:.2f} "
        f"(target <= {RATIO_TARGET:.1f}: {_verdict(got['ratio'] <= RATIO_TARGET)})"
    )
    seconds = measure_lab()
    print(
        f"default lab (python -m labs.pipeline_parallel, 4 CPU ranks): {seconds:.1f} s "
        f"wall, launch included (target <= {LAB_TARGET_S:.0f} s: "
        f"{_verdict(seconds <= LAB_TARGET_S)})"
    )


if __name__ == "__main__":
    main()
