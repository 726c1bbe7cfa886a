"""CPU offloading: the host step's speed, and the lab's wall time.

Run with ``python -m bench offload``. Three measurements:

1. The CPU optimizer step: the course's ``HostAdamW`` (``utils.offload.adam``)
   against ``torch.optim.Adam(foreach=True)`` on the same host tensors, weight
   decay 0 (Adam), the median of ``STEPS`` steps, each optimizer in turn for
   ``ROUNDS`` rounds (the best round counts, so a noisy neighbour hurts both
   alike). Two layouts: the flat fp32 buckets ``OffloadOptimizer`` hands it (one
   per block of the GPT below, this rank's whole slice at world size 1), and the
   same parameters as the model's separate tensors. Target: at most
   ``TARGET`` = 1.2 times foreach's time.
2. The scalar loop SIMD replaces: ``naive_adam_`` on ``NAIVE_NUMEL`` elements, in
   elements per second, beside ``HostAdamW``'s.
3. The default lab (``labs.offload.Config()`` on 4 ranks: ZeRO-Offload in mixed
   precision, 3 steps of the 4-block GPT), wall seconds of ``run``, start to
   reports. Target: at most 30 s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from labs.offload import Config, run
from utils.flat import FlatLayout, chunk_params
from utils.models import GPT, GPTConfig
from utils.offload.adam import HostAdamW, naive_adam_

ROUNDS = 3
STEPS = 5
TARGET = 1.2
LAB_TARGET_S = 30.0
NAIVE_NUMEL = 20_000
MODEL = GPTConfig(d_model=384, n_layers=8, n_heads=4)
"""About 14 M parameters: 57 MB per fp32 array, several times any CPU cache."""


def _flat_buckets(model) -> list[torch.Tensor]:
    """fp32 buffers laid out as OffloadOptimizer's buckets (one block each)."""
    params = list(model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    out = []
    for chunk in chunk_params(reversed(params), block):
        layout = FlatLayout((p.numel() for p in chunk), 1)
        flat = torch.zeros(layout.padded)
        for p, (a, b) in zip(chunk, layout.spans()):
            flat[a:b].copy_(p.detach().reshape(-1))
        out.append(flat)
    return out


def _timed(opt, steps: int) -> float:
    opt.step()  # states made, pages touched: not timed
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_step(layout: str = "flat") -> dict:
    """Best-round median seconds per step of each optimizer, and the ratio."""
    model = GPT(MODEL, seed=0)
    if layout == "flat":
        base = _flat_buckets(model)
    else:
        base = [
            p.detach().clone() for p in {id(p): p for p in model.parameters()}.values()
        ]
    grads = [torch.randn_like(t) * 1e-3 for t in base]
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name in ("HostAdamW", "Adam(foreach=True)"):
            params = [t.clone().requires_grad_() for t in base]
            for p, g in zip(params, grads):
                p.grad = g
            if name == "HostAdamW":
                opt = HostAdamW(params, lr=1e-3, weight_decay=0.0)
            else:
                opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
            seconds = _timed(opt, STEPS)
            best[name] = min(best.get(name, seconds), seconds)
            del opt, params
    numel = sum(t.numel() for t in base)
    return {
        **best,
        "ratio": best["HostAdamW"] / best["Adam(foreach=True)"],
        "numel": numel,
        "tensors": len(base),
    }


def measure_naive() -> dict:
    """Elements per second: the scalar Python loop against HostAdamW."""
    values = torch.randn(NAIVE_NUMEL).tolist()
    grads = (torch.randn(NAIVE_NUMEL) * 1e-3).tolist()
    m, v = [0.0] * NAIVE_NUMEL, [0.0] * NAIVE_NUMEL
    start = time.perf_counter()
    naive_adam_(values, grads, m, v, step=1)
    naive = NAIVE_NUMEL / (time.perf_counter() - start)
    big = torch.randn(4_000_000, requires_grad=True)
    big.grad = torch.randn_like(big)
    seconds = _timed(HostAdamW([big]), STEPS)
    return {"naive": naive, "vectorised": big.numel() / seconds}


def measure_lab() -> dict:
    """Wall seconds of the default lab on 4 ranks (launch included)."""
    cfg = replace(Config(), world_size=4)
    start = time.perf_counter()
    reports = run(cfg)
    wall = time.perf_counter() - start
    slowest = max(r.timings["step"] for r in reports)
    return {"wall": wall, "step": slowest, "config": cfg}


def main() -> None:
    print(
        f"CPU Adam step, {torch.get_num_threads()} intra-op threads, GPT "
        f"d_model={MODEL.d_model} n_layers={MODEL.n_layers} (best of {ROUNDS} rounds, "
        f"median of {STEPS} steps):"
    )
    for layout in ("flat", "per-parameter"):
        m = measure_step(layout)
        verdict = "ok" if m["ratio"] <= TARGET else f"above the {TARGET} target"
        print(
            f"  {layout:>13} ({m['tensors']} tensors, {m['numel'] / 1e6:.1f} M "
            f"elements): HostAdamW {m['HostAdamW'] * 1e3:7.1f} ms, "
            f"Adam(foreach=True) {m['Adam(foreach=True)'] * 1e3:7.1f} ms, "
            f"ratio {m['ratio']:.2f} ({verdict})"
        )
    n = measure_naive()
    print(
        f"  scalar Python loop: {n['naive'] / 1e6:.2f} M elements/s; HostAdamW: "
        f"{n['vectorised'] / 1e6:.0f} M elements/s "
        f"({n['vectorised'] / n['naive']:,.0f}x)"
    )
    lab = measure_lab()
    verdict = "ok" if lab["wall"] <= LAB_TARGET_S else f"above {LAB_TARGET_S:g} s"
    cfg = lab["config"]
    print(
        f"  default lab (--offload {cfg.offload} --precision {cfg.precision}, "
        f"{cfg.world_size} ranks, {cfg.steps} steps): {lab['wall']:.1f} s wall "
        f"({verdict}), slowest rank's median step {lab['step'] * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
