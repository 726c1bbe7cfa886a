"""Figures and widgets of chapter 0, "Why one device is not enough".

Pure functions compute what to draw from the lab's reports (``labs.foundations``)
or from the analytic models (``utils.memory_model``); drawing functions return a new
:class:`matplotlib.figure.Figure` (no pyplot state); the widgets only wire controls
to them through ``utils.widgets``. Nothing here runs a lab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from utils.comm import alpha_beta_time, fit_alpha_beta
from utils.hardware import ACCELERATORS, GB
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    Convention,
    StateComponent,
    convention_state_bytes,
    mlp_activation_bytes,
    model_state_bytes,
)
from utils.plots import CATEGORY_COLORS, InlineFigure
from utils.report import field_of as _get
from utils.wire import GLOO_PREAMBLE

INFERENCE = Convention(
    key="bf16-inference",
    label="2 B/param: inference, bf16 weights only",
    used_by="Serving a model: 16-bit weights, no gradients, no optimizer states.",
    components=(StateComponent("params", "bf16 parameters", 2, 3),),
)
"""Not a training convention: the contrast that shows how much training adds."""

FIT_CONVENTIONS: dict[str, Convention] = {
    **BYTES_PER_PARAM_CONVENTIONS,
    INFERENCE.key: INFERENCE,
}
"""What the "does it fit" calculator offers: the training conventions of
``utils.memory_model`` (16/18/20 B per parameter) and inference for contrast."""


def state_bytes_per_device(
    num_params: int, convention: str = "mixed-16", devices: int = 1
) -> dict[str, int]:
    """Model-state bytes per device, by category, for ``convention``.

    With ``devices > 1`` every state is split evenly over the devices (what ZeRO
    stage 3 and FSDP do, chapter 2); with one device nothing is split.
    Activations are not included: they depend on batch and sequence length.
    """
    if convention not in FIT_CONVENTIONS:
        raise ValueError(
            f"convention must be one of {sorted(FIT_CONVENTIONS)}, got {convention!r}"
        )
    stage = 3 if devices > 1 else 0
    return convention_state_bytes(
        FIT_CONVENTIONS[convention], num_params, world_size=devices, zero_stage=stage
    ).as_dict()


def fits_table(
    num_params: int, convention: str = "mixed-16", devices: int = 1
) -> list[dict[str, Any]]:
    """One row per accelerator: its memory, the need per device, whether it fits.

    Rows: {"name", "memory_bytes", "need_bytes", "fits", "fraction",
    "devices_needed", "source"}: ``fraction`` = need / memory (above 1: it does not
    fit); ``devices_needed`` = the fewest such devices that hold the states split
    evenly (:func:`min_devices`).
    """
    need = sum(state_bytes_per_device(num_params, convention, devices).values())
    return [
        {
            "name": acc.name,
            "memory_bytes": acc.memory_bytes,
            "need_bytes": need,
            "fits": need <= acc.memory_bytes,
            "fraction": need / acc.memory_bytes,
            "devices_needed": min_devices(num_params, acc.memory_bytes, convention),
            "source": acc.source,
        }
        for acc in ACCELERATORS
    ]


def min_devices(
    num_params: int, memory_bytes: int, convention: str = "mixed-16"
) -> int:
    """Fewest devices of ``memory_bytes`` each whose evenly split model state fits."""
    total = sum(state_bytes_per_device(num_params, convention, 1).values())
    n = max(1, math.ceil(total / memory_bytes))
    while (
        sum(state_bytes_per_device(num_params, convention, n).values()) > memory_bytes
    ):
        n += 1  # ceil per shard can add a few bytes
    return n


def draw_fits(
    billions: float = 7.0, convention: str = "mixed-16", devices: int = 1
) -> Figure:
    """Bars: each accelerator's memory (GB) against the model state per device;
    beside each, how full it would be or how many such devices the state needs."""
    num_params = round(billions * 1e9)
    split = state_bytes_per_device(num_params, convention, devices)
    rows = fits_table(num_params, convention, devices)
    need_gb = sum(split.values()) / GB
    fig = InlineFigure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ys = np.arange(len(rows))
    colors = ["#55a868" if r["fits"] else "#c44e52" for r in rows]
    capacities = [r["memory_bytes"] / GB for r in rows]
    ax.barh(ys, capacities, color=colors, alpha=0.35)
    left = 0.0
    for cat, value in split.items():
        if value:
            ax.barh(len(rows), value / GB, left=left, color=CATEGORY_COLORS[cat])
            left += value / GB
    ax.axvline(need_gb, color="black", linestyle="--", linewidth=1)
    xmax = 1.35 * max(need_gb, *capacities)
    for y, row, cap in zip(ys, rows, capacities):
        note = (
            f"{row['fraction']:.0%} full"
            if row["fits"]
            else f"needs {row['devices_needed']:,} devices"
        )
        ax.text(cap + 0.01 * xmax, y, note, va="center", fontsize=7)
    ax.set_xlim(0, xmax)
    ax.set_yticks([*ys, len(rows)], [*[r["name"] for r in rows], "needed per device"])
    ax.set_xlabel("GB (10^9 bytes)")
    fitting = [r["name"] for r in rows if r["fits"]] or ["none"]
    per = f" on each of {devices} devices" if devices > 1 else ""
    ax.set_title(
        f"{billions:g}B parameters, {FIT_CONVENTIONS[convention].label}: "
        f"{need_gb:,.1f} GB{per}\nfits (model states only): {', '.join(fitting)}",
        fontsize=9,
    )
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c, v in split.items() if v]
    handles += [
        Patch(color="#55a868", alpha=0.35, label="fits"),
        Patch(color="#c44e52", alpha=0.35, label="does not fit"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    return fig


FIT_BILLIONS: tuple[float, ...] = (1, 7, 13, 70, 175, 405)
"""Model sizes (billions of parameters) the static calculator offers: 7, 13 and 70
are LLaMA-2's sizes, 175 GPT-3's, 405 LLaMA-3.1's largest."""


