"""Figures and widgets of chapter 5, "Pipeline parallelism".

Pure functions turn a schedule's timeline into rows, from either source: the
discrete-event model (``check.simulate``, modelled, times in units of one forward)
or the lab's recorded actions (``labs.pipeline_parallel``, measured, seconds from
each rank's start of the step). Drawing functions return a new figure (no pyplot
state); the widget only wires controls to them through
``utils.widgets.interactive_figure``. Nothing here runs a lab. Figures are 6.4
inches wide or less, so they stay legible on a phone.

* :func:`timeline_rows` / :func:`timeline_stats` / :func:`draw_gantt`: a Gantt
  chart per rank, F, B and W coloured, idle time hatched, from a simulation, the
  lab's reports or hand-made rows; :func:`draw_schedule` for a simulated schedule.
* :func:`recorded_figure` / :func:`gantt_widget`: a recorded run drawn above the
  model of the same lists, and a (schedule, p, m) control over recorded runs,
  every combination prerendered so it works in the static book.
* :func:`bubble_rows` / :func:`draw_bubble_vs_m`: the measured bubble against the
  papers' formula as the number of micro-batches grows.
* :func:`activation_rows` / :func:`draw_activation_peaks`: measured peak
  activation memory per rank, GPipe against 1F1B, interleaved and ZB-H1.
* :func:`p2p_rows`: bytes sent between stages, counted, beside ``b s h`` per
  message (modelled); :func:`markdown_table` for any of these rows.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from utils.pipeline_parallel.check import Simulation, expected_bubble, simulate
from utils.pipeline_parallel.schedules import KINDS, SCHEDULES, Action, parse
from utils.plots import InlineFigure, byte_scale
from utils.report import field_of as _get

WIDTH = 6.4  # inches: every figure of the chapter
KIND_COLORS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}
"""Forward, backward (input gradient in ZB-H1) and weight-gradient passes."""
IDLE_COLOR = "#bbbbbb"
SCHEDULE_LABELS = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved": "interleaved 1F1B",
    "zb1p": "ZB-H1",
}
SCHEDULE_STYLES = {"gpipe": "o-", "1f1b": "s--", "interleaved": "^-.", "zb1p": "D:"}
SCHEDULE_COLORS = {
    "gpipe": "#4c72b0",
    "1f1b": "#dd8452",
    "interleaved": "#55a868",
    "zb1p": "#c44e52",
}


def lab_times(schedule: str, v: int = 1) -> dict[str, float]:
    """The durations the lab's ``--uniform-compute`` gives, in units of a whole
    stage's forward: F = 1, B = 2 (ZB-H1: F = B = W = 1; an interleaved chunk
    ``1/v`` of those). ``check.expected_bubble`` takes per-chunk times."""
    if schedule == "zb1p":
        return {"F": 1.0, "B": 1.0, "W": 1.0}
    return {"F": 1.0 / v, "B": 2.0 / v}


# ------------------------------------------------------------------ timelines
def _row(kind, stage, micro, start, end, where) -> dict:
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    start, end = float(start), float(end)
    if not 0 <= start <= end:
        raise ValueError(f"{where}: needs 0 <= start <= end, got {start}, {end}")
    action = str(Action(kind, int(stage), int(micro)))
    return dict(
        action=action,
        kind=kind,
        stage=int(stage),
        micro=int(micro),
        start=start,
        end=end,
    )


def _is_report(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and "extra" in obj) or hasattr(obj, "extra")


def pipeline_reports(reports: Sequence[Any], dp_rank: int = 0) -> list[Any]:
    """The reports of one pipeline (data-parallel replica ``dp_rank``), first
    stage first."""
    mine = [r for r in reports if _get(_get(r, "extra"), "dp_rank") == dp_rank]
    if not mine:
        raise ValueError(f"no report of pipeline dp_rank={dp_rank}")
    return sorted(mine, key=lambda r: _get(_get(r, "extra"), "pp_rank"))


def timeline_rows(source: Any, step: int = -1, dp_rank: int = 0) -> list[list[dict]]:
    """Per rank, its actions in order as ``{"action", "kind", "stage", "micro",
    "start", "end"}``, from any of:

    * a :class:`~utils.pipeline_parallel.check.Simulation` (modelled);
    * the lab's reports (measured): step ``step`` of pipeline ``dp_rank``, each
      rank's ``extra.actions``, seconds from its own start of the step;
    * hand-made rows: per rank, a list of such dicts, or of ``(action, start,
      end)`` with ``action`` an ``Action`` or its text (``"0F1"``).
    """
    if isinstance(source, Simulation):
        return [
            [_row(*a, s, e, f"rank {r}") for a, s, e in row]
            for r, row in enumerate(source.spans)
        ]
    source = list(source)
    if not source:
        raise ValueError("no ranks to draw")
    if _is_report(source[0]):
        out = []
        for r in pipeline_reports(source, dp_rank):
            steps = _get(_get(r, "extra"), "actions")
            if not steps:
                raise ValueError(f"rank {_get(r, 'rank')} recorded no actions")
            out.append(timeline_rows([steps[step]])[0])
        return out
    out = []
    for rank, row in enumerate(source):
        rows = []
        for i, item in enumerate(row):
            where = f"rank {rank}, item {i}"
            if isinstance(item, Mapping):
                rows.append(
                    _row(
                        item["kind"],
                        item["stage"],
                        item["micro"],
                        item["start"],
                        item["end"],
                        where,
                    )
                )
                continue
            try:
                if isinstance(item, str):
                    raise TypeError
                action, start, end = item
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: {item!r} is neither a dict nor (action, start, end)"
                ) from None
            if isinstance(action, str):
                (action,) = parse(action)
            rows.append(_row(*action, start, end, where))
        out.append(rows)
    return out


def idle_spans(row: Sequence[Mapping], end: float) -> list[tuple[float, float]]:
    """The gaps of one rank's row between 0 and ``end``: its share of the bubble."""
    gaps, t = [], 0.0
    for a in sorted(row, key=lambda a: a["start"]):
        if a["start"] > t:
            gaps.append((t, a["start"]))
        t = max(t, a["end"])
    if end > t:
        gaps.append((t, end))
    return gaps


