"""What the memory widgets draw: pure functions over lab reports, and the figures.

Introduced in chapter 0 ("Why one device is not enough"); every lab chapter uses it
through :mod:`utils.widgets`. Two layers, both without a display or a kernel:

* pure functions that turn the per-rank reports (:class:`utils.report.RankReport`,
  or the dicts that ``to_dict``/JSON give) into numbers: :func:`phases`,
  :func:`memory_bars`, :func:`timeline_series`, :func:`predicted_per_rank`;
* drawing functions that return a new :class:`InlineFigure` (a matplotlib Figure
  that displays as a PNG), built without pyplot so no global figure state is
  created or leaked and nothing needs closing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from utils.report import CATEGORIES, format_bytes
from utils.report import field_of as _get

KINDS = ("current", "peak")
"""What a memory phase records: bytes live at its end, and the most seen during it."""

CATEGORY_COLORS = {
    "params": "#4c72b0",
    "grads": "#dd8452",
    "optimizer": "#55a868",
    "activations": "#c44e52",
    "other": "#8c8c8c",
}
"""One fixed colour per category, the same in every figure of the course."""

FIGURE_DPI = 100
"""Resolution of every PNG the course saves (~50 KiB for a 7x4 inch figure)."""

HEADROOM = 1.15
"""The y axis of a bar chart with totals above the bars reaches this times the
tallest bar: room for a label line between the bars and the title."""

RANK_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"),
               ("P", "--"), ("X", ":"), ("*", "-."))  # fmt: skip
"""Marker and line style of the i-th rank's line, ranks in order:
``RANK_STYLES[i % 8]``."""

RANK_DODGE = 0.3
"""The most that the ranks' lines of a timeline are nudged apart sideways, in
phases (rank 0 leftmost), so ranks with equal values stay visible side by side."""


def figure_png(fig: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes: what the book stores and shows."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


class InlineFigure(Figure):
    """A Figure that shows itself as a PNG when it is a cell's result.

    A bare :class:`~matplotlib.figure.Figure` made without pyplot displays as text
    ("<Figure size ...>") in a notebook; this one displays as the image, in
    JupyterLab, in VS Code, in Colab and in the executed book alike.
    """

    def _repr_png_(self) -> bytes:
        return figure_png(self)


STACK_STYLES = ("solid", "outline", "hatched")
"""How :func:`stack_bars` draws a category's segment: filled in its colour
(measured); white with its colour as edge and hatch (a formula, a prediction);
filled with white hatching (chapter 3's host pool beside the solid device)."""


def stack_bars(
    ax,
    x,
    values: Mapping[str, Any],
    width: float,
    *,
    style: str = "solid",
    hatch: str = "///",
    **bar_kwargs,
):
    """Bars stacked by category on ``ax``, bottom to top in ``CATEGORIES`` order,
    each segment in the category's colour (:data:`CATEGORY_COLORS`); returns the
    tops (a number, or a list when ``x`` is a sequence).

    ``x``: a position, or a sequence of positions; ``values``: category -> a
    height, or a sequence of heights (one per position); a missing category is 0.
    ``style``: one of :data:`STACK_STYLES`; ``hatch`` its pattern where it has one;
    ``bar_kwargs`` go to every ``ax.bar`` call and win over the style's (``alpha``,
    ``edgecolor``, ``linewidth``, ...).
    """
    if style not in STACK_STYLES:
        raise ValueError(f"style must be one of {STACK_STYLES}, got {style!r}")
    many = hasattr(x, "__len__") and not isinstance(x, str)
    bottom: Any = [0.0] * len(x) if many else 0.0
    for cat in CATEGORIES:
        color = CATEGORY_COLORS[cat]
        looks = {
            "solid": dict(color=color),
            "outline": dict(facecolor="white", edgecolor=color, hatch=hatch),
            "hatched": dict(color=color, hatch=hatch, edgecolor="white"),
        }[style]
        height = values.get(cat, [0.0] * len(x) if many else 0)
        ax.bar(x, height, width, bottom=bottom, **{**looks, **bar_kwargs})
        if many:
            bottom = [b + h for b, h in zip(bottom, height)]
        else:
            bottom += height
    return bottom


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def byte_scale(max_bytes: float) -> tuple[int, str]:
    """The divisor and unit for an axis whose largest value is ``max_bytes``."""
    scale, unit = 1, _UNITS[0]
    for unit in _UNITS:
        if max_bytes < 1024 * scale or unit == _UNITS[-1]:
            break
        scale *= 1024
    return scale, unit


def _by_rank(reports: Sequence[Any]) -> list[Any]:
    """Reports sorted by rank; loud if empty or if two share a rank."""
    if not reports:
        raise ValueError("no reports to draw")
    ordered = sorted(reports, key=lambda r: _get(r, "rank"))
    ranks = [_get(r, "rank") for r in ordered]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"two reports share a rank: ranks {ranks}")
    return ordered