def fits_widget(billions: float = 7.0, *, live: bool = False):
    """The "does it fit" calculator: model size and convention -> figure.

    By default every choice (:data:`FIT_BILLIONS` x :data:`FIT_CONVENTIONS`, 30
    figures) is drawn now, so both controls work in the static book
    (``interactive_figure(prerender=True)``); the figure itself says, per
    accelerator, how many devices the states need when they do not fit.
    ``live=True`` gives free controls instead (any size from 0.1B to 1000B, and a
    device count that splits every state as ZeRO stage 3 does), which redraw only
    with a running kernel.
    """
    import ipywidgets as w

    from utils.widgets import interactive_figure

    convention = w.Dropdown(
        options=[(c.label, key) for key, c in FIT_CONVENTIONS.items()],
        value="mixed-16",
        description="convention",
        layout=w.Layout(width="420px"),
    )
    if live:
        return interactive_figure(
            draw_fits,
            billions=w.FloatLogSlider(
                value=billions,
                base=10,
                min=-1,
                max=3,
                step=0.05,
                description="params (B)",
                continuous_update=False,
            ),
            convention=convention,
            devices=w.IntSlider(
                value=1,
                min=1,
                max=64,
                description="devices",
                continuous_update=False,
            ),
        )
    if billions not in FIT_BILLIONS:
        raise ValueError(
            f"billions must be one of {FIT_BILLIONS} (the prerendered sizes), got "
            f"{billions!r}; pass live=True for any size"
        )
    return interactive_figure(
        draw_fits,
        prerender=True,
        billions=w.SelectionSlider(
            options=[(f"{b:g}B", b) for b in FIT_BILLIONS], value=billions,
            description="params", continuous_update=False,
        ),
        convention=convention,
    )  # fmt: skip


