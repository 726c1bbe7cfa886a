"""Figures and widgets of chapter 2, "ZeRO".

Pure functions compute what to draw from the lab's reports (``labs.zero``) or from
the analytic model (``utils.memory_model``); drawing functions return a new
:class:`matplotlib.figure.Figure` (no pyplot state); the widgets only wire controls
to them through ``utils.widgets.interactive_figure``. Nothing here runs a lab.

* :func:`paper_table`: the ZeRO paper's per-device figures, recomputed.
* :func:`draw_explorer` / :func:`explorer_widget`: model states per rank for any
  size, world size, stage and bytes-per-parameter convention, beside the lab's
  measured bars.
* :func:`stage3_events` / :func:`draw_stage3_timeline`: stage 3's memory after
  every gather, free and reduce-scatter.
* :func:`beyond_formula_rows` / :func:`draw_beyond_formula`: what the measured
  peak holds that the model-state formula leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.patches import Patch

from utils.hardware import GB
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    PAPER_EXAMPLES,
    convention_state_bytes,
    model_state_bytes,
)
from utils.plots import CATEGORY_COLORS, InlineFigure, byte_scale
from utils.report import CATEGORIES
from utils.report import field_of as _get

STATES = ("params", "grads", "optimizer")
STAGE_NAMES = {
    0: "stage 0 (DP)",
    1: "stage 1 (P_os)",
    2: "stage 2 (P_os+g)",
    3: "stage 3 (P_os+g+p)",
}
"""The stages as the paper names them (section 5): P_os, P_os+g, P_os+g+p."""
EXPLORER_CONVENTIONS = ("mixed-16", "mixed-18", "mixed-20")
"""The bytes-per-parameter choices of the explorer (labels and sources live in
``utils.memory_model.BYTES_PER_PARAM_CONVENTIONS``)."""
GPU_GB = 80
"""The line drawn in the explorer: an 80 GB device (A100 80GB, H100 SXM)."""
MAX_BARS = 8


def count_label(n: float) -> str:
    """7.5e9 -> "7.5B", 1e12 -> "1T", 53440 -> "53,440"."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{round(n):,}"


# ------------------------------------------------------------ the paper's table
def paper_table() -> list[dict[str, Any]]:
    """Each figure the ZeRO paper prints for its 7.5B model, beside the formula.

    Rows: {"source", "world_size", "stage", "printed_gb", "formula_gb",
    "rounded_gb", "agrees"}; ``rounded_gb`` is ``model_state_bytes`` in GB (1e9)
    rounded half up to the digits the paper prints, ``agrees`` whether it equals the
    printed number.
    """
    return [
        {
            "source": e.source,
            "world_size": e.world_size,
            "stage": e.zero_stage,
            "printed_gb": e.printed_gb,
            "formula_gb": e.exact_gb(),
            "rounded_gb": e.rounded_gb(),
            "agrees": e.rounded_gb() == e.printed_gb,
        }
        for e in PAPER_EXAMPLES
    ]