def _labels(memory: Sequence[Mapping]) -> list[str]:
    """A unique label per phase entry: "forward (step 1)", or "init" if step is None."""
    labels: list[str] = []
    for entry in memory:
        step = entry.get("step")
        label = entry["phase"] if step is None else f"{entry['phase']} (step {step})"
        base, n = label, 2
        while label in labels:  # the same phase recorded twice in one step
            label, n = f"{base} #{n}", n + 1
        labels.append(label)
    return labels


def phases(reports: Sequence[Any]) -> list[str]:
    """The phase labels of all ranks, in recorded order (rank 0's first)."""
    seen: list[str] = []
    for report in _by_rank(reports):
        seen += [lbl for lbl in _labels(_get(report, "memory")) if lbl not in seen]
    return seen


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _categories(values: Mapping[str, int], where: str) -> dict[str, int]:
    unknown = set(values) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"{where}: unknown memory categories {sorted(unknown)}")
    return {cat: int(values.get(cat, 0)) for cat in CATEGORIES}


def _phase_of(reports: Sequence[Any], phase: str | int) -> str:
    names = phases(reports)
    if isinstance(phase, int):
        return names[phase]
    if phase not in names:
        raise ValueError(f"no rank recorded phase {phase!r}; phases are {names}")
    return phase


def memory_bars(
    reports: Sequence[Any], phase: str | int, kind: str = "current"
) -> dict[str, list[int]]:
    """Bytes per category, one value per rank (rank order), at one phase.

    ``phase`` is a label from :func:`phases` or an index into it (``-1``: the last).
    A rank that did not record that phase counts 0 bytes.
    """
    _check_kind(kind)
    label = _phase_of(reports, phase)
    bars: dict[str, list[int]] = {cat: [] for cat in CATEGORIES}
    for report in _by_rank(reports):
        entries = dict(zip(_labels(_get(report, "memory")), _get(report, "memory")))
        entry = entries.get(label)
        where = f"rank {_get(report, 'rank')}"
        values = _categories(entry[kind], where) if entry else {}
        for cat in CATEGORIES:
            bars[cat].append(values.get(cat, 0))
    return bars


def timeline_series(
    reports: Sequence[Any], kind: str = "current"
) -> dict[int, dict[str, list[int | None]]]:
    """``rank -> {category or "total": bytes at each phase of phases(reports)}``.

    A phase a rank did not record is ``None`` (drawn as a gap, not as zero).
    """
    _check_kind(kind)
    names = phases(reports)
    series: dict[int, dict[str, list[int | None]]] = {}
    for report in _by_rank(reports):
        rank = _get(report, "rank")
        entries = dict(zip(_labels(_get(report, "memory")), _get(report, "memory")))
        rows: dict[str, list[int | None]] = {cat: [] for cat in (*CATEGORIES, "total")}
        for name in names:
            entry = entries.get(name)
            values = _categories(entry[kind], f"rank {rank}") if entry else None
            for cat in CATEGORIES:
                rows[cat].append(values[cat] if values else None)
            rows["total"].append(sum(values.values()) if values else None)
        series[rank] = rows
    return series


def predicted_per_rank(predicted: Any, world_size: int) -> list[dict[str, int]] | None:
    """The analytic prediction as one ``{category: bytes}`` per rank.

    Accepts ``None``; an object with int attributes ``params``, ``grads``,
    ``optimizer`` (e.g. :class:`utils.memory.ModelStateBytes`); a dict category ->
    bytes; or a list of either, one per rank. A single value applies to every rank.
    Only the categories it names are returned (a ``total`` is ignored).
    """
    if predicted is None:
        return None
    if isinstance(predicted, Sequence) and not isinstance(predicted, (str, Mapping)):
        if len(predicted) != world_size:
            raise ValueError(
                f"{len(predicted)} predictions for {world_size} ranks: give one each"
            )
        return [_one_prediction(p) for p in predicted]
    return [_one_prediction(predicted)] * world_size


def _one_prediction(value: Any) -> dict[str, int]:
    if isinstance(value, Mapping):
        values = {k: v for k, v in value.items() if k != "total"}
        _categories(values, "prediction")
        return {k: int(v) for k, v in values.items()}
    found = {cat: int(getattr(value, cat)) for cat in CATEGORIES if hasattr(value, cat)}
    if not found:
        raise TypeError(f"a prediction needs params/grads/optimizer bytes: {value!r}")
    return found


def _legend_handles(predicted: bool) -> list[Patch]:
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    if predicted:
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch="///",
                label="predicted (analytic)",
            )
        )
    return handles