# ------------------------------------------------------------------- anatomy
def anatomy_prediction(report) -> dict[str, int]:
    """The analytic bytes per rank for the anatomy run of ``report``.

    Model states: fp32 Adam, 4 + 4 + 8 bytes per parameter
    (``model_state_bytes(n, mixed_precision=False)``). Activations at the end of
    forward: what autograd saves inside the MLP (``mlp_activation_bytes``, the
    input included) plus three output-sized tensors the loss keeps alive until
    backward: the model's output and the target (saved by ``mse_loss``) and, on
    CPU, the loss's own storage (torch's CPU ``mse_loss`` returns its scalar as a
    view of the unreduced, output-sized buffer).
    """
    anatomy = _get(_extra(report), "anatomy")
    sizes, batch = anatomy["sizes"], anatomy["local_batch"]
    states = model_state_bytes(_get(report, "num_params"), mixed_precision=False)
    held_by_loss = 3 if _get(report, "device") == "cpu" else 2
    acts = mlp_activation_bytes(batch, sizes) + held_by_loss * batch * sizes[-1] * 4
    return {**states.as_dict(), "activations": acts}


def anatomy_rows(reports, phase: str = "step", step: int | None = None) -> list[dict]:
    """Measured (current, at the end of ``phase``) against predicted, per rank and
    category. ``step`` None: the last step. Activations are compared at the end of
    forward, where they peak; the model states at ``phase``."""
    rows = []
    for report in sorted(reports, key=lambda r: _get(r, "rank")):
        timeline = _get(report, "memory")
        last = max(e["step"] for e in timeline if e["step"] is not None)
        s = last if step is None else step
        at = {e["phase"]: e["current"] for e in timeline if e["step"] == s}
        predicted = anatomy_prediction(report)
        for cat, value in predicted.items():
            measured = at["forward" if cat == "activations" else phase][cat]
            rows.append(
                {
                    "rank": _get(report, "rank"),
                    "category": cat,
                    "measured": measured,
                    "predicted": value,
                    "ratio": measured / value if value else float("nan"),
                }
            )
    return rows


def anatomy_totals(reports) -> dict[str, Any]:
    """Exact byte totals of the anatomy run, for the text (no rounding).

    ``states_per_rank``: rank 0's measured params + grads + optimizer at the end of
    the last step; ``states_all``: summed over the ranks; ``same_states``: whether
    every rank measured the same; ``acts_per_rank``: rank 0's measured activations
    at the end of the last forward; ``acts_one_device``: the analytic activations
    (:func:`anatomy_prediction`) of one device that computes the whole global batch
    alone; ``states_formula``: ``model_state_bytes(n, mixed_precision=False)``,
    16 B per parameter; ``param_tensors``: the MLP's weight and bias tensors (Adam
    keeps a ``step`` counter, an fp32 scalar, for each); ``world_size``,
    ``num_params``, ``local_batch``, ``global_batch``.
    """
    ordered = sorted(reports, key=_rank)
    states, acts = [], []
    for r in ordered:
        timeline = _get(r, "memory")
        last = max(e["step"] for e in timeline if e["step"] is not None)
        at = {e["phase"]: e["current"] for e in timeline if e["step"] == last}
        states.append(sum(at["step"][c] for c in ("params", "grads", "optimizer")))
        acts.append(at["forward"]["activations"])
    anatomy = _get(_extra(ordered[0]), "anatomy")
    n = len(ordered)
    alone = {
        **_as_dict(ordered[0]),
        "extra": {"anatomy": {**anatomy, "local_batch": anatomy["local_batch"] * n}},
    }
    return {
        "world_size": n,
        "num_params": _get(ordered[0], "num_params"),
        "states_per_rank": states[0],
        "states_formula": model_state_bytes(
            _get(ordered[0], "num_params"), mixed_precision=False
        ).total,
        "param_tensors": 2 * (len(anatomy["sizes"]) - 1),
        "states_all": sum(states),
        "same_states": len(set(states)) == 1,
        "acts_per_rank": acts[0],
        "acts_one_device": anatomy_prediction(alone)["activations"],
        "local_batch": anatomy["local_batch"],
        "global_batch": anatomy["local_batch"] * n,
    }