def timeline_stats(rows: Sequence[Sequence[Mapping]]) -> dict:
    """Makespan (the last end over all ranks), busy and idle time per rank, and the
    bubble: idle over ``p x makespan`` ("of the step", ``Simulation.bubble``) and
    idle over busy ("of ideal", ``Simulation.bubble_of_ideal``)."""
    makespan = max((a["end"] for row in rows for a in row), default=0.0)
    busy = [sum(a["end"] - a["start"] for a in row) for row in rows]
    idle = [makespan - b for b in busy]
    total = len(rows) * makespan
    return dict(
        makespan=makespan,
        busy=busy,
        idle=idle,
        bubble=sum(idle) / total if total else 0.0,
        bubble_of_ideal=sum(idle) / sum(busy) if sum(busy) else 0.0,
        bubble_per_rank=[i / makespan if makespan else 0.0 for i in idle],
    )


def _tint(color: str, chunk: int) -> tuple:
    """``color`` for model chunk 0, lighter for each later chunk."""
    h, lightness, s = colorsys.rgb_to_hls(*to_rgb(color))
    return colorsys.hls_to_rgb(h, min(0.9, lightness + 0.22 * chunk), s)


def _draw_lanes(ax, rows, p: int, scale: float, makespan: float) -> None:
    for rank, row in enumerate(rows):
        gaps = [(s * scale, (e - s) * scale) for s, e in idle_spans(row, makespan)]
        ax.broken_barh(
            gaps,
            (rank, 0.8),
            facecolors="white",
            edgecolors=IDLE_COLOR,
            hatch="////",
            linewidth=0,
        )
        bars: dict[tuple, list] = {}  # one collection per colour: fast to draw
        for a in row:
            color = _tint(KIND_COLORS[a["kind"]], a["stage"] // p)
            width = (a["end"] - a["start"]) * scale
            bars.setdefault(color, []).append((a["start"] * scale, width))
            if width >= makespan * scale / 55:
                ax.text(
                    (a["start"] * scale) + width / 2,
                    rank + 0.4,
                    a["micro"],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                    clip_on=True,
                )
        for color, spans in bars.items():
            ax.broken_barh(
                spans, (rank, 0.8), facecolors=color, edgecolors="white", linewidth=0.5
            )
    ax.set_yticks(
        [r + 0.4 for r in range(len(rows))],
        [f"rank {r}" for r in range(len(rows))],
        fontsize=8,
    )
    ax.set_ylim(len(rows), -0.2)
    ax.set_xlim(0, makespan * scale * 1.01 if makespan else 1)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def _legend(fig, kinds: set, chunks: int) -> None:
    handles = [Patch(color=KIND_COLORS[k], label=k) for k in KINDS if k in kinds]
    if chunks > 1:
        handles.append(Patch(color=_tint(KIND_COLORS["F"], 1), label="chunk 1 (F)"))
    handles.append(
        Patch(facecolor="white", edgecolor=IDLE_COLOR, hatch="////", label="idle")
    )
    fig.legend(
        handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8
    )


def draw_gantt(
    panels: Mapping[str, Sequence[Sequence[Mapping]]],
    *,
    unit: str = "ms",
    p: int | None = None,
) -> InlineFigure:
    """One panel per entry of ``panels`` (title -> :func:`timeline_rows`), one lane
    per rank: F, B and W coloured (a later model chunk lighter), idle hatched,
    each action labelled with its micro-batch. ``unit``: "ms" for measured rows
    (seconds, drawn in ms), anything else is printed as given (simulated rows are
    in units of one forward). All panels share the time axis."""
    if not panels:
        raise ValueError("draw_gantt needs at least one panel")
    scale = 1e3 if unit == "ms" else 1.0
    heights = [0.35 * len(rows) + 0.6 for rows in panels.values()]
    fig = InlineFigure(figsize=(WIDTH, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(
        len(panels), 1, sharex=True, squeeze=False, height_ratios=heights
    )[:, 0]
    end = max(timeline_stats(rows)["makespan"] for rows in panels.values())
    kinds, chunks = set(), 1
    for ax, (title, rows) in zip(axes, panels.items()):
        n = p or len(rows)
        _draw_lanes(ax, rows, n, scale, end)
        ax.set_title(title, fontsize=9)
        kinds |= {a["kind"] for row in rows for a in row}
        chunks = max([chunks] + [a["stage"] // n + 1 for row in rows for a in row])
    axes[-1].set_xlabel(
        "ms since the step started (each rank's own clock)" if unit == "ms" else unit,
        fontsize=8,
    )
    _legend(fig, kinds, chunks)
    return fig


def _title(schedule: str, p: int, m: int, v: int, stats: dict, how: str) -> str:
    chunks = f", v={v}" if v > 1 else ""
    return (
        f"{SCHEDULE_LABELS.get(schedule, schedule)}, p={p}, m={m}{chunks} ({how}): "
        f"bubble {stats['bubble']:.1%} of the step"
    )


def draw_schedule(
    schedule: str,
    p: int,
    m: int,
    v: int = 1,
    times: Mapping[str, float] | None = None,
) -> InlineFigure:
    """The modelled timeline of one schedule (``check.simulate``, no communication
    time), in units of one whole stage's forward; ``times`` defaults to
    :func:`lab_times`."""
    sim = simulate(p, m, v, SCHEDULES[schedule], times or lab_times(schedule, v))
    rows = timeline_rows(sim)
    title = _title(schedule, p, m, v, timeline_stats(rows), "modelled")
    return draw_gantt({title: rows}, unit="time (one stage's forward = 1)", p=p)


def mean_durations(rows: Sequence[Sequence[Mapping]]) -> dict[str, float]:
    """Each kind's mean measured duration over every rank's actions."""
    out = {}
    for kind in KINDS:
        d = [a["end"] - a["start"] for row in rows for a in row if a["kind"] == kind]
        if d:
            out[kind] = sum(d) / len(d)
    return out


def recorded_figure(reports: Sequence[Any], step: int = -1) -> InlineFigure:
    """One recorded step of pipeline 0 (measured), above the model of the same
    action lists with each kind's measured mean duration and no communication
    time (``check.simulate``): what is left between them is what the model leaves
    out (latency, a late rank, work longer than its pad)."""
    reports = pipeline_reports(reports)
    e = _get(reports[0], "extra")
    name, p, m, v = (_get(e, k) for k in ("schedule", "p", "m", "v"))
    rows = timeline_rows(reports, step)
    times = mean_durations(rows)
    sim = timeline_rows(simulate(p, m, v, SCHEDULES[name], times))
    dp = _get(_get(e, "config"), "dp_size")
    measured = _title(name, p, m, v, timeline_stats(rows), "measured")
    if dp > 1:
        measured += f"\npipeline 0 of {dp} (dp={dp})"
    modelled = _title(name, p, m, v, timeline_stats(sim), "modelled, same durations")
    return draw_gantt({measured: rows, modelled: sim}, p=p)


def placeholder(text: str) -> InlineFigure:
    """A small figure that says why there is nothing to draw."""
    fig = InlineFigure(figsize=(WIDTH, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True)
    return fig


def why_missing(schedule: str, p: int, m: int, v: int = 1) -> str:
    """Why a (schedule, p, m) has no recorded run: the schedule's own refusal, or
    that it was not among the runs."""
    v = 2 if schedule == "interleaved" and v == 1 else v
    try:
        SCHEDULES[schedule](0, p, m, v)
    except ValueError as err:
        return f"no such run: {err}"
    return f"{schedule}, p={p}, m={m} was not among the recorded runs"


def gantt_widget(runs: Mapping[tuple[str, int, int], Sequence[Any]], step: int = -1):
    """:func:`recorded_figure` with schedule, p and m controls over ``runs``
    (``(schedule, p, m) -> reports``), every combination prerendered (a missing
    one says why, see :func:`why_missing`)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    if not runs:
        raise ValueError("gantt_widget needs at least one recorded run")
    names = [s for s in SCHEDULES if any(k[0] == s for k in runs)]
    ps = sorted({k[1] for k in runs})
    ms = sorted({k[2] for k in runs})

    def draw(schedule, p, m):
        reports = runs.get((schedule, p, m))
        if reports is None:
            return placeholder(why_missing(schedule, p, m))
        return recorded_figure(reports, step)

    def buttons(options, label):
        return w.ToggleButtons(options=options, description=label)

    return interactive_figure(
        draw,
        prerender=True,
        schedule=buttons([(SCHEDULE_LABELS.get(s, s), s) for s in names], "schedule"),
        p=buttons([(str(p), p) for p in ps], "p"),
        m=buttons([(str(m), m) for m in ms], "m"),
    )


# ------------------------------------------------------------------ the bubble
def measured_bubble(reports: Sequence[Any], step: int = -1) -> float:
    """Pipeline 0's bubble of the step, measured: 1 - busy / (p x step time), with
    the lab's busy time per rank and its step time (the pipeline's last end)."""
    pipe = pipeline_reports(reports)
    span = _get(_get(pipe[0], "extra"), "step_seconds")[step]
    busy = sum(_get(_get(r, "extra"), "busy_seconds")[step] for r in pipe)
    return 1 - busy / (len(pipe) * span)


def bubble_rows(runs: Mapping[Any, Sequence[Any]], step: int = -1) -> list[dict]:
    """Per run: schedule, p, m, v, the measured bubble of the step
    (:func:`measured_bubble`) and the papers' (``check.expected_bubble`` with
    :func:`lab_times`, modelled), and their relative difference."""
    out = []
    for reports in runs.values():
        e = _get(pipeline_reports(reports)[0], "extra")
        name, p, m, v = (_get(e, k) for k in ("schedule", "p", "m", "v"))
        want = expected_bubble(SCHEDULES[name], p, m, v, lab_times(name, v))
        got = measured_bubble(reports, step)
        out.append(
            dict(
                schedule=name,
                p=p,
                m=m,
                v=v,
                measured=got,
                modelled=want,
                relative=(got - want) / want if want else float("nan"),
            )
        )
    return sorted(
        out, key=lambda r: (list(SCHEDULES).index(r["schedule"]), r["p"], r["m"])
    )


def draw_bubble_vs_m(rows: Sequence[Mapping], m_max: int = 32) -> InlineFigure:
    """One panel per p: the papers' bubble of the step against m (lines, modelled,
    up to ``m_max``; interleaved only where m is a multiple of p; GPipe and 1F1B
    share one line) and the measured points of ``rows`` (:func:`bubble_rows`); a
    10% line for scale."""
    ps = sorted({r["p"] for r in rows})
    if not ps:
        raise ValueError("no rows to draw")
    fig = InlineFigure(figsize=(WIDTH, 2.3 * len(ps) + 1.0), layout="constrained")
    axes = fig.subplots(len(ps), 1, sharex=True, squeeze=False)[:, 0]
    for ax, p in zip(axes, ps):
        mine = [r for r in rows if r["p"] == p]
        for name in SCHEDULES:
            pts = [r for r in mine if r["schedule"] == name]
            v = pts[0]["v"] if pts else (2 if name == "interleaved" else 1)
            color, marker = SCHEDULE_COLORS[name], SCHEDULE_STYLES[name][0]
            if name != "1f1b":  # 1F1B's formula is GPipe's
                step = p if name == "interleaved" else 1
                ms = list(range(step, m_max + 1, step))
                curve = [
                    expected_bubble(SCHEDULES[name], p, m, v, lab_times(name, v))
                    for m in ms
                ]
                ax.plot(
                    ms,
                    [100 * b for b in curve],
                    SCHEDULE_STYLES[name][1:],
                    color=color,
                    lw=1,
                )
            if pts:
                ax.plot(
                    [r["m"] for r in pts],
                    [100 * r["measured"] for r in pts],
                    marker,
                    color=color,
                    ms=6,
                    ls="none",
                    mfc="none" if name == "1f1b" else color,
                )
        ax.axhline(10, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("bubble, % of the step", fontsize=8)
        ax.set_title(f"p = {p}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("micro-batches m", fontsize=8)
    handles = [
        Line2D(
            [],
            [],
            color=SCHEDULE_COLORS[n],
            ls=SCHEDULE_STYLES[n][1:],
            label=("GPipe = 1F1B" if n == "gpipe" else SCHEDULE_LABELS[n])
            + " (formula)",
        )
        for n in SCHEDULES
        if n != "1f1b"
    ] + [
        Line2D(
            [],
            [],
            color=SCHEDULE_COLORS[n],
            marker=SCHEDULE_STYLES[n][0],
            ls="none",
            mfc="none" if n == "1f1b" else SCHEDULE_COLORS[n],
            label=f"{SCHEDULE_LABELS[n]} (measured)",
        )
        for n in SCHEDULES
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7)
    return fig


# ------------------------------------------------------------------ activations
def activation_rows(runs: Mapping[Any, Sequence[Any]]) -> list[dict]:
    """Per run and rank of pipeline 0: the measured peak of activation bytes, the
    measured stash of one micro-batch (over the rank's chunks), the most
    micro-batches in flight by the schedule (``check.peak_activations``; chunk
    micro-batches for interleaved), and their product, modelled (for
    interleaved, in-flight chunks x the mean chunk's stash)."""
    out = []
    for reports in runs.values():
        for r in pipeline_reports(reports):
            e = _get(r, "extra")
            v, per = _get(e, "v"), _get(e, "activation_bytes_per_micro")
            held = _get(e, "peak_in_flight")
            out.append(
                dict(
                    schedule=_get(e, "schedule"),
                    p=_get(e, "p"),
                    m=_get(e, "m"),
                    v=v,
                    rank=_get(e, "pp_rank"),
                    peak=_get(e, "peak_activation_bytes"),
                    per_micro=per,
                    in_flight=held,
                    modelled=held * per / v,
                )
            )
    return out


def draw_activation_peaks(rows: Sequence[Mapping], m: int) -> InlineFigure:
    """Top: the measured peak activation bytes of every rank at ``m`` micro-batches,
    one bar per schedule, with the modelled peak (in-flight x one micro-batch's
    stash) as a tick. Bottom: rank 0's measured peak against m for each schedule
    run at several m (GPipe grows, 1F1B stays at p micro-batches)."""
    at = [r for r in rows if r["m"] == m]
    if not at:
        raise ValueError(f"no rows at m={m}")
    names = [s for s in SCHEDULES if any(r["schedule"] == s for r in at)]
    ranks = sorted({r["rank"] for r in at})
    top = max(max(r["peak"], r["modelled"]) for r in rows)
    div, unit = byte_scale(top)
    fig = InlineFigure(figsize=(WIDTH, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        cell = {r["rank"]: r for r in at if r["schedule"] == name}
        xs = [k + (i - (len(names) - 1) / 2) * width for k in ranks]
        ax.bar(
            xs,
            [cell[k]["peak"] / div for k in ranks],
            width * 0.95,
            color=SCHEDULE_COLORS[name],
            label=f"{SCHEDULE_LABELS[name]} (measured)",
        )
        ax.plot(
            xs,
            [cell[k]["modelled"] / div for k in ranks],
            "_",
            color="black",
            ms=9,
            mew=1.5,
            label=None if i else "modelled: in flight x 1",
        )
    ax.set_xticks(ranks, [f"rank {k}" for k in ranks], fontsize=8)
    ax.set_ylabel(f"peak activations ({unit})", fontsize=8)
    ax.set_title(f"p = {at[0]['p']}, m = {m}: peak per rank", fontsize=9)
    ax.set_ylim(0, max(max(r["peak"], r["modelled"]) for r in at) / div * 1.08)
    ax.legend(
        fontsize=7,
        ncols=5,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.1),
        frameon=False,
        handlelength=1,
    )
    ax.tick_params(labelsize=8)
    for name in SCHEDULES:
        pts = sorted(
            (r["m"], r["peak"])
            for r in rows
            if r["schedule"] == name and r["rank"] == 0
        )
        if len(pts) > 1:
            ax2.plot(
                [x for x, _ in pts],
                [y / div for _, y in pts],
                SCHEDULE_STYLES[name],
                color=SCHEDULE_COLORS[name],
                label=SCHEDULE_LABELS[name],
            )
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("micro-batches m", fontsize=8)
    ax2.set_ylabel(f"rank 0 peak ({unit})", fontsize=8)
    ax2.set_title("rank 0's peak as m grows (measured)", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.tick_params(labelsize=8)
    if ax2.lines:
        ax2.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------ bytes
def p2p_rows(runs: Mapping[Any, Sequence[Any]]) -> list[dict]:
    """Per run and rank of pipeline 0: the bytes it sent to its neighbours in the
    last step, counted (each send's tensor), the kernel's count of everything its
    sockets sent (``wire``, counted), and the model: one ``b/m x s x h`` message per
    F on a stage that is not the last and per B on a stage that is not the first
    (Narayanan et al., SC 2021, section 3.2)."""
    out = []
    for reports in runs.values():
        for r in pipeline_reports(reports):
            e = _get(r, "extra")
            p, m, v = _get(e, "p"), _get(e, "m"), _get(e, "v")
            last = p * v - 1
            planned = SCHEDULES[_get(e, "schedule")](_get(e, "pp_rank"), p, m, v)
            sends = sum(
                (a.kind == "F" and a.stage < last) or (a.kind == "B" and a.stage > 0)
                for a in planned
            )
            by_op = _get(e, "comm_by_op")
            out.append(
                dict(
                    schedule=_get(e, "schedule"),
                    impl=_get(_get(e, "config"), "impl"),
                    p=p,
                    m=m,
                    v=v,
                    rank=_get(e, "pp_rank"),
                    message=_get(e, "p2p_bytes"),
                    messages=sends,
                    modelled=sends * _get(e, "p2p_bytes"),
                    counted=by_op.get("send", 0),
                    source=_get(e, "comm_sources").get("send"),
                    wire=_get(e, "wire_bytes_per_step")[-1],
                    all_reduce=by_op.get("all_reduce", 0),
                )
            )
    return out


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, str]) -> str:
    """``rows`` as a Markdown table: ``columns`` maps a key to its heading (a
    float prints with 3 significant digits, an int with thousands separators)."""

    def cell(value):
        if isinstance(value, bool) or value is None:
            return str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r[k]) for k in columns) + " |")
    return "\n".join(lines)