def paper_table_markdown(rows: Sequence[Mapping] | None = None) -> str:
    """Table 1 of the paper (7.5B model) as Markdown: printed / recomputed GB."""
    rows = [r for r in (rows or paper_table()) if "Table 1" in r["source"]]
    sizes = sorted({r["world_size"] for r in rows})
    cell = {(r["world_size"], r["stage"]): r for r in rows}
    head = "| $N_d$ | " + " | ".join(STAGE_NAMES[s] for s in (1, 2, 3)) + " |"
    lines = [head, "|---:|---:|---:|---:|"]
    for n in sizes:
        cells = []
        for s in (1, 2, 3):
            r = cell[(n, s)]
            mark = "" if r["agrees"] else " **differs**"
            cells.append(f"{r['printed_gb']:g} / {r['formula_gb']:.4g}{mark}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------- explorer
def explorer_bars(
    num_params: int, world_size: int, stage: int, convention: str = "mixed-16"
) -> dict[str, int]:
    """Model-state bytes of every rank (all ranks alike) by category."""
    return convention_state_bytes(
        convention, int(num_params), world_size=int(world_size), zero_stage=stage
    ).as_dict()


def measured_after_step(report) -> dict[str, int]:
    """A rank's bytes by category at the last "step" mark (after the update)."""
    entries = [m for m in _get(report, "memory") if m["phase"] == "step"]
    if not entries:
        raise ValueError("the report has no 'step' phase (was memory tracked?)")
    return dict(entries[-1]["current"])


def _stack(ax, x, values: Mapping[str, float], width, hatch=None):
    bottom = 0.0
    for cat in CATEGORIES:
        v = values.get(cat, 0)
        if hatch:
            ax.bar(
                x,
                v,
                width,
                bottom=bottom,
                facecolor="white",
                edgecolor=CATEGORY_COLORS[cat],
                hatch=hatch,
            )
        else:
            ax.bar(x, v, width, bottom=bottom, color=CATEGORY_COLORS[cat])
        bottom += v
    return bottom


def draw_explorer(
    num_params: float = 7.5e9,
    world_size: int = 64,
    stage: int = 3,
    convention: str = "mixed-16",
    measured: Mapping[int, Sequence[Any]] | None = None,
):
    """Left: the formula's bytes per rank (one bar per rank, at most 8 shown) and an
    80 GB line. Right (with ``measured``, stage -> the lab's reports): each rank's
    measured bytes after the step beside the formula for the lab's model."""
    bars = explorer_bars(round(num_params), world_size, stage, convention)
    conv = BYTES_PER_PARAM_CONVENTIONS[convention]
    reports = list((measured or {}).get(stage, []))
    fig = InlineFigure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, 2 if reports else 1, squeeze=False)[0]
    ax = axes[0]
    shown = min(world_size, MAX_BARS)
    scaled = {c: v / GB for c, v in bars.items()}
    for x in range(shown):
        top = _stack(ax, x, scaled, 0.6)
    ax.axhline(GPU_GB, color="black", linestyle="--", linewidth=1)
    ax.text(
        shown - 0.5, GPU_GB, f"{GPU_GB} GB device ", va="bottom", ha="right", fontsize=8
    )
    ax.set_ylim(0, 1.15 * max(top, GPU_GB))
    ax.set_xticks(range(shown), [f"rank {r}" for r in range(shown)], fontsize=7)
    if world_size > shown:
        ax.set_xlabel(f"{shown} of {world_size:,} ranks shown (all alike)", fontsize=8)
    ax.set_ylabel("GB per rank (10^9 bytes)")
    ax.set_title(
        f"formula: {count_label(num_params)} params, N={world_size:,}, "
        f"{STAGE_NAMES[stage]}\n{conv.label}\n= {top:,.4g} GB per rank",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    if reports:
        _draw_measured(axes[1], reports, stage)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    handles.append(
        Patch(
            facecolor="white",
            edgecolor="black",
            hatch="///",
            label="formula (lab model)",
        )
    )
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    return fig


def _draw_measured(ax, reports, stage: int) -> None:
    ranks = sorted(reports, key=lambda r: _get(r, "rank"))
    cfg = _get(_get(ranks[0], "extra"), "config")
    n, psi = _get(ranks[0], "world_size"), _get(ranks[0], "num_params")
    formula = model_state_bytes(
        psi, world_size=n, zero_stage=stage, mixed_precision=cfg["precision"] == "mixed"
    ).as_dict()
    values = [measured_after_step(r) for r in ranks]
    top = max(sum(v.values()) for v in values + [formula])
    scale, unit = byte_scale(top)
    for x, v in enumerate(values):
        _stack(ax, x - 0.2, {c: b / scale for c, b in v.items()}, 0.38)
        _stack(ax, x + 0.2, {c: b / scale for c, b in formula.items()}, 0.38, "///")
    ax.set_xticks(
        range(len(ranks)), [f"rank {_get(r, 'rank')}" for r in ranks], fontsize=7
    )
    ax.set_ylabel(f"after the step ({unit})")
    ax.set_title(
        f"measured: the lab's GPT, {psi:,} params, N={n}\n"
        f"{cfg['precision']} precision, {cfg['impl']}, {STAGE_NAMES[stage]}\n"
        "after the step, beside its formula (hatched)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)


def explorer_widget(measured: Mapping[int, Sequence[Any]] | None = None):
    """The explorer: parameters (up to 10 trillion), world size, stage, convention."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    def draw(num_params, world_size, stage, convention):
        return draw_explorer(num_params, world_size, stage, convention, measured)

    return interactive_figure(
        draw,
        num_params=w.FloatLogSlider(
            value=7.5e9,
            base=10,
            min=6,
            max=13,
            step=0.05,
            description="parameters",
            readout_format=".3g",
        ),
        world_size=w.SelectionSlider(
            options=[2**k for k in range(13)], value=64, description="world size N"
        ),
        stage=w.ToggleButtons(
            options=[(STAGE_NAMES[s], s) for s in range(4)],
            value=3,
            description="stage",
        ),
        convention=w.Dropdown(
            options=[
                (BYTES_PER_PARAM_CONVENTIONS[k].label, k) for k in EXPLORER_CONVENTIONS
            ],
            value="mixed-16",
            description="bytes/param",
            layout=w.Layout(width="460px"),
        ),
    )


# ------------------------------------------------------------- stage 3 timeline
def stage3_events(report, step: int = -1) -> list[dict[str, Any]]:
    """The gathers, frees and reduce-scatters of one step (``-1``: the last), each
    {"label", "phase", "current": {category: bytes}} after the event."""
    events = _get(_get(report, "extra"), "events") or []
    steps = sorted({e["step"] for e in events})
    if not steps:
        raise ValueError("no stage-3 events: run the scratch stage 3 with memory on")
    chosen = steps[step] if step < 0 else step
    return [
        {
            "label": f"{e['event']} {e['unit'] or 'root'}",
            "phase": e["phase"],
            "current": e["current"],
        }
        for e in events
        if e["step"] == chosen
    ]


def draw_stage3_timeline(reports: Sequence[Any], rank: int = 0, step: int = -1):
    """One rank's memory by category after each stage-3 event of one step."""
    report = next(r for r in reports if _get(r, "rank") == rank)
    events = stage3_events(report, step)
    top = max(sum(e["current"].values()) for e in events)
    scale, unit = byte_scale(top)
    fig = InlineFigure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for x, e in enumerate(events):
        _stack(ax, x, {c: b / scale for c, b in e["current"].items()}, 0.8)
    backward = [x for x, e in enumerate(events) if e["phase"] == "backward"]
    if backward:
        ax.axvspan(backward[0] - 0.5, len(events) - 0.5, color="#eeeeee", zorder=0)
        ax.text(backward[0], top / scale * 1.02, "backward", fontsize=8)
        ax.text(0, top / scale * 1.02, "forward", fontsize=8)
    ax.set_xticks(
        range(len(events)),
        [e["label"] for e in events],
        rotation=60,
        ha="right",
        fontsize=7,
    )
    ax.set_ylim(0, top / scale * 1.12)
    ax.set_ylabel(f"rank {rank} ({unit})")
    ax.set_title(
        f"Stage 3, rank {rank}: memory after each gather, free and "
        "reduce-scatter of one step",
        fontsize=9,
    )
    ax.legend(
        handles=[Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    ax.grid(axis="y", alpha=0.3)
    return fig


def stage3_timeline_widget(reports: Sequence[Any]):
    """:func:`draw_stage3_timeline` with a rank dropdown (switchable in the book)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    ranks = sorted(_get(r, "rank") for r in reports)
    return interactive_figure(
        lambda rank: draw_stage3_timeline(reports, rank),
        prerender=True,
        rank=w.Dropdown(options=[(f"rank {r}", r) for r in ranks], description="rank"),
    )


# ----------------------------------------------------------- beyond the formula
def beyond_formula_rows(runs: Mapping[int, Sequence[Any]]) -> list[dict[str, Any]]:
    """Per stage (rank 0): the formula's model states, the measured ones after the
    step, and the run's peak by category; on CUDA also the allocator's excess.

    ``runs``: stage -> the lab's reports. Rows: {"stage", "formula", "states",
    "peak": {category: bytes}, "peak_total", "peak_phase", "ratio",
    "allocator_excess"} (``ratio`` = peak_total / formula).
    """
    rows = []
    for stage, reports in sorted(runs.items()):
        r0 = min(reports, key=lambda r: _get(r, "rank"))
        predicted = _get(_get(r0, "extra"), "predicted")
        formula = sum(predicted[c] for c in STATES)
        memory = _get(r0, "memory")
        top = max(memory, key=lambda m: m["peak_total"])
        alloc = top.get("allocator")
        excess = alloc["peak"] - sum(top["ledger"]["peak"].values()) if alloc else 0
        after = measured_after_step(r0)
        rows.append(
            {
                "stage": stage,
                "formula": formula,
                "states": sum(after[c] for c in STATES),
                "peak": dict(top["peak"]),
                "peak_total": top["peak_total"],
                "peak_phase": f"the {top['phase']} of step {top['step']}",
                "ratio": top["peak_total"] / formula,
                "allocator_excess": max(0, excess),
            }
        )
    return rows


def draw_beyond_formula(rows: Sequence[Mapping[str, Any]]):
    """Per stage: the measured peak stacked by category beside the formula."""
    top = max(max(r["peak_total"], r["formula"]) for r in rows)
    scale, unit = byte_scale(top)
    fig = InlineFigure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for x, r in enumerate(rows):
        height = _stack(ax, x - 0.2, {c: b / scale for c, b in r["peak"].items()}, 0.38)
        ax.bar(
            x + 0.2,
            r["formula"] / scale,
            0.38,
            facecolor="white",
            edgecolor="black",
            hatch="///",
        )
        ax.annotate(
            f"{r['ratio']:.1f}x",
            (x - 0.2, height),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(
        range(len(rows)), [STAGE_NAMES[r["stage"]].replace(" (", "\n(") for r in rows]
    )
    ax.set_ylabel(f"rank 0 ({unit})")
    ax.set_title(
        "Measured peak (left, by category) against the model-state formula "
        "(right, hatched)",
        fontsize=9,
    )
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    handles.append(
        Patch(
            facecolor="white",
            edgecolor="black",
            hatch="///",
            label="formula: params + grads + optimizer",
        )
    )
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return fig
