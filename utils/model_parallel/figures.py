"""Figures and widgets of chapter 4, "Model parallelism: layers and tensors".

Pure functions turn the lab's reports (``labs.model_parallel``: one list of rank
reports per run, each carrying its ``Config`` in ``extra.config``) or the analytic
model into rows; drawing functions return a new :class:`utils.plots.InlineFigure`
(no pyplot state); the widgets only wire controls to them through
``utils.widgets.interactive_figure``, prerendered so that they work in the static
book. Nothing here runs a lab.

* :func:`shard_rows` / :func:`draw_shards` / :func:`shards_widget`: which piece of
  each weight every rank holds (measured: the shapes the ranks reported).
* :func:`timeline_rows` / :func:`draw_timeline` / :func:`timeline_widget`: the
  measured per-rank timeline of a step, idle time shaded (the layer split);
  :func:`clock_shifts` puts the ranks on one clock (:func:`message_delays` bounds
  its error), :func:`compute_overlap` says how long two ranks computed at once.
* :func:`memory_rows` / :func:`draw_memory_vs_ranks`: model states and activations
  per rank as the ranks grow, layers against tensors, measured beside predicted.
* :func:`bytes_rows` / :func:`draw_bytes_vs_tp`: bytes per layer and per step as t
  grows, counted on the sockets beside Narayanan et al.'s formula (modelled).
* :func:`activation_rows` / :func:`draw_activations`: activation bytes per layer
  per rank with and without sequence parallelism, measured beside Korthikanti et
  al.'s Table 2 (adapted, modelled).
* :func:`equivalence_rows`, :func:`calls_rows` and their ``*_markdown``: every
  run against one process, and the collectives each issued, ours beside torch's.
* :func:`link_rows` / :func:`draw_links` / :func:`links_widget`: why tensor
  parallelism stays inside a node (modelled from vendor specifications).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from statistics import mean
from typing import Any

from matplotlib.patches import Patch, Rectangle

from utils.comm import bytes_sent
from utils.hardware import CLUSTERS
from utils.memory_model import transformer_activation_bytes
from utils.planner import PRESETS
from utils.plots import InlineFigure, byte_scale
from utils.report import field_of as _get
from utils.report import format_bytes

WIDTH = 6.4
"""Inches: every figure of the chapter, so its text stays legible on a phone."""

RANK_COLORS = (
    "#4c72b0", "#dd8452", "#55a868", "#c44e52",
    "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
)  # fmt: skip
"""Rank r's colour in every figure of the chapter: ``RANK_COLORS[r % 8]``."""

REPLICATED_COLOR = "#d9d9d9"
"""A parameter every rank holds whole."""

PHASE_COLORS = {
    "forward": "#4c72b0",
    "loss": "#8172b3",
    "backward": "#dd8452",
    "step": "#55a868",
}
"""Compute intervals of a timeline, by phase name (others: grey)."""

SHARD_PARAMS = (
    "blocks.0.attn.q.weight",
    "blocks.0.attn.proj.weight",
    "blocks.0.mlp.fc.weight",
    "blocks.0.mlp.proj.weight",
    "blocks.0.mlp.fc.bias",
    "blocks.0.mlp.proj.bias",
    "blocks.0.ln1.weight",
    "tok.weight",
    "head.weight",
)
"""The parameters the shard figure draws: one block's, and the vocabulary's."""

STATES = ("params", "grads", "optimizer")


def _by_rank(run: Sequence[Any]) -> list[Any]:
    if not run:
        raise ValueError("a run needs at least one rank report")
    ordered = sorted(run, key=lambda r: _get(r, "rank"))
    ranks = [_get(r, "rank") for r in ordered]
    if ranks != list(range(len(ranks))):
        raise ValueError(f"a run needs one report per rank 0..n-1, got ranks {ranks}")
    return ordered


def config_of(run: Sequence[Any]) -> dict:
    """The lab ``Config`` (as a dict) a run was made with."""
    return dict(_get(_get(_by_rank(run)[0], "extra"), "config"))


def tp_of(cfg: Mapping) -> int:
    """The tensor-parallel degree of a config dict (1 in layers mode)."""
    if cfg["mode"] == "layers":
        return 1
    return cfg["tp_size"] or cfg["world_size"] // cfg["dp_size"]


def runs_without_dp(
    runs: Iterable[Sequence[Any]], *, impl: str | None = "scratch", mode=None
):
    """The runs the row builders below draw, one filter for them all: no data
    parallelism, ``impl`` (None: either) and ``mode`` (None: either). Yields
    ``(cfg, ranks by rank, their extras)``."""
    for run in runs:
        cfg = config_of(run)
        if cfg["dp_size"] != 1 or impl is not None and cfg["impl"] != impl:
            continue
        if mode is not None and cfg["mode"] != mode:
            continue
        ranks = _by_rank(run)
        yield cfg, ranks, [_get(r, "extra") for r in ranks]


def select(runs: Iterable[Sequence[Any]], **want) -> list[list[Any]]:
    """The runs whose config has every ``key=value`` of ``want``, ordered by world
    size."""
    out = [
        _by_rank(run)
        for run in runs
        if all(config_of(run).get(k) == v for k, v in want.items())
    ]
    return sorted(out, key=lambda run: len(run))


