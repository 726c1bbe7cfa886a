"""Checks for the exercises of chapter 7, "DP x TP x PP, and planning a run".

* :func:`check_group_of` (exercise 7.1): the ranks of a rank's group along an
  axis, worked out from the rank order (tp fastest, then dp, then pp), against
  ``utils.dims.ParallelDims.group_of`` on several layouts.
* :func:`check_smallest_pp` (exercise 7.2): the fewest pipeline stages with which
  the planner fits a model in a GPU's memory, against a search over every pp.
* :func:`check_optimizer_bytes` (exercise 7.3): a rank's optimizer-state bytes at
  ZeRO-1, predicted, against what the combined lab measured on its ledger.

Nothing here starts a process: 7.3 takes runs the chapter already made. A check
prints one line when the answer is right and raises ``AssertionError`` with what
was expected when it is not.
"""

from __future__ import annotations

from utils.dims import ParallelDims
from utils.hardware import GB
from utils.planner import PRESETS, LayoutError, ModelSpec, estimate

__all__ = [
    "GROUP_LAYOUTS",
    "SMALLEST_PP_CASES",
    "check_group_of",
    "check_optimizer_bytes",
    "check_smallest_pp",
    "smallest_pp_for",
]

# ------------------------------------------------------------------ 7.1: groups
GROUP_LAYOUTS = [(2, 2, 2), (1, 2, 4), (2, 4, 1), (8, 1, 1), (3, 2, 2), (2, 1, 3),
                 (4, 2, 8)]  # fmt: skip
"""(dp, tp, pp) layouts the check asks about, every rank and every axis."""


def check_group_of(fn) -> None:
    """``fn(rank, axis, dp, tp, pp)`` must return the global ranks of ``rank``'s
    group along ``axis`` ("dp", "tp" or "pp"), ordered by their coordinate along
    that axis, for every rank of every layout in :data:`GROUP_LAYOUTS`."""
    asked = 0
    for dp, tp, pp in GROUP_LAYOUTS:
        dims = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp)
        for rank in range(dims.world_size):
            for axis in ("tp", "dp", "pp"):
                want = dims.group_of(axis, rank)
                try:
                    got = list(fn(rank, axis, dp, tp, pp))
                except TypeError:
                    raise AssertionError(
                        f"dp={dp} tp={tp} pp={pp}, rank {rank}, {axis}: return a "
                        "list of ranks"
                    ) from None
                asked += 1
                if got == want:
                    continue
                where = f"dp={dp} tp={tp} pp={pp}, rank {rank}, axis {axis}"
                hint = ""
                if sorted(got) == sorted(want):
                    hint = " (the right ranks, in another order: order them by "
                    f"their {axis} coordinate)"
                elif rank not in got:
                    hint = f" (rank {rank} itself is not in your group)"
                elif len(got) != dims.degree(axis):
                    hint = f" (a {axis} group holds {axis}={dims.degree(axis)} ranks)"
                raise AssertionError(
                    f"{where}: you gave {got}, ParallelDims gives {want}{hint}. "
                    "rank = tp_rank + tp * (dp_rank + dp * pp_rank)"
                )
    print(f"correct: {asked} groups on {len(GROUP_LAYOUTS)} layouts match ParallelDims")


# ------------------------------------------------------------------ 7.2: pp
SMALLEST_PP_CASES = [
    dict(model="GPT-3 175B", memory_gb=80, tp=8, dp=8, zero_stage=1,
         recompute="selective"),
    dict(model="GPT-3 175B", memory_gb=40, tp=8, dp=8, zero_stage=1,
         recompute="selective"),
    dict(model="GPT-3 175B", memory_gb=80, tp=4, dp=1, zero_stage=0,
         recompute="full"),
    dict(model="Llama 3 70B", memory_gb=80, tp=8, dp=4, zero_stage=1,
         recompute="selective"),
    dict(model="Llama 3 70B", memory_gb=24, tp=4, dp=1, zero_stage=0,
         recompute="selective"),
    dict(model="Llama 3 8B", memory_gb=80, tp=1, dp=1, zero_stage=0,
         recompute="none"),
    dict(model="Llama 3 8B", memory_gb=16, tp=2, dp=8, zero_stage=1,
         recompute="full"),
    dict(model="GPT 1T (Narayanan)", memory_gb=80, tp=8, dp=6, zero_stage=1,
         recompute="selective"),
    dict(model="GPT 1T (Narayanan)", memory_gb=80, tp=8, dp=6, zero_stage=0,
         recompute="full"),
]  # fmt: skip
"""What the check asks: a preset, a GPU's memory (GB = 10^9 bytes), tp, dp, the
ZeRO stage and the recomputation; always 1F1B, one sequence per micro-batch and
4 x pp micro-batches per pipeline."""
LAYOUT_KEYS = ("tp", "dp", "zero_stage", "recompute")


