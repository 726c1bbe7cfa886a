"""ZeRO stage 3: the course's FullyShardedModule against torch's fully_shard (FSDP2),
and the course's stage 3 with and without its all-gather prefetch.

Run with ``python -m bench zero``. Two measurements, both at world size 4 (gloo on
CPU here, NCCL on 4 GPUs), on the same GPT and batches, memory tracking off:

1. The lab (``labs.zero``): the median step time (forward + backward + optimizer,
   all steps but the first) of the slowest rank, scratch (prefetch on, its
   default) over torch. Target: at most 1.5. The two alternate inside one launch,
   ``ROUNDS`` times each, and the best round of each counts, so a noisy neighbour
   on a shared machine hurts both alike.
2. Prefetch: ``FullyShardedModule(prefetch=True)`` (all-gathers started one unit
   ahead, reduce-scatters waited one unit later), ``prefetch=False`` (every
   collective blocks) and ``fully_shard``, alternating in one launch for
   ``ROUNDS`` rounds of ``STEPS`` steps; the figure is the median over all timed
   steps (the first step of each round, which records the forward order, is not
   timed) of the slowest rank's step, with the spread of the rounds' medians. Also
   the peak bytes of gathered parameters (full buffers plus all-gather buffers)
   and the most units other than the root gathered at once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.nn import functional as F

from labs.zero import Config, apply_torch, build_model, run_many
from utils.launch import launch, rank_device
from utils.models import gpt_batch, shard_batch
from utils.zero.fsdp import FullyShardedModule

WORLD_SIZE = 4
ROUNDS = 3
STEPS = 6
TARGET = 1.5
CONFIG = Config(
    world_size=WORLD_SIZE,
    stage=3,
    d_model=128,  # ~0.8 M parameters in 4 blocks: big enough that compute counts
    n_layers=4,
    batch_size=16,
    steps=6,
    track_memory=False,
)
MODES = ("prefetch", "blocking", "fully_shard")


def measure(precision: str = "fp32") -> dict[str, float]:
    """Best-round seconds per step for each implementation, and their ratio."""
    cfgs = [
        replace(CONFIG, impl=impl, precision=precision)
        for _ in range(ROUNDS)
        for impl in ("scratch", "torch")
    ]
    best: dict[str, float] = {}
    for cfg, reports in zip(cfgs, run_many(cfgs)):
        slowest = max(r.timings["step"] for r in reports)
        best[cfg.impl] = min(best.get(cfg.impl, slowest), slowest)
    return {**best, "ratio": best["scratch"] / best["torch"]}


def _build(cfg: Config, mode: str, device):
    model = build_model(cfg, device)
    if mode == "fully_shard":
        return apply_torch(model, replace(cfg, impl="torch"))
    compute = torch.bfloat16 if cfg.precision == "mixed" else None
    model = FullyShardedModule(model, compute, prefetch=mode == "prefetch")
    return model, model.optimizer(torch.optim.AdamW, lr=cfg.lr)


def prefetch_worker(cfg: Config, rounds: int, steps: int) -> dict:
    """In every rank: each mode's slowest-rank step times, and gathered peaks."""
    rank, n, device = dist.get_rank(), dist.get_world_size(), rank_device()
    times = {mode: [] for mode in MODES}
    peaks = {}
    for _ in range(rounds):
        for mode in MODES:
            model, opt = _build(cfg, mode, device)
            per_step = []
            for step in range(steps + 1):  # step 0 records the order: not timed
                x, y = gpt_batch(cfg.gpt(), cfg.batch_size, seed=cfg.seed, step=step)
                x, y = shard_batch((x.to(device), y.to(device)), rank, n)
                dist.barrier()
                start = time.perf_counter()
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                per_step.append(time.perf_counter() - start)
            slowest = torch.tensor(per_step[1:], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[mode].append(slowest.tolist())
            if mode != "fully_shard":
                peaks[mode] = dict(model.gathered_peak, unit_bytes=model.unit_bytes())
            del model, opt
    return {"times": times, "peaks": peaks}


def measure_prefetch(precision: str = "fp32") -> dict:
    """Median step seconds (all rounds' timed steps) per mode, round medians, and
    the scratch modes' gathered peaks (rank 0)."""
    cfg = replace(CONFIG, precision=precision)
    out = launch(
        prefetch_worker,
        cfg,
        ROUNDS,
        STEPS,
        world_size=WORLD_SIZE,
        backend=cfg.backend,
        timeout=600,
    )[0]
    result = {}
    for mode, rounds in out["times"].items():
        result[mode] = {
            "median": statistics.median(t for r in rounds for t in r),
            "rounds": [statistics.median(r) for r in rounds],
        }
    result["peaks"] = out["peaks"]
    return result


def main() -> None:
    print(
        f"ZeRO stage 3, world size {WORLD_SIZE}, GPT d_model={CONFIG.d_model} "
        f"n_layers={CONFIG.n_layers}, global batch {CONFIG.batch_size}"
    )
    print("  the lab, scratch (prefetch on) against fully_shard, best round:")
    for precision in ("fp32", "mixed"):
        m = measure(precision)
        verdict = "ok" if m["ratio"] <= TARGET else f"above the {TARGET} target"
        print(
            f"  {precision:>5}: scratch {m['scratch'] * 1e3:7.1f} ms/step, "
            f"fully_shard {m['torch'] * 1e3:7.1f} ms/step, "
            f"ratio {m['ratio']:.2f} ({verdict})"
        )
    print(
        f"  prefetch on and off, median of {ROUNDS} x {STEPS} steps "
        "(round medians in brackets):"
    )
    for precision in ("fp32", "mixed"):
        m = measure_prefetch(precision)
        parts = []
        for mode in MODES:
            rounds = ", ".join(f"{t * 1e3:.0f}" for t in m[mode]["rounds"])
            parts.append(f"{mode} {m[mode]['median'] * 1e3:6.1f} [{rounds}]")
        gain = m["blocking"]["median"] / m["prefetch"]["median"]
        print(f"  {precision:>5}: " + ", ".join(parts) + " ms/step")
        print(f"         blocking / prefetch = {gain:.2f}")
        for mode in ("prefetch", "blocking"):
            peak = m["peaks"][mode]
            print(
                f"         {mode}: peak gathered {peak['bytes'] / 2**10:.0f} KiB "
                f"(full + all-gather buffers), at most {peak['units']} unit(s) "
                "besides the root"
            )


if __name__ == "__main__":
    main()