# ------------------------------------------------------------------ the shards
def shard_style(name: str, dim: int | None) -> str:
    """How Megatron-LM's cut treats a parameter of the course GPT, by its name and
    the dimension the ranks reported cut (None: whole on every rank)."""
    if dim is None:
        return "replicated"
    if name.startswith("tok."):
        return "vocabulary-parallel"
    if name.startswith("head."):
        return "column-parallel (vocabulary)"
    return "column-parallel" if dim == 0 else "row-parallel"


def shard_rows(run: Sequence[Any], names: Sequence[str] = SHARD_PARAMS) -> list[dict]:
    """Per parameter: {"name", "full_shape", "dim", "style", "pieces"}, pieces one
    per rank {"rank", "index", "shape"} as the ranks reported them (measured). Loud
    if the ranks disagree on the cut or their pieces do not tile the whole."""
    ranks = _by_rank(run)
    rows = []
    for name in names:
        pieces, dims, fulls = [], set(), set()
        for r in ranks:
            shards = _get(_get(r, "extra"), "shards")
            if name not in shards:
                raise ValueError(f"rank {_get(r, 'rank')} holds no {name!r}")
            s = shards[name]
            dims.add(s["dim"])
            fulls.add(tuple(s["full_shape"]))
            pieces.append(
                {"rank": _get(r, "rank"), "index": s["index"], "shape": s["shape"]}
            )
        if len(dims) != 1 or len(fulls) != 1:
            raise ValueError(f"{name}: ranks disagree on the cut {dims} or {fulls}")
        dim, full = dims.pop(), list(fulls.pop())
        if dim is not None:
            covered = sorted(p["index"] for p in pieces)
            size = sum(p["shape"][dim] for p in pieces)
            if covered != list(range(len(pieces))) or size != full[dim]:
                raise ValueError(
                    f"{name}: pieces {covered} of {size} do not tile dimension {dim} "
                    f"of {full}"
                )
        rows.append(
            {
                "name": name,
                "full_shape": full,
                "dim": dim,
                "style": shard_style(name, dim),
                "pieces": pieces,
            }
        )
    return rows


def _drawn(row: Mapping) -> tuple[int, int, str | None, str]:
    """(width, height, the drawn axis the cut runs along, caption) of a parameter
    as the figure draws it: a linear weight W (out, in) as Megatron-LM's
    A = W^T (in rows, out columns), so that a column-parallel layer is cut into
    columns; an embedding as stored (a row per token); a vector as a row."""
    shape, dim, name = row["full_shape"], row["dim"], row["name"]
    axis = None
    if len(shape) == 1:
        if dim is not None:
            axis = "columns"
        return shape[0], 1, axis, f"vector of {shape[0]}"
    out, inp = shape
    if name.startswith("tok."):
        if dim is not None:
            axis = "rows" if dim == 0 else "columns"
        return inp, out, axis, f"E: {out} tokens x {inp}"
    if dim is not None:
        axis = "columns" if dim == 0 else "rows"
    return out, inp, axis, f"A = W^T: {inp} in x {out} out"


def draw_shards(run: Sequence[Any], names: Sequence[str] = SHARD_PARAMS):
    """One panel per parameter: the whole matrix, each rank's piece in its colour
    (replicated ones grey: every rank holds all of it)."""
    rows = shard_rows(run, names)
    t = len(_by_rank(run))
    cols = 3
    nrows = -(-len(rows) // cols)
    fig = InlineFigure(figsize=(WIDTH, 2.05 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(rows) :]:
        ax.set_axis_off()
    for ax, row in zip(axes, rows):
        width, height, axis, caption = _drawn(row)
        scale = max(width, height)
        w, h = width / scale, max(height / scale, 0.06)
        x0, y0 = (1 - w) / 2, (1 - h) / 2
        if axis is None:
            ax.add_patch(Rectangle((x0, y0), w, h, color=REPLICATED_COLOR))
        for p in sorted(row["pieces"], key=lambda p: p["index"] or 0):
            if axis is None:
                break
            k = p["index"]
            color = RANK_COLORS[p["rank"] % len(RANK_COLORS)]
            if axis == "columns":
                rect = (x0 + k * w / t, y0, w / t, h)
            else:  # rows from the top: chunk 0 is the first rows
                rect = (x0, y0 + h - (k + 1) * h / t, w, h / t)
            ax.add_patch(
                Rectangle(
                    rect[:2], *rect[2:], facecolor=color, edgecolor="white", lw=0.8
                )
            )
        ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor="black", lw=0.6))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        short = row["name"].removeprefix("blocks.0.")
        cut = f"cut into {axis}" if axis else "whole on every rank"
        ax.set_title(f"{short}\n{row['style']}", fontsize=8)
        ax.set_xlabel(f"{caption}\n{cut}", fontsize=7)
    handles = [
        Patch(color=RANK_COLORS[r % len(RANK_COLORS)], label=f"rank {r}")
        for r in range(t)
    ]
    handles.append(Patch(color=REPLICATED_COLOR, label="replicated"))
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=t + 1)
    fig.suptitle(
        f"What each of t = {t} ranks holds (measured: the shapes they reported)",
        fontsize=9,
    )
    return fig