def smallest_pp_for(model: ModelSpec, memory_gb: float, **layout) -> int | None:
    """The course's answer: the fewest pp (1 to the model's layers) whose estimate
    fits, or None (``layout`` as :func:`check_smallest_pp` passes it)."""
    for pp in range(1, model.layers + 1):
        try:
            e = _estimate(model, pp, **layout)
        except LayoutError:
            continue
        if e.fits(memory_gb * GB):
            return pp
    return None


def _estimate(model, pp, *, tp, dp, zero_stage, recompute):
    return estimate(
        model, dp=dp, tp=tp, pp=pp, zero_stage=zero_stage, micro_batch=1,
        micro_batches=4 * pp, recompute=recompute,
    )  # fmt: skip


def check_smallest_pp(fn) -> None:
    """``fn(model, memory_gb, *, tp, dp, zero_stage, recompute)`` must return the
    fewest pipeline stages ``pp`` with which ``utils.planner.estimate`` (1F1B,
    micro_batch=1, micro_batches=4 x pp) fits the model in ``memory_gb`` GB per
    GPU, or None when no pp up to the model's layers does, for every case in
    :data:`SMALLEST_PP_CASES`."""
    for case in SMALLEST_PP_CASES:
        kw = {k: case[k] for k in LAYOUT_KEYS}
        model = PRESETS[case["model"]]
        want = smallest_pp_for(model, case["memory_gb"], **kw)
        got = fn(model, case["memory_gb"], **kw)
        if got == want:
            continue
        where = f"{case['model']} in {case['memory_gb']} GB with " + ", ".join(
            f"{k}={v}" for k, v in kw.items()
        )
        if want is None:
            raise AssertionError(f"{where}: no pp fits, so return None; you gave {got}")
        have = _estimate(model, want, **kw).device["total"] / GB
        hint = f"at pp={want} the planner gives {have:.1f} GB per GPU"
        if isinstance(got, int) and not isinstance(got, bool) and 1 <= got:
            try:
                yours = _estimate(model, got, **kw).device["total"] / GB
                hint += f", at your pp={got} {yours:.1f} GB"
            except LayoutError as err:
                hint += f"; your pp={got} is refused: {err}"
        raise AssertionError(f"{where}: you gave pp={got}, want {want} ({hint})")
    print(f"correct: the smallest pp for {len(SMALLEST_PP_CASES)} models and GPUs")


# ------------------------------------------------------------------ 7.3: ZeRO-1
def check_optimizer_bytes(fn, runs) -> None:
    """``fn(cfg, rank)`` must predict the optimizer-state bytes that rank ``rank``
    of the combined lab's configuration ``cfg`` (a ZeRO-1 ``labs.combined.Config``)
    holds after its optimizer step. ``runs`` is a list of (cfg, rank reports),
    measured: every rank of every run is compared with its ledger's
    ``extra.states["optimizer"]``, to the byte."""
    asked = 0
    for cfg, reports in runs:
        if cfg.zero_stage != 1:
            raise ValueError(f"check_optimizer_bytes takes ZeRO-1 runs, got {cfg}")
        for r in sorted(reports, key=lambda r: r.rank):
            measured = r.extra.states["optimizer"]
            got = fn(cfg, r.rank)
            asked += 1
            if got == measured:
                continue
            where = (
                f"dp={cfg.dp_size} tp={cfg.tp_size} pp={cfg.pp_size}, rank {r.rank}"
                f" {r.coords['tp'], r.coords['dp'], r.coords['pp']} (tp, dp, pp)"
            )
            hint = ""
            if isinstance(got, int | float) and got:
                diff = measured - got
                if diff == 4:
                    hint = " (4 bytes short: AdamW also keeps its step count, one "\
                           "fp32 number for the flat bucket it sees)"  # fmt: skip
                elif abs(got / measured - cfg.dp_size) < 0.01:
                    hint = f" ({cfg.dp_size} times too many: ZeRO-1 shards the "\
                           "states over the dp group)"  # fmt: skip
                elif abs(measured / got - 2) < 0.01:
                    hint = " (half: AdamW keeps two states per parameter)"
            raise AssertionError(
                f"{where}: you predict {got} bytes, the lab measured {measured}{hint}"
            )
    print(f"correct: {asked} ranks' optimizer bytes predicted to the byte (measured)")
