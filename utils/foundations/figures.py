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


def fits_widget(billions: float = 7.0):
    """The "does it fit" calculator: parameters, convention, devices -> figure."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    return interactive_figure(
        draw_fits,
        billions=w.FloatLogSlider(
            value=billions, base=10, min=-1, max=3, step=0.05,
            description="params (B)", continuous_update=False,
        ),
        convention=w.Dropdown(
            options=[(c.label, key) for key, c in FIT_CONVENTIONS.items()],
            value="mixed-16", description="convention",
            layout=w.Layout(width="420px"),
        ),
        devices=w.IntSlider(
            value=1, min=1, max=64, description="devices", continuous_update=False
        ),
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
def busbw_rows(reports) -> list[dict[str, float]]:
    """Rank 0's all-reduce measurements: {"bytes", "time_s", "algbw", "busbw"}."""
    return list(_get(_extra(sorted(reports, key=_rank)[0]), "busbw"))


def _fit_label(alpha: float, beta: float) -> str:
    label = f"fit: alpha = {alpha * 1e6:.0f} us"
    return f"{label}, 1/beta = {1 / beta / GB:.2f} GB/s" if beta else label


def draw_busbw(reports) -> Figure:
    """Left: all-reduce time against size, with the fitted alpha-beta model.
    Right: algbw and busbw (nccl-tests' definitions) against size."""
    rows = busbw_rows(reports)
    n = _get(reports[0], "world_size")
    sizes = np.array([r["bytes"] for r in rows], dtype=float)
    times = np.array([r["time_s"] for r in rows])
    fig = InlineFigure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.loglog(sizes, times * 1e6, "o", label="measured (median)")
    if n > 1:
        alpha, beta = fit_alpha_beta(sizes, times, n)
        grid = np.geomspace(sizes.min(), sizes.max(), 50)
        model = [alpha_beta_time(s, n, alpha, beta) * 1e6 for s in grid]
        left.loglog(
            grid,
            model,
            "-",
            label=_fit_label(alpha, beta),
        )
    left.set_xlabel("message size S (bytes)")
    left.set_ylabel("time (us)")
    left.set_title(f"all-reduce on {n} ranks", fontsize=9)
    left.legend(fontsize=8)
    right.semilogx(sizes, [r["algbw"] / GB for r in rows], "o-", label="algbw = S/t")
    right.semilogx(
        sizes, [r["busbw"] / GB for r in rows], "s-", label="busbw = algbw 2(n-1)/n"
    )
    right.set_xlabel("message size S (bytes)")
    right.set_ylabel("GB/s")
    right.set_title("bandwidth (nccl-tests definitions)", fontsize=9)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    return fig


# ---------------------------------------------------------------- helpers
def _extra(report) -> dict:
    return _get(report, "extra")


def _rank(report) -> int:
    return _get(report, "rank")


__all__ = [
    "FIT_CONVENTIONS",
    "anatomy_prediction",
    "anatomy_rows",
    "anatomy_widget",
    "busbw_rows",
    "collective_grids",
    "draw_busbw",
    "draw_collectives",
    "draw_fits",
    "fits_table",
    "fits_widget",
    "min_devices",
    "state_bytes_per_device",
    "value_origins",
]