def plot_memory_per_rank(
    reports: Sequence[Any],
    phase: str | int = -1,
    kind: str = "current",
    predicted: Any = None,
) -> Figure:
    """One stacked bar per rank by category at ``phase``; beside each, hatched, the
    analytic prediction (see :func:`predicted_per_rank` for what it accepts)."""
    bars = memory_bars(reports, phase, kind)
    label = _phase_of(reports, phase)
    ranks = [_get(r, "rank") for r in _by_rank(reports)]
    pred = predicted_per_rank(predicted, len(ranks))
    totals = [sum(bars[c][i] for c in CATEGORIES) for i in range(len(ranks))]
    pred_totals = [sum(p.values()) for p in pred] if pred else [0]
    scale, unit = byte_scale(max(totals + pred_totals))

    fig = InlineFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38 if pred else 0.6
    offset = width / 2 if pred else 0.0
    xs = list(range(len(ranks)))
    measured = {c: [b / scale for b in bars[c]] for c in CATEGORIES}
    stack_bars(ax, [x - offset for x in xs], measured, width)
    for x, total in zip(xs, totals):
        ax.annotate(
            format_bytes(total),
            (x - offset, total / scale),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    if pred:
        formula = {c: [p.get(c, 0) / scale for p in pred] for c in CATEGORIES}
        stack_bars(ax, [x + offset for x in xs], formula, width, style="outline")
    # Head room for the totals printed above the bars, so they stay inside the axes
    # and clear of the title. Set explicitly: ``ax.margins`` does not work here,
    # since a category with no bytes stacks a zero-height bar on top of each
    # column, whose sticky edge pins the autoscaled top to the tallest total.
    ax.set_ylim(0, HEADROOM * max(totals + pred_totals) / scale or 1)
    ax.set_xticks(xs, [f"rank {r}" for r in ranks])
    ax.set_ylabel(f"{kind} memory ({unit})")
    ax.set_title(f"{kind.capitalize()} memory per rank: {label}")
    ax.legend(
        handles=_legend_handles(pred is not None),
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    ax.grid(axis="y", alpha=0.3)
    return fig


def rank_offsets(n: int) -> list[float]:
    """How far (in phases) each of ``n`` ranks' timeline lines is nudged sideways:
    evenly spread over at most :data:`RANK_DODGE`, centred on the phase."""
    if n < 2:
        return [0.0] * n
    step = min(0.15, RANK_DODGE / (n - 1))
    return [(i - (n - 1) / 2) * step for i in range(n)]


def plot_memory_timeline(
    reports: Sequence[Any], kind: str = "current", rank: int = 0
) -> Figure:
    """Top: each rank's total memory over the phases, one line per rank, nudged
    apart sideways (:func:`rank_offsets`) so equal ranks do not hide one another.
    Bottom: ``rank``'s memory stacked by category at each phase."""
    names = phases(reports)
    series = timeline_series(reports, kind)
    if rank not in series:
        raise ValueError(f"no report from rank {rank}; ranks are {sorted(series)}")
    peak = max(
        (v for s in series.values() for v in s["total"] if v is not None), default=0
    )
    scale, unit = byte_scale(peak)
    xs = list(range(len(names)))

    fig = InlineFigure(figsize=(8, 6), layout="constrained")
    top, bottom_ax = fig.subplots(2, 1, sharex=True)
    # Ranks often hold the same bytes (data parallelism replicates everything), and
    # equal lines drawn on one another would show only the last rank. So each rank
    # has its own marker and line style and sits slightly to the side: the values
    # stay exact, and every rank is visible.
    shifts = rank_offsets(len(series))
    for i, (r, rows) in enumerate(series.items()):
        ys = [float("nan") if v is None else v / scale for v in rows["total"]]
        marker, style = RANK_STYLES[i % len(RANK_STYLES)]
        top.plot(
            [x + shifts[i] for x in xs],
            ys,
            marker=marker,
            linestyle=style,
            markersize=6,
            label=f"rank {r}",
        )
    top.set_ylim(bottom=0)
    top.set_ylabel(f"total ({unit})")
    top.set_title(f"{kind.capitalize()} memory over the run")
    legend = top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    if len(series) > 1:
        legend.set_title("ranks side by side\nat each phase", prop={"size": 8})
    top.grid(alpha=0.3)

    base = [0.0] * len(names)
    for cat in CATEGORIES:
        heights = [(v or 0) / scale for v in series[rank][cat]]
        bottom_ax.bar(
            xs, heights, 0.7, bottom=base, color=CATEGORY_COLORS[cat], label=cat
        )
        base = [b + h for b, h in zip(base, heights)]
    bottom_ax.set_ylabel(f"rank {rank} ({unit})")
    bottom_ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    bottom_ax.legend(
        handles=_legend_handles(False),
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    bottom_ax.grid(axis="y", alpha=0.3)
    return fig