def shards_widget(runs_by_tp: Mapping[int, Sequence[Any]]):
    """:func:`draw_shards` with a choice of t, every choice drawn at build time."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    options = sorted(runs_by_tp)
    return interactive_figure(
        lambda tp: draw_shards(runs_by_tp[tp]),
        prerender=True,
        tp=w.ToggleButtons(
            options=[(f"t = {t}", t) for t in options],
            value=options[-1],
            description="ranks",
        ),
    )


def shard_markdown(run: Sequence[Any]) -> str:
    """One block's parameters and the vocabulary's: each one's style, whole shape
    and the shape one rank holds (measured), as a Markdown table."""
    names = [
        n for n in _get(_get(_by_rank(run)[0], "extra"), "shards")
        if not n.startswith("blocks.") or n.startswith("blocks.0.")
    ]  # fmt: skip
    lines = [
        "| parameter | style | whole | on each rank |",
        "|---|---|---:|---:|",
    ]
    for row in shard_rows(run, names):
        full = " x ".join(map(str, row["full_shape"]))
        mine = " x ".join(map(str, row["pieces"][0]["shape"]))
        lines.append(f"| `{row['name']}` | {row['style']} | {full} | {mine} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the timeline
def _first_end(events: Sequence[Mapping], name: str) -> float | None:
    ends = [e["end"] for e in events if e["name"] == name]
    return min(ends) if ends else None


def _link_offsets(prev_events, events) -> tuple[float, float] | None:
    """Between group k (``prev_events``) and k+1 (``events``), each on its own
    clock: (the offset to add to k+1's times, relative to k's, and the two
    messages' delays in all). NTP's estimate: the activation goes k -> k+1 and
    its gradient comes back k+1 -> k, and each receive ends a delay after its
    send ends; the midpoint of the two one-way estimates cancels equal delays,
    and their difference is the sum of the delays, which bounds the error."""
    sent_f, got_f = (
        _first_end(prev_events, "send activation"),
        _first_end(events, "recv activation"),
    )
    sent_b, got_b = (
        _first_end(events, "send gradient"),
        _first_end(prev_events, "recv gradient"),
    )
    if None in (sent_f, got_f, sent_b, got_b):
        return None
    forward = sent_f - got_f  # the offset if the activation took no time
    backward = got_b - sent_b  # the offset if the gradient took no time
    return (forward + backward) / 2, backward - forward


def clock_shifts(run: Sequence[Any], step: int = -1) -> dict[int, float]:
    """Seconds to add to each rank's interval times so that all ranks share one
    clock. Each rank times its step from its own exit of the barrier before it,
    and under load those exits differ by milliseconds; the messages of the layer
    split fix the offsets (:func:`_link_offsets`, the activation forward and its
    gradient back, as NTP does with a request and its reply). Group 0 of each
    chain keeps its clock; ranks without such messages (tensor mode) are not
    shifted. :func:`message_delays` gives the error bound."""
    shifts, _ = _align(run, step)
    return shifts


def message_delays(run: Sequence[Any], step: int = -1) -> list[float]:
    """Per link of the layer split: the activation's and the gradient's delays
    in all (seconds, measured), which bounds the error of :func:`clock_shifts`'s
    offset for that link: at most half of it."""
    return _align(run, step)[1]


def _align(run, step):
    ranks = _by_rank(run)
    chains: dict[int, list] = {}
    for r in ranks:
        coords = _get(r, "coords")
        chains.setdefault(coords.get("dp", 0), []).append(r)
    shifts, delays = {}, []
    for chain in chains.values():
        chain.sort(key=lambda r: _get(r, "coords").get("pp", 0))
        shift = 0.0
        for k, r in enumerate(chain):
            if k:
                link = _link_offsets(
                    _get(_get(chain[k - 1], "extra"), "timeline")[step],
                    _get(_get(r, "extra"), "timeline")[step],
                )
                if link is not None:
                    shift = shifts[_get(chain[k - 1], "rank")] + link[0]
                    delays.append(link[1])
            shifts[_get(r, "rank")] = shift
    return shifts, delays


def timeline_rows(run: Sequence[Any], step: int = -1) -> list[dict]:
    """Per rank, in chain order (its layer group, then rank): {"rank", "group",
    "intervals", "span", "compute", "comm", "wait", "idle", "busy", "shift"} for
    ``step`` (measured, seconds, on one clock: :func:`clock_shifts`; 0 is the
    earliest rank's start of the step). ``span`` is the step's length: from 0 to
    the latest end of any rank's interval; ``idle`` is the span less the rank's
    compute and sends (its waits included); ``busy`` compute / span; ``shift``
    what was added to the rank's own times."""
    ranks = _by_rank(run)
    steps = {len(_get(_get(r, "extra"), "timeline")) for r in ranks}
    if steps == {0}:
        raise ValueError("the run has no timeline")
    shifts = clock_shifts(run, step)
    origin = min(shifts.values())
    per_rank = []
    for r in ranks:
        d = shifts[_get(r, "rank")] - origin
        per_rank.append(
            [
                {**e, "start": e["start"] + d, "end": e["end"] + d}
                for e in _get(_get(r, "extra"), "timeline")[step]
            ]
        )
    span = max((e["end"] for events in per_rank for e in events), default=0.0)
    if span <= 0:
        raise ValueError("the step's timeline is empty")
    rows = []
    for r, events in zip(ranks, per_rank):
        total = {"compute": 0.0, "comm": 0.0, "wait": 0.0}
        for e in events:
            total[e["kind"]] = total.get(e["kind"], 0.0) + e["end"] - e["start"]
        rows.append(
            {
                "rank": _get(r, "rank"),
                "group": _get(r, "coords").get("pp", 0),
                "intervals": events,
                "span": span,
                **total,
                "idle": span - total["compute"] - total["comm"],
                "busy": total["compute"] / span,
                "shift": shifts[_get(r, "rank")] - origin,
            }
        )
    return sorted(rows, key=lambda row: (row["group"], row["rank"]))


def compute_overlap(
    rows: Sequence[Mapping], names: Sequence[str] = ("forward", "backward")
) -> float:
    """Seconds of the step during which two or more ranks of :func:`timeline_rows`
    ran one of ``names`` at once, on the common clock of :func:`timeline_rows`."""
    edges = []
    for row in rows:
        for e in row["intervals"]:
            if e["kind"] == "compute" and e["name"] in names:
                edges += [(e["start"], 1), (e["end"], -1)]
    busy, last, overlap = 0, 0.0, 0.0
    for time, step in sorted(edges, key=lambda x: (x[0], x[1])):
        if busy >= 2:
            overlap += time - last
        busy, last = busy + step, time
    return overlap


def draw_timeline(run: Sequence[Any], step: int = -1):
    """One lane per rank: its compute (by phase), its sends (black) and its
    blocking receives (hatched); everything not computing or sending is idle,
    shaded."""
    rows = timeline_rows(run, step)
    span = rows[0]["span"]
    scale, unit = (1e3, "ms") if span < 2 else (1.0, "s")
    fig = InlineFigure(figsize=(WIDTH, 0.75 * len(rows) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    for lane, row in enumerate(rows):
        y = len(rows) - 1 - lane
        ax.broken_barh(
            [(0, span * scale)], (y - 0.4, 0.8), facecolor="#f2d7d5", edgecolor="none"
        )
        for e in row["intervals"]:
            x, dx = e["start"] * scale, (e["end"] - e["start"]) * scale
            if e["kind"] == "compute":
                color = PHASE_COLORS.get(e["name"], "#8c8c8c")
                ax.broken_barh([(x, dx)], (y - 0.4, 0.8), facecolor=color)
            elif e["kind"] == "comm":
                ax.broken_barh([(x, dx)], (y - 0.4, 0.8), facecolor="black")
            else:  # a blocking receive: idle, waiting for a neighbour
                ax.broken_barh(
                    [(x, dx)],
                    (y - 0.4, 0.8),
                    facecolor="none",
                    edgecolor="#c44e52",
                    hatch="///",
                    lw=0,
                )
        ax.text(
            span * scale * 1.01,
            y,
            f"{row['busy']:.0%} busy",
            va="center",
            fontsize=8,
        )
    labels = [
        f"rank {row['rank']}" + (f" (group {row['group']})" if len(rows) > 1 else "")
        for row in rows
    ]
    ax.set_yticks(range(len(rows) - 1, -1, -1), labels, fontsize=8)
    ax.set_xlim(0, span * scale * 1.14)
    ax.set_xlabel(f"time since the step began ({unit}, measured; clocks aligned)")
    cfg = config_of(run)
    ax.set_title(
        f"One step of mode={cfg['mode']} on {len(rows)} ranks "
        f"({cfg['n_layers']} blocks): who works when",
        fontsize=9,
    )
    names = [n for n in PHASE_COLORS if any(
        e["name"] == n for row in rows for e in row["intervals"]
    )]  # fmt: skip
    handles = [Patch(color=PHASE_COLORS[n], label=n) for n in names]
    handles += [
        Patch(color="black", label="send"),
        Patch(facecolor="none", edgecolor="#c44e52", hatch="///", label="recv (wait)"),
        Patch(color="#f2d7d5", label="idle"),
    ]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=4)
    return fig


def timeline_widget(runs_by_ranks: Mapping[int, Sequence[Any]]):
    """:func:`draw_timeline` with a choice of how many ranks the layers are cut
    across, every choice drawn at build time."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    options = sorted(runs_by_ranks)
    return interactive_figure(
        lambda ranks: draw_timeline(runs_by_ranks[ranks]),
        prerender=True,
        ranks=w.ToggleButtons(
            options=[(f"{n} ranks", n) for n in options],
            value=options[-1],
            description="layer groups",
        ),
    )


# ------------------------------------------------------------------ memory
def _states(report) -> int:
    return sum(_get(_get(report, "extra"), "state_bytes").get(k, 0) for k in STATES)


def _predicted_states(report) -> int:
    return sum(_get(_get(report, "extra"), "predicted")[k] for k in STATES)


def memory_rows(runs: Iterable[Sequence[Any]]) -> list[dict]:
    """Per scratch run without data parallelism: {"mode", "sequence_parallel",
    "ranks", "states", "states_predicted", "activations", "activations_predicted"},
    each a list over ranks: model states (parameters, gradients, optimizer) after
    the step, and activations at the end of forward, measured by the ledger and
    predicted by the lab's analytic model. A one-rank run is the whole model in
    either mode and is listed under both."""
    rows = []
    for cfg, ranks, extras in runs_without_dp(runs):
        row = {
            "sequence_parallel": cfg["sequence_parallel"],
            "ranks": len(ranks),
            "states": [_states(r) for r in ranks],
            "states_predicted": [_predicted_states(r) for r in ranks],
            "activations": [_get(e, "activation_bytes") for e in extras],
            "activations_predicted": [
                _get(e, "predicted")["activations"] for e in extras
            ],
        }
        modes = ("layers", "tensor") if len(ranks) == 1 else (cfg["mode"],)
        rows += [{"mode": m, **row} for m in modes]
    return sorted(rows, key=lambda r: (r["mode"], r["sequence_parallel"], r["ranks"]))


_MODE_STYLE = {
    ("layers", False): ("#55a868", "o", "layers"),
    ("tensor", False): ("#4c72b0", "s", "tensor"),
    ("tensor", True): ("#c44e52", "^", "tensor + SP"),
}


def draw_memory_vs_ranks(rows: Sequence[Mapping]):
    """Left: model states per rank; right: activations per rank at the end of
    forward; against the ranks the model is split over. Markers: measured (a
    vertical bar spans the ranks' range where they differ); lines: predicted."""
    fig = InlineFigure(figsize=(WIDTH, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    top = max(
        max(max(r[k]) for k in ("states", "states_predicted", "activations"))
        for r in rows
    )
    scale, unit = byte_scale(top)
    for ax, key, title in (
        (axes[0], "states", "model states (after the step)"),
        (axes[1], "activations", "activations (end of forward)"),
    ):
        for (mode, sp), (color, marker, label) in _MODE_STYLE.items():
            mine = [
                r for r in rows if r["mode"] == mode and r["sequence_parallel"] == sp
            ]
            if key == "states" and sp:
                continue  # the same states as without SP
            if sp:  # SP's one-rank point is the plain model's
                mine = [
                    r for r in rows
                    if r["mode"] == mode and r["ranks"] == 1
                ] + mine  # fmt: skip
            if not mine:
                continue
            xs = [r["ranks"] for r in mine]
            lo = [min(r[key]) / scale for r in mine]
            hi = [max(r[key]) / scale for r in mine]
            mid = [(a + b) / 2 for a, b in zip(lo, hi)]
            ax.errorbar(
                xs,
                mid,
                yerr=[
                    [m - a for m, a in zip(mid, lo)],
                    [b - m for m, b in zip(mid, hi)],
                ],
                fmt=marker,
                color=color,
                capsize=3,
                label=f"{label}, measured",
            )
            pred = [max(r[f"{key}_predicted"]) / scale for r in mine]
            ax.plot(xs, pred, "--", color=color, lw=1, label=f"{label}, predicted")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["ranks"] for r in rows})
        ax.set_xticks(ranks, [str(n) for n in ranks])
        ax.set_xlabel("ranks the model is split over")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"bytes per rank ({unit})")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=3)
    return fig


# ------------------------------------------------------------------ bytes
def layer_formula_bytes(cfg: Mapping) -> int:
    """Narayanan et al. 2021, sec. 3.2: per layer per micro-batch, two all-reduces
    forward and two backward of b s h elements, each sending 2 (t-1)/t of it per
    rank (``utils.comm.bytes_sent``): 8 b s h (t-1)/t elements, times the element
    size. Modelled."""
    t = tp_of(cfg)
    e = 2 if cfg["precision"] == "bf16" else 4
    b = cfg["batch_size"] // cfg["dp_size"]
    return 4 * bytes_sent("all_reduce", b * cfg["seq_len"] * cfg["d_model"] * e, t)


def bytes_rows(runs: Iterable[Sequence[Any]]) -> list[dict]:
    """Per scratch tensor-mode run without data parallelism: {"tp",
    "sequence_parallel", "layer_formula" (modelled), "layer_counted" (the mean over
    ranks and blocks of what the sockets carried while a block ran forward and
    backward), "step_modelled" (the meter, mean over ranks), "step_counted" (the
    sockets, mean over ranks), "by_phase", "calls" (rank 0, modelled bytes and
    calls by phase and collective)}. t = 1 rows send nothing."""
    rows = []
    for cfg, ranks, extras in runs_without_dp(runs, mode="tensor"):
        blocks = [
            (b.get("forward") or 0) + (b.get("backward") or 0)
            for e in extras
            for b in _get(e, "block_wire_bytes")
        ]
        wire = [_get(r, "wire_bytes") for r in ranks]
        rows.append(
            {
                "tp": tp_of(cfg),
                "sequence_parallel": cfg["sequence_parallel"],
                "layers": cfg["n_layers"],
                "layer_formula": layer_formula_bytes(cfg),
                "layer_counted": mean(blocks) if blocks else 0,
                "step_modelled": mean(_get(r, "comm_bytes") for r in ranks),
                "step_counted": mean(w or 0 for w in wire),
                "by_phase": _get(extras[0], "comm_by_phase"),
                "calls": _get(extras[0], "calls_by_phase"),
            }
        )
    return sorted(rows, key=lambda r: (r["sequence_parallel"], r["tp"]))


def draw_bytes_vs_tp(rows: Sequence[Mapping]):
    """Left: bytes one rank sends per transformer layer per step, counted on its
    sockets (markers) beside 8 b s h (t-1)/t x element size (line, modelled).
    Right: bytes per step, the meter's modelled total and the sockets' count."""
    fig = InlineFigure(figsize=(WIDTH, 3.3), layout="constrained")
    axes = fig.subplots(1, 2)
    top = max(max(r["layer_counted"], r["layer_formula"]) for r in rows)
    top_step = max(max(r["step_counted"], r["step_modelled"]) for r in rows)
    scale, unit = byte_scale(top)
    sscale, sunit = byte_scale(top_step)
    tps = sorted({r["tp"] for r in rows})
    plain = [r for r in rows if not r["sequence_parallel"]]
    axes[0].plot(
        [r["tp"] for r in plain],
        [r["layer_formula"] / scale for r in plain],
        "--",
        color="black",
        lw=1,
        label="8bsh(t-1)/t x e (modelled)",
    )
    for sp, (color, marker, label) in (
        (False, _MODE_STYLE[("tensor", False)]),
        (True, _MODE_STYLE[("tensor", True)]),
    ):
        mine = [r for r in rows if r["sequence_parallel"] == sp]
        if sp:
            mine = [r for r in plain if r["tp"] == 1] + mine
        xs = [r["tp"] for r in mine]
        axes[0].plot(
            xs,
            [r["layer_counted"] / scale for r in mine],
            marker,
            color=color,
            label=f"{label}, counted",
        )
        axes[1].plot(
            xs,
            [r["step_counted"] / sscale for r in mine],
            marker + "-",
            color=color,
            label=f"{label}, counted",
        )
        axes[1].plot(
            xs,
            [r["step_modelled"] / sscale for r in mine],
            marker + ":",
            color=color,
            mfc="none",
            label=f"{label}, modelled",
        )
    for ax, title, u in (
        (axes[0], "per transformer layer per step", unit),
        (axes[1], "per step, the whole model", sunit),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(tps, [str(t) for t in tps])
        ax.set_xlabel("tensor-parallel degree t")
        ax.set_ylabel(f"bytes one rank sends ({u})")
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def comm_markdown(rows: Sequence[Mapping]) -> str:
    """Per run with t > 1: the calls and modelled bytes of each phase (rank 0), the
    step's modelled and counted totals, as a Markdown table."""
    lines = [
        "| t | SP | forward | loss | backward | sync | step, modelled | "
        "step, counted |",
        "|---:|:---:|---|---|---|---|---:|---:|",
    ]

    def cell(row, phase):
        calls, sizes = row["calls"].get(phase, {}), row["by_phase"].get(phase, {})
        if not calls:
            return ""
        return "<br>".join(
            f"{calls[k]} {k.replace('_', '-')} ({format_bytes(sizes.get(k, 0))})"
            for k in sorted(calls)
        )

    for r in rows:
        if r["tp"] == 1:
            continue
        phases = [cell(r, p) for p in ("forward", "loss", "backward", "sync")]
        lines.append(
            f"| {r['tp']} | {'yes' if r['sequence_parallel'] else 'no'} | "
            + " | ".join(phases)
            + f" | {format_bytes(r['step_modelled'])} | "
            f"{format_bytes(r['step_counted'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ activations
def paper_activation_bytes(cfg: Mapping) -> int:
    """Korthikanti et al. 2022, Table 2, for one layer of the lab's shape as the
    paper counts it: 16-bit activations, 1-byte dropout masks, the a s^2 b scores'
    softmax kept (``utils.memory_model.transformer_activation_bytes``). Modelled."""
    return transformer_activation_bytes(
        cfg["seq_len"],
        cfg["batch_size"] // cfg["dp_size"],
        cfg["d_model"],
        cfg["n_heads"],
        tp_size=tp_of(cfg),
        sequence_parallel=cfg["sequence_parallel"],
    )


def activation_rows(runs: Iterable[Sequence[Any]]) -> list[dict]:
    """Per scratch tensor-mode run without data parallelism: {"tp",
    "sequence_parallel", "per_layer" (measured: the mean over ranks and blocks of
    what a block's forward left alive), "per_layer_min", "per_layer_max",
    "predicted" (the lab's adaptation of Table 2, modelled), "paper" (Table 2 as
    printed, 16-bit with dropout, modelled), "total", "total_predicted" (end of
    forward, mean over ranks)}."""
    rows = []
    for cfg, _, extras in runs_without_dp(runs, mode="tensor"):
        blocks = [b for e in extras for b in _get(e, "block_activation_bytes")]
        if not blocks:
            raise ValueError("the run recorded no per-block activations (probes off?)")
        rows.append(
            {
                "tp": tp_of(cfg),
                "sequence_parallel": cfg["sequence_parallel"],
                "per_layer": mean(blocks),
                "per_layer_min": min(blocks),
                "per_layer_max": max(blocks),
                "predicted": _get(extras[0], "predicted")["activations_per_layer"],
                "paper": paper_activation_bytes(cfg),
                "total": mean(_get(e, "activation_bytes") for e in extras),
                "total_predicted": mean(
                    _get(e, "predicted")["activations"] for e in extras
                ),
            }
        )
    return sorted(rows, key=lambda r: (r["sequence_parallel"], r["tp"]))


def draw_activations(rows: Sequence[Mapping]):
    """Activation bytes one transformer layer leaves on one rank, against t, with
    and without sequence parallelism: measured (markers; the bar spans the blocks'
    range) beside the lab's adapted formula (line) and, faint, Table 2 as the
    paper prints it (16-bit, with dropout: not this model's bytes)."""
    fig = InlineFigure(figsize=(WIDTH, 3.4), layout="constrained")
    ax = fig.add_subplot()
    top = max(max(r["per_layer_max"], r["predicted"], r["paper"]) for r in rows)
    scale, unit = byte_scale(top)
    plain = [r for r in rows if not r["sequence_parallel"]]
    for sp, (color, marker, label) in (
        (False, _MODE_STYLE[("tensor", False)]),
        (True, _MODE_STYLE[("tensor", True)]),
    ):
        mine = [r for r in rows if r["sequence_parallel"] == sp]
        if sp:
            mine = [r for r in plain if r["tp"] == 1] + mine
        if not mine:
            continue
        xs = [r["tp"] for r in mine]
        mid = [r["per_layer"] / scale for r in mine]
        ax.errorbar(
            xs,
            mid,
            yerr=[
                [m - r["per_layer_min"] / scale for m, r in zip(mid, mine)],
                [r["per_layer_max"] / scale - m for m, r in zip(mid, mine)],
            ],
            fmt=marker,
            color=color,
            capsize=3,
            label=f"{label}: measured (fp32)",
        )
        ax.plot(
            xs,
            [r["predicted"] / scale for r in mine],
            "--",
            color=color,
            lw=1,
            label=f"{label}: Table 2 adapted (modelled)",
        )
        ax.plot(
            xs,
            [r["paper"] / scale for r in mine],
            ":",
            color=color,
            alpha=0.5,
            lw=1,
            label=f"{label}: Table 2 as printed, 16-bit (modelled)",
        )
    tps = sorted({r["tp"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(tps, [str(t) for t in tps])
    ax.set_xlabel("tensor-parallel degree t")
    ax.set_ylabel(f"activation bytes per layer per rank ({unit})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("What one layer's forward leaves for its backward, on one rank",
                 fontsize=9)  # fmt: skip
    return fig


def activation_markdown(rows: Sequence[Mapping]) -> str:
    """The rows of :func:`activation_rows` as a Markdown table."""
    lines = [
        "| t | SP | measured per layer | adapted formula | measured / formula | "
        "Table 2 as printed (16-bit) | end of forward, measured / predicted |",
        "|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {'yes' if r['sequence_parallel'] else 'no'} | "
            f"{format_bytes(r['per_layer'])} | {format_bytes(r['predicted'])} | "
            f"{r['per_layer'] / r['predicted']:.3f} | {format_bytes(r['paper'])} | "
            f"{format_bytes(r['total'])} / {format_bytes(r['total_predicted'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ equivalence
def _param_diff(run: Sequence[Any], reference_params: Mapping) -> float | None:
    """The largest difference of any final parameter from the reference's: the
    gathered parameters (tensor mode, rank 0's) or every rank's own (layers)."""
    worst, seen = 0.0, False
    for r in _by_rank(run):
        params = _get(_get(r, "extra"), "params")
        if not params:
            continue
        for name, value in params.items():
            want = reference_params[name]
            want = want.tolist() if hasattr(want, "tolist") else want
            worst = max(worst, _max_abs_diff(value, want))
            seen = True
    return worst if seen else None


def _max_abs_diff(a, b) -> float:
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return float("inf")
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return abs(a - b)


def equivalence_rows(
    runs: Iterable[Sequence[Any]],
    reference_losses: Sequence[float],
    reference_params: Mapping | None = None,
) -> list[dict]:
    """Per run: {"label", "mode", "impl", "tp", "dp", "sequence_parallel",
    "loss_diff", "param_diff"}: the largest difference over the steps between the
    run's global loss (rank 0's) and one process training the unsplit model on the
    same batch, and (runs made with ``return_params``, given ``reference_params``)
    of any final parameter; None where not recorded."""
    rows = []
    for run in runs:
        cfg = config_of(run)
        losses = _get(_by_rank(run)[0], "losses")
        if len(losses) != len(reference_losses):
            raise ValueError(
                f"{len(losses)} losses against {len(reference_losses)} reference ones"
            )
        rows.append(
            {
                "label": run_label(cfg),
                "mode": cfg["mode"],
                "impl": cfg["impl"],
                "tp": tp_of(cfg),
                "dp": cfg["dp_size"],
                "sequence_parallel": cfg["sequence_parallel"],
                "loss_diff": max(
                    abs(a - b) for a, b in zip(losses, reference_losses, strict=True)
                ),
                "param_diff": None
                if reference_params is None
                else _param_diff(run, reference_params),
            }
        )
    return rows


def run_label(cfg: Mapping) -> str:
    """ "tensor, t=4, SP, torch", "layers, 4 groups", "dp=2 x tensor t=2"..."""
    if cfg["mode"] == "layers":
        groups = cfg["world_size"] // cfg["dp_size"]
        text = f"layers, {groups} group{'s' * (groups > 1)}"
    else:
        text = f"tensor, t={tp_of(cfg)}" + (", SP" if cfg["sequence_parallel"] else "")
    if cfg["dp_size"] > 1:
        text = f"dp={cfg['dp_size']} x {text}"
    return f"{text}, {cfg['impl']}"


def equivalence_markdown(rows: Sequence[Mapping]) -> str:
    """The rows of :func:`equivalence_rows` as a Markdown table."""
    lines = [
        "| run | largest loss difference | largest parameter difference |",
        "|---|---:|---:|",
    ]
    for r in rows:
        p = "" if r["param_diff"] is None else f"{r['param_diff']:.1e}"
        lines.append(f"| {r['label']} | {r['loss_diff']:.1e} | {p} |")
    return "\n".join(lines)


def calls_rows(runs: Iterable[Sequence[Any]]) -> list[dict]:
    """Per tensor-mode run without data parallelism and t > 1: {"label", "tp",
    "sequence_parallel", "impl", "calls"}: rank 0's collective calls of one step
    by phase and kind (the scratch layers' meter; torch's through its dispatch
    counter)."""
    rows = []
    for cfg, _, extras in runs_without_dp(runs, impl=None, mode="tensor"):
        if tp_of(cfg) == 1:
            continue
        rows.append(
            {
                "label": run_label(cfg),
                "tp": tp_of(cfg),
                "sequence_parallel": cfg["sequence_parallel"],
                "impl": cfg["impl"],
                "calls": _get(extras[0], "calls_by_phase"),
            }
        )
    return sorted(rows, key=lambda r: (r["sequence_parallel"], r["tp"], r["impl"]))


def calls_markdown(rows: Sequence[Mapping]) -> str:
    """The rows of :func:`calls_rows` as a Markdown table, a column per phase."""
    phases = [
        p
        for p in ("forward", "loss", "backward", "sync", "step", "other")
        if any(p in r["calls"] for r in rows)
    ]
    lines = [
        "| run | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for r in rows:
        cells = []
        for p in phases:
            calls = r["calls"].get(p, {})
            cells.append(
                ", ".join(f"{calls[k]} {k.replace('_', '-')}" for k in sorted(calls))
            )
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ links
def link_rows(
    cluster: str = "DGX A100 x 16",
    model: str = "GPT-3 175B",
    tps: Sequence[int] = (2, 4, 8, 16),
    micro_batch: int = 1,
) -> list[dict]:
    """Modelled, per transformer layer per micro-batch on one tensor-parallel rank
    (16-bit): {"tp", "link", "compute_s", "comm_s", "comm_bytes"} over the links of
    ``cluster`` (vendor specifications, ``utils.hardware.CLUSTERS``).

    compute: forward and backward, 3 (24 b s h^2 + 4 b s^2 h) / t flops (Narayanan
    et al. 2021, eq. 3 without recomputation) at the cluster's ``mfu`` of peak;
    communication: 8 b s h (t-1)/t elements of 2 bytes (sec. 3.2) at the link's
    per-direction bandwidth. Inside a node (NVLink) while t fits in one; t larger
    than a node, and every t over the network (InfiniBand), for comparison."""
    c, m = CLUSTERS[cluster], PRESETS[model]
    b, s, h = micro_batch, m.seq_len, m.hidden
    rows = []
    for t in tps:
        flops = 3 * (24 * b * s * h * h + 4 * b * s * s * h) / t
        compute = flops / (c.peak_flops * c.mfu)
        size = 4 * bytes_sent("all_reduce", b * s * h * 2, t)
        links = [("InfiniBand (between nodes)", c.inter_node_bytes_per_s)]
        if t <= c.gpus_per_node:
            links.insert(0, ("NVLink (inside a node)", c.intra_node_bytes_per_s))
        for link, bandwidth in links:
            rows.append(
                {
                    "tp": t,
                    "link": link,
                    "bandwidth": bandwidth,
                    "compute_s": compute,
                    "comm_s": size / bandwidth,
                    "comm_bytes": size,
                }
            )
    return rows


def draw_links(rows: Sequence[Mapping], cluster: str = "", model: str = ""):
    """For each t and link: one layer's compute and its tensor-parallel
    communication (which it cannot overlap: the next operation needs the
    all-reduce's result), side by side, in milliseconds (modelled)."""
    fig = InlineFigure(figsize=(WIDTH, 0.42 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        c, k = r["compute_s"] * 1e3, r["comm_s"] * 1e3
        ax.barh(y, c, color="#4c72b0", height=0.6)
        ax.barh(y, k, left=c, color="#c44e52", height=0.6)
        ax.text(c + k, y, f"  {k / (c + k):.0%} communicating", va="center", fontsize=7)
        labels.append(f"t={r['tp']}, {r['link'].split(' (')[0]}")
    ax.set_yticks(range(len(rows) - 1, -1, -1), labels, fontsize=8)
    ax.set_xlabel("milliseconds per layer per micro-batch (modelled)")
    right = max((r["compute_s"] + r["comm_s"]) * 1e3 for r in rows)
    ax.set_xlim(0, 1.45 * right)
    ax.legend(
        handles=[
            Patch(color="#4c72b0", label="compute (forward + backward)"),
            Patch(color="#c44e52", label="tensor-parallel all-reduces"),
        ],
        fontsize=7,
        loc="lower right",
    )
    ax.set_title(f"{model} on {cluster}: one layer, one micro-batch", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def links_widget(
    model: str = "GPT-3 175B", clusters=("DGX A100 x 16", "DGX H100 x 64")
):
    """:func:`draw_links` for a choice of cluster, every choice drawn at build
    time."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    return interactive_figure(
        lambda cluster: draw_links(link_rows(cluster, model), cluster, model),
        prerender=True,
        cluster=w.ToggleButtons(options=list(clusters), description="cluster"),
    )