def _as_dict(report) -> dict:
    keys = ("num_params", "device", "rank", "world_size")
    return {k: _get(report, k) for k in keys}


def wire_rows(reports) -> list[dict[str, Any]]:
    """Per rank, the gradient all-reduce of the last anatomy step: the modelled
    bytes (``comm_bytes``, nccl-tests' 2(n-1)/n x S) beside the bytes the kernel
    counted leaving the rank's TCP sockets (``wire_bytes``; None on NCCL).

    Rows: {"rank", "modelled", "source", "counted", "difference", "preambles"},
    ``preambles`` = difference / 48 when the difference is a whole number of gloo
    preambles, else None.
    """
    rows = []
    for r in sorted(reports, key=_rank):
        counted = _get(r, "wire_bytes")
        modelled = _get(r, "comm_bytes")
        diff = None if counted is None else counted - modelled
        whole = diff is not None and diff >= 0 and diff % GLOO_PREAMBLE == 0
        rows.append(
            {
                "rank": _get(r, "rank"),
                "modelled": modelled,
                "source": _get(r, "comm_source"),
                "counted": counted,
                "difference": diff,
                "preambles": diff // GLOO_PREAMBLE if whole else None,
            }
        )
    return rows


def anatomy_widget(reports):
    """Memory per rank, measured against the analytic model (utils.widgets)."""
    from utils.widgets import memory_per_rank

    predicted = [anatomy_prediction(r) for r in sorted(reports, key=_rank)]
    return memory_per_rank(reports, predicted=predicted)


# ---------------------------------------------------------------- collectives
def collective_grids(reports) -> dict[str, dict[str, Any]]:
    """Per collective: every rank's tensor before and after, as lists by rank.

    ``{op: {"before": [[...] per rank], "after": [...], "root": int | None}}``,
    in the order the lab ran them.
    """
    ordered = sorted(reports, key=_rank)
    ops = list(_get(_extra(ordered[0]), "collectives"))
    grids = {}
    for op in ops:
        records = [_get(_extra(r), "collectives")[op] for r in ordered]
        grids[op] = {
            "before": [rec["before"] for rec in records],
            "after": [rec["after"] for rec in records],
            "root": records[0].get("root"),
        }
    return grids


def value_origins(grid: dict[str, Any]) -> list[list[int | None]]:
    """For each value after the collective, the rank whose input held it, or None
    when no single input did (a sum of several ranks' values).

    Matching is by value, so it is unambiguous only when sums cannot equal an
    input: true for the lab's inputs (rank r holds 10(r+1) + i) up to 9 ranks and
    10 elements.
    """
    owner: dict[float, int] = {}
    ambiguous = set()
    for rank, values in enumerate(grid["before"]):
        for v in values:
            if v in owner and owner[v] != rank:
                ambiguous.add(v)
            owner[v] = rank
    return [
        [None if v in ambiguous else owner.get(v) for v in values]
        for values in grid["after"]
    ]


_RANK_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3")
_SUM_COLOR = "#c44e52"
_UNDEFINED = "#dddddd"


