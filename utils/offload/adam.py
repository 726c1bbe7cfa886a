"""The course's CPU Adam: the update ZeRO-Offload runs on the host, vectorised.

Part of chapter 3 ("CPU offloading"). Ren et al., "ZeRO-Offload: Democratizing
Billion-Scale Model Training" (USENIX ATC 2021), run the optimizer step on the
CPU and make it fast (section 5.1) with their CPU-Adam: SIMD instructions over
contiguous memory, loop unrolling, several threads, and one pass over the data in
tiles that stay in cache. :class:`HostAdamW` gets the same effects from torch's own
vectorised CPU kernels (SIMD inside each ATen op, OpenMP threads across a large
tensor) by arranging the work the same way:

* it updates whatever tensors it is given; ``utils.offload.optim`` gives it a few
  long flat buffers (one per bucket), not hundreds of small parameters;
* it works **in place** with one scratch buffer of a tile, made once per step: no
  temporary the size of the model is allocated (torch's ``foreach`` Adam makes
  several of the whole parameter list per step);
* it walks each buffer in tiles of ``tile_numel`` elements, doing all five
  operations on a tile before the next, as DeepSpeed's ``Step_AVX``
  (``csrc/includes/cpu_adam.h``) loops over chunks of ``TILE`` = 128 Mi elements
  (``csrc/includes/simd.h``), each an OpenMP-parallel loop of SIMD loads, fused
  multiply-adds and stores; the tile bounds the scratch buffer, not a cache.

The arithmetic is torch's AdamW, operation for operation
(``torch/optim/adam.py``, ``_single_tensor_adam`` with
``decoupled_weight_decay=True``): decay ``p *= 1 - lr wd``, ``m.lerp_(g, 1 - b1)``,
``v = b2 v + (1 - b2) g^2``, ``denom = sqrt(v) / sqrt(1 - b2^t) + eps``,
``p -= lr / (1 - b1^t) * m / denom``; so it gives torch's results bit for bit, which
``tests/test_offload.py`` checks. ``weight_decay=0`` is Adam. ``bench/offload.py``
times it against ``torch.optim.Adam(foreach=True)`` on the same host tensors, and
:func:`naive_adam_` is the scalar loop that SIMD replaces (the chapter times it on
20,000 elements: the SIMD chapter's point, on this step).
"""

from __future__ import annotations

import math

import torch

__all__ = ["HostAdamW", "naive_adam_"]

TILE_NUMEL = 1 << 20
"""Elements per tile: 1 Mi fp32 values, 4 MiB of scratch. Large enough for every
core to share each tile's operations: ATen splits an elementwise op over at most
``numel / GRAIN_SIZE`` threads (``GRAIN_SIZE = 32768``,
``ATen/TensorIterator.h``; ``ATen/ParallelOpenMP.h``), so a 65,536-element tile
would run on 2 threads on any host."""


class HostAdamW(torch.optim.Optimizer):
    """AdamW for host tensors: in place, tiled, one tile of scratch (see module).

    Same arguments and defaults as ``torch.optim.AdamW`` (lr 1e-3, betas (0.9,
    0.999), eps 1e-8, weight_decay 1e-2), plus ``tile_numel`` (None: whole tensors).
    State per parameter: ``step`` (an int), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        tile_numel: int | None = TILE_NUMEL,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps, weight_decay must be >= 0: {eps}, {weight_decay}")
        if tile_numel is not None and tile_numel < 1:
            raise ValueError(f"tile_numel must be >= 1 or None, got {tile_numel}")
        self.tile_numel = tile_numel
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # during a step only
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _scratch_for(self, p: torch.Tensor, numel: int) -> torch.Tensor:
        buf = self._scratch.get(p.dtype)
        if buf is None or buf.numel() < numel or buf.device != p.device:
            buf = torch.empty(numel, dtype=p.dtype, device=p.device)
            self._scratch[p.dtype] = buf
        return buf[:numel]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HostAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])  # torch reads its float step tensor
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                coeffs = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2)
                self._update(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"], coeffs,
                    bias2**0.5, eps, lr / bias1,
                )  # fmt: skip
        self._scratch.clear()  # workspace: freed with the step
        return loss

    def _update(self, p, g, m, v, coeffs, bias2_sqrt, eps, step_size) -> None:
        decay, one_minus_b1, beta2, one_minus_b2 = coeffs
        p, g, m, v = (x.view(-1) for x in (p, g, m, v))
        n = p.numel()
        tile = n if self.tile_numel is None else min(n, self.tile_numel)
        denom_buf = self._scratch_for(p, max(tile, 1))
        for start in range(0, n, max(tile, 1)):
            end = min(n, start + tile)
            pt, gt, mt, vt = p[start:end], g[start:end], m[start:end], v[start:end]
            denom = denom_buf[: end - start]
            if decay != 1:
                pt.mul_(decay)
            mt.lerp_(gt, one_minus_b1)
            vt.mul_(beta2).addcmul_(gt, gt, value=one_minus_b2)
            torch.sqrt(vt, out=denom)
            denom.div_(bias2_sqrt).add_(eps)
            pt.addcdiv_(mt, denom, value=-step_size)


def naive_adam_(
    p: list[float],
    g: list[float],
    m: list[float],
    v: list[float],
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> None:
    """One AdamW step, one element at a time in Python (the scalar baseline).

    ``p``, ``m``, ``v`` are lists of floats, updated in place; ``step`` is the
    step number (1 for the first). Double precision, so it is a reference for the
    update's value, and a measure of what a loop without SIMD costs per element.
    """
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bias2_sqrt = math.sqrt(1 - beta2**step)
    for i in range(len(p)):
        p[i] *= 1 - lr * weight_decay
        m[i] += (g[i] - m[i]) * (1 - beta1)
        v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i]
        p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bias2_sqrt + eps)