def _draw_grid(ax, rows, colors, title):
    width = max(len(r) for r in rows)
    for y, (values, cols) in enumerate(zip(rows, colors)):
        for x, (v, c) in enumerate(zip(values, cols)):
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=c, edgecolor="white"))
            ax.text(x + 0.5, y + 0.5, f"{v:g}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), 0)
    ax.set_yticks([y + 0.5 for y in range(len(rows))])
    ax.set_yticklabels([f"rank {y}" for y in range(len(rows))], fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_collectives(reports, ops: Sequence[str] | None = None) -> Figure:
    """One row per collective: each rank's tensor before (left) and after (right).

    Colours say where a value came from: a rank's colour if that rank's input held
    it, red for a sum over ranks, grey for a buffer whose content the collective
    leaves undefined (a non-root rank after ``reduce``).
    """
    grids = collective_grids(reports)
    ops = list(grids) if ops is None else list(ops)
    fig = InlineFigure(figsize=(8, 1.1 + 1.15 * len(ops)), layout="constrained")
    axes = fig.subplots(len(ops), 2, squeeze=False)
    for (ax_before, ax_after), op in zip(axes, ops):
        grid = grids[op]
        n = len(grid["before"])
        rank_color = [_RANK_COLORS[r % len(_RANK_COLORS)] for r in range(n)]
        before_colors = [[rank_color[r]] * len(v) for r, v in enumerate(grid["before"])]
        origins = value_origins(grid)
        after_colors = []
        for r, row in enumerate(origins):
            if op == "reduce" and r != grid["root"]:
                after_colors.append([_UNDEFINED] * len(row))
            else:
                after_colors.append(
                    [_SUM_COLOR if o is None else rank_color[o] for o in row]
                )
        root = "" if grid["root"] is None else f" (root: rank {grid['root']})"
        _draw_grid(ax_before, grid["before"], before_colors, f"{op}{root}: before")
        _draw_grid(ax_after, grid["after"], after_colors, f"{op}: after")
    fig.legend(
        handles=[
            Patch(color=_SUM_COLOR, label="sum over ranks"),
            Patch(color=_UNDEFINED, label="undefined (not the root)"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=8,
    )
    return fig


# ------------------------------------------------------------ bus bandwidth
def busbw_rows(reports) -> list[dict[str, Any]]:
    """Rank 0's all-reduce measurements (``utils.comm.time_all_reduce`` rows):
    {"bytes", "time_s" (median), "time_p10_s", "time_p90_s", "time_min_s",
    "time_max_s", "times_s", "algbw", "busbw", ...}; every rank has the same."""
    return list(_get(_extra(sorted(reports, key=_rank)[0]), "busbw"))


def _span(rows: Sequence[dict], first: bool, factor: int = 16) -> tuple[int, int]:
    """Indices (i, j) of the first (or last) pair of rows ``factor`` x apart in
    size, or the widest pair there is when the sweep is shorter."""
    sizes = [r["bytes"] for r in rows]
    pairs = [
        (i, j)
        for i in range(len(sizes))
        for j in range(i + 1, len(sizes))
        if sizes[j] >= factor * sizes[i]
    ]
    if not pairs:
        return 0, len(rows) - 1
    if first:
        return min(pairs, key=lambda p: (p[0], p[1]))
    return max(pairs, key=lambda p: (p[1], p[0]))


def growth_phrase(time_ratio: float, size_ratio: float) -> str:
    """How a time changed when the message grew ``size_ratio`` x, in words."""
    if time_ratio < 0.9:
        return f"fell to {time_ratio:.2f}x"
    if time_ratio < 1.5:
        return f"hardly changed ({time_ratio:.2f}x)"
    if time_ratio < size_ratio / 4:
        return f"grew {time_ratio:.1f}x, far less than the {size_ratio:g}x of the bytes"
    if time_ratio < 0.75 * size_ratio:
        return f"grew {time_ratio:.1f}x, less than the {size_ratio:g}x of the bytes"
    return f"grew {time_ratio:.1f}x, close to the {size_ratio:g}x of the bytes"


def busbw_analysis(rows: Sequence[dict], world_size: int) -> dict[str, Any]:
    """What the measured sweep shows, computed, so the text can follow it.

    * ``alpha``, ``beta``: :func:`utils.comm.fit_alpha_beta` on the medians;
      ``model_s``: the fit's time at each size; ``fit_in_band``: sizes whose fitted
      time lies inside the measured p10-p90 band; ``fit_below``: sizes whose median
      lies above the fit;
    * ``small`` and ``large``: the first and the last pair of sizes 16x apart, each
      {"from", "to", "t_from", "t_to", "size_ratio", "time_ratio", "phrase"};
    * ``dips``: [(smaller size, larger size)] where the larger message's median
      was the shorter; ``dips_in_spread``: whether each such pair's p10-p90 bands
      overlap (the dip is within the noise);
    * ``busbw_best``, ``busbw_best_bytes``; ``spread_max``: the largest
      p90 / p10 ratio of a size; ``iters``, ``warmup``.
    """
    if len(rows) < 2:
        raise ValueError("need at least two message sizes")
    sizes = [r["bytes"] for r in rows]
    med = [r["time_s"] for r in rows]
    lo = [r.get("time_p10_s", r["time_s"]) for r in rows]
    hi = [r.get("time_p90_s", r["time_s"]) for r in rows]
    alpha, beta = fit_alpha_beta(sizes, med, world_size)
    model = [alpha_beta_time(s, world_size, alpha, beta) for s in sizes]

    def span(first: bool) -> dict[str, Any]:
        i, j = _span(rows, first)
        size_ratio, time_ratio = sizes[j] / sizes[i], med[j] / med[i]
        return {
            "from": sizes[i],
            "to": sizes[j],
            "t_from": med[i],
            "t_to": med[j],
            "size_ratio": size_ratio,
            "time_ratio": time_ratio,
            "phrase": growth_phrase(time_ratio, size_ratio),
        }

    down = [k for k in range(len(rows) - 1) if med[k + 1] < med[k]]
    dips = [(sizes[k], sizes[k + 1]) for k in down]
    in_spread = [hi[k + 1] >= lo[k] for k in down]  # the p10-p90 bands overlap
    best = max(rows, key=lambda r: r["busbw"])
    return {
        "alpha": alpha,
        "beta": beta,
        "model_s": model,
        "fit_in_band": sum(a <= m <= b for a, m, b in zip(lo, model, hi)),
        "fit_below": sum(t > m for t, m in zip(med, model)),
        "points": len(rows),
        "small": span(True),
        "large": span(False),
        "dips": dips,
        "dips_in_spread": in_spread,
        "busbw_best": best["busbw"],
        "busbw_best_bytes": best["bytes"],
        "spread_max": max(b / a for a, b in zip(lo, hi) if a > 0),
        "iters": rows[0].get("iters"),
        "warmup": rows[0].get("warmup"),
    }


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def busbw_sentences(analysis: dict[str, Any]) -> dict[str, str]:
    """The chapter's sentences about a sweep, from :func:`busbw_analysis`:
    ``growth`` (how the median time changed over the first and the last 16x in
    size), ``dips`` (where a larger message took less time, and whether that lies
    within the spread), ``fit`` (how the fitted model sits among the points)."""
    from utils.report import format_bytes

    def span(key: str, subject: str) -> str:
        sp = analysis[key]
        return (
            f"from {format_bytes(sp['from'])} to {format_bytes(sp['to'])} "
            f"({sp['size_ratio']:g}x the bytes) {subject} {sp['phrase']}, "
            f"{_us(sp['t_from'])} to {_us(sp['t_to'])}"
        )

    small = span("small", "the median time")
    growth = f"{small[0].upper()}{small[1:]}; {span('large', 'it')}."
    dips = analysis["dips"]
    if not dips:
        dip_text = "The medians rose with every step in size."
    else:
        pairs = ", ".join(
            f"{format_bytes(b)} took less than {format_bytes(a)}" for a, b in dips
        )
        within = sum(analysis["dips_in_spread"])
        tail = (
            "each such dip lies where the two sizes' error bars overlap, within "
            "the noise."
            if within == len(dips)
            else f"{within} of these {len(dips)} dips lie where the two sizes' "
            "error bars overlap, within the noise."
        )
        dip_text = f"The medians did not rise at every step ({pairs}); {tail}"
    n = analysis["points"]
    fit = (
        f"The fitted model passes inside the p10-p90 bar at "
        f"{analysis['fit_in_band']} of the {n} sizes, and {analysis['fit_below']} "
        f"of the {n} medians lie above it."
    )
    return {"growth": growth, "dips": dip_text, "fit": fit}


def _fit_label(alpha: float, beta: float) -> str:
    label = f"fit: alpha = {alpha * 1e6:.0f} us"
    return f"{label}, 1/beta = {1 / beta / GB:.2f} GB/s" if beta else label


def _band(rows, key_lo: str, key_hi: str, scale: float, invert_bytes: bool = False):
    """Error bars (below, above) around the medians from two row keys."""
    if invert_bytes:  # busbw: the slow end of the time band is the low busbw
        factor = [r["busbw"] * r["time_s"] for r in rows]
        mid = np.array([r["busbw"] for r in rows])
        low = np.array([f / r[key_hi] for f, r in zip(factor, rows)])
        high = np.array([f / r[key_lo] for f, r in zip(factor, rows)])
    else:
        mid = np.array([r["time_s"] for r in rows])
        low = np.array([r[key_lo] for r in rows])
        high = np.array([r[key_hi] for r in rows])
    return mid * scale, np.stack([(mid - low) * scale, (high - mid) * scale])


def draw_busbw(reports) -> Figure:
    """Left: all-reduce time against size, the median of the slowest rank with its
    p10-p90 spread as error bars (min and max as dots), and the fitted alpha-beta
    model. Right: algbw and busbw (nccl-tests' definitions) from the medians, busbw
    with the spread the p10-p90 times imply."""
    rows = busbw_rows(reports)
    n = _get(reports[0], "world_size")
    sizes = np.array([r["bytes"] for r in rows], dtype=float)
    spread = all("time_p10_s" in r for r in rows)
    fig = InlineFigure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    if spread:
        times, err = _band(rows, "time_p10_s", "time_p90_s", 1e6)
        left.errorbar(
            sizes, times, yerr=err, fmt="o", capsize=3,
            label=f"median, p10-p90 of {rows[0]['iters']} iterations",
        )  # fmt: skip
        for key in ("time_min_s", "time_max_s"):
            left.plot(
                sizes, [r[key] * 1e6 for r in rows], ".", color="grey",
                label="min, max" if key == "time_min_s" else None,
            )  # fmt: skip
    else:
        times = np.array([r["time_s"] for r in rows]) * 1e6
        left.plot(sizes, times, "o", label="measured (median)")
    if n > 1:
        alpha, beta = fit_alpha_beta(sizes, [r["time_s"] for r in rows], n)
        grid = np.geomspace(sizes.min(), sizes.max(), 50)
        model = [alpha_beta_time(s, n, alpha, beta) * 1e6 for s in grid]
        left.plot(grid, model, "-", label=_fit_label(alpha, beta))
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("message size S (bytes)")
    left.set_ylabel("time (us), slowest rank")
    left.set_title(f"all-reduce on {n} ranks", fontsize=9)
    left.legend(fontsize=7)
    right.plot(sizes, [r["algbw"] / GB for r in rows], "o-", label="algbw = S/t")
    if spread:
        busbw, err = _band(rows, "time_p10_s", "time_p90_s", 1 / GB, True)
        right.errorbar(
            sizes, busbw, yerr=err, fmt="s-", capsize=3,
            label="busbw = algbw 2(n-1)/n (p10-p90)",
        )  # fmt: skip
    else:
        right.plot(
            sizes, [r["busbw"] / GB for r in rows], "s-", label="busbw = algbw 2(n-1)/n"
        )
    right.set_xscale("log")
    right.set_xlabel("message size S (bytes)")
    right.set_ylabel("GB/s")
    right.set_title("bandwidth (nccl-tests definitions)", fontsize=9)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    return fig


# ---------------------------------------------------------------- helpers
def _extra(report) -> dict:
    return _get(report, "extra")


def _rank(report) -> int:
    return _get(report, "rank")


__all__ = [
    "FIT_BILLIONS",
    "FIT_CONVENTIONS",
    "anatomy_prediction",
    "anatomy_rows",
    "anatomy_totals",
    "anatomy_widget",
    "busbw_analysis",
    "busbw_rows",
    "busbw_sentences",
    "collective_grids",
    "draw_busbw",
    "draw_collectives",
    "draw_fits",
    "fits_table",
    "fits_widget",
    "min_devices",
    "state_bytes_per_device",
    "growth_phrase",
    "value_origins",
    "wire_rows",
]
