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

from utils.comm import bus_factor
from utils.hardware import GB
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    PAPER_EXAMPLES,
    convention_state_bytes,
    model_state_bytes,
)
from utils.plots import CATEGORY_COLORS, InlineFigure, byte_scale, stack_bars
from utils.report import CATEGORIES, format_bytes
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


WIDTH = 6.4
"""Inches: every figure of the chapter, so its text stays legible on a phone."""


def draw_explorer(
    num_params: float = 7.5e9,
    world_size: int = 64,
    stage: int = 3,
    convention: str = "mixed-16",
    measured: Mapping[int, Sequence[Any]] | None = None,
):
    """Top: the formula's bytes per rank at every stage side by side (``stage``
    drawn solid, the others faded), each labelled with its total, and an 80 GB
    line. Bottom (with ``measured``, stage -> the lab's reports): each rank's
    measured bytes after the step at ``stage`` beside the formula for the lab's
    model. The axis runs to the larger of the tallest bar and the device, so the
    stages' differences stay visible at any size."""
    conv = BYTES_PER_PARAM_CONVENTIONS[convention]
    reports = list((measured or {}).get(stage, []))
    rows = 2 if reports else 1
    fig = InlineFigure(figsize=(WIDTH, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    ax = axes[0]
    totals = []
    for s in STAGE_NAMES:
        bars = explorer_bars(round(num_params), world_size, s, convention)
        scaled = {c: v / GB for c, v in bars.items()}
        chosen = s == stage
        height = stack_bars(
            ax, s, scaled, 0.62, alpha=1.0 if chosen else 0.35,
            edgecolor="black" if chosen else "none", linewidth=1.0,
        )  # fmt: skip
        totals.append(height)
    top = max(max(totals), GPU_GB)
    for s, total in zip(STAGE_NAMES, totals):
        fits = "fits" if total <= GPU_GB else "too big"
        ax.annotate(
            f"{total:,.3g} GB\n{fits}",
            (s, total),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold" if s == stage else "normal",
        )
    ax.axhline(GPU_GB, color="black", linestyle="--", linewidth=1)
    ax.text(3.45, GPU_GB, f"{GPU_GB} GB device", va="bottom", ha="right", fontsize=8)
    ax.set_ylim(0, 1.25 * top)
    ax.set_xticks(
        list(STAGE_NAMES), [STAGE_NAMES[s].replace(" (", "\n(") for s in STAGE_NAMES]
    )
    ax.tick_params(axis="x", labelsize=9)
    ax.set_ylabel("GB per rank (10^9 bytes)")
    ax.set_title(
        f"formula: {count_label(num_params)} params on N = {world_size:,} ranks\n"
        f"{conv.label}",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in STATES]
    if reports:
        _draw_measured(axes[1], reports, stage)
        handles += [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES[3:]]
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch="///",
                label="formula (lab model)",
            )
        )
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=3)
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
        stack_bars(ax, x - 0.2, {c: b / scale for c, b in v.items()}, 0.38)
        scaled = {c: b / scale for c, b in formula.items()}
        stack_bars(ax, x + 0.2, scaled, 0.38, style="outline")
    ax.set_xticks(range(len(ranks)), [f"rank {_get(r, 'rank')}" for r in ranks])
    ax.tick_params(axis="x", labelsize=9)
    ax.set_ylim(0, 1.15 * top / scale)
    ax.set_ylabel(f"after the step ({unit})")
    ax.set_title(
        f"measured: the lab's GPT ({psi:,} params) on N = {n}, "
        f"{cfg['precision']}, {STAGE_NAMES[stage]}:\n"
        "each rank after the step (solid) beside its formula (hatched)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)


def explorer_widget(
    measured: Mapping[int, Sequence[Any]] | None = None,
    *,
    live: bool = False,
    num_params: float = 7.5e9,
    world_size: int = 64,
):
    """The explorer: stage and convention for the paper's example (``num_params``
    on ``world_size`` ranks), every combination prerendered so that both controls
    work in the static book; ``live=True`` adds free controls for the parameters
    (up to 10 trillion) and the world size, for a notebook with a kernel.

    Every control is as wide as the page allows, at most 460 px, so the row wraps
    on a phone instead of scrolling sideways."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    def fluid():
        return w.Layout(width="100%", max_width="460px")

    choices = dict(
        stage=w.Dropdown(
            options=[(STAGE_NAMES[s], s) for s in range(4)],
            value=3,
            description="stage",
            layout=fluid(),
        ),
        convention=w.Dropdown(
            options=[
                (BYTES_PER_PARAM_CONVENTIONS[k].label, k) for k in EXPLORER_CONVENTIONS
            ],
            value="mixed-16",
            description="bytes/param",
            layout=fluid(),
        ),
    )
    if not live:

        def fixed(stage, convention):
            return draw_explorer(num_params, world_size, stage, convention, measured)

        return interactive_figure(fixed, prerender=True, **choices)

    def draw(num_params, world_size, stage, convention):
        return draw_explorer(num_params, world_size, stage, convention, measured)

    return interactive_figure(
        draw,
        num_params=w.FloatLogSlider(
            value=num_params,
            base=10,
            min=6,
            max=13,
            step=0.05,
            description="parameters",
            readout_format=".3g",
            layout=fluid(),
        ),
        world_size=w.SelectionSlider(
            options=[2**k for k in range(13)],
            value=world_size,
            description="world size N",
            layout=fluid(),
        ),
        **choices,
    )


# ------------------------------------------------------- the lab's runs, compared
def max_param_diff(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]):
    """The largest absolute difference between two runs' final parameters."""
    import torch

    return max((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max().item() for k in b)


def equivalence_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every run against stage 0 of the course's implementation in its precision.

    ``runs``: (stage, precision, impl) or (stage, precision, impl, label) -> the
    lab's reports (with ``return_params``). Rows: {"stage", "precision", "impl",
    "label", "loss_diff", "param_diff", "elements_differ"} (rank 0; the last is
    how many parameter elements are not bitwise equal)."""
    import torch

    base = {k[1]: v[0] for k, v in runs.items() if k[0] == 0 and k[2] == "scratch"}
    rows = []
    for key, reports in runs.items():
        stage, precision, impl = key[:3]
        r, b = reports[0], base[precision]
        a_params, b_params = (
            _get(_get(r, "extra"), "params"),
            _get(_get(b, "extra"), "params"),
        )
        rows.append(
            {
                "stage": stage,
                "precision": precision,
                "impl": impl,
                "label": key[3] if len(key) > 3 else "",
                "loss_diff": max(
                    abs(x - y) for x, y in zip(_get(r, "losses"), _get(b, "losses"))
                ),
                "param_diff": max_param_diff(a_params, b_params),
                "elements_differ": sum(
                    int((torch.tensor(a_params[k]) != torch.tensor(b_params[k])).sum())
                    for k in b_params
                ),
            }
        )
    return rows


def equivalence_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`equivalence_rows` as a Markdown table."""
    lines = [
        "| impl | precision | stage | loss diff | parameter diff | elements not "
        "bitwise equal |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        stage = f"{r['stage']}{', ' + r['label'] if r['label'] else ''}"
        lines.append(
            f"| {r['impl']} | {r['precision']} | {stage} | {r['loss_diff']:.1e} | "
            f"{r['param_diff']:.1e} | {r['elements_differ']:,} |"
        )
    return "\n".join(lines)


def memory_markdown(runs: Mapping[tuple, Sequence[Any]]) -> str:
    """Rank 0's bytes by category after the step, beside the formula (p / g / o)."""
    head = (
        "| impl | precision | stage | params | grads | optimizer | other | "
        "formula (p / g / o) |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, reports in runs.items():
        stage, precision, impl = key[:3]
        after = measured_after_step(reports[0])
        want = _get(_get(reports[0], "extra"), "predicted")
        cells = " | ".join(format_bytes(after[c]) for c in (*STATES, "other"))
        formula = " / ".join(format_bytes(want[c]) for c in STATES)
        lines.append(f"| {impl} | {precision} | {stage} | {cells} | {formula} |")
    return "\n".join(lines)


GLOO_PAYLOAD = {
    "all_reduce": lambda n: 1.0,
    "all_gather": lambda n: 1.0,
    "reduce_scatter": lambda n: 2.0,
    "broadcast": lambda n: (n - 1) / n,
}
"""What gloo really sends, as a multiple of the modelled figure (``utils.comm``,
nccl-tests' factors), per rank on average (``utils.wire``, checked to the byte by
``tests/test_wire.py``): its all-reduce and all-gather are rings, as the model
assumes; its ``reduce_scatter_tensor`` all-reduces a copy of the whole input
(``ProcessGroupGloo::reduce_scatter_tensor_coalesced``), twice the model; its
broadcast is a binomial tree, (n-1) x S over all ranks, so (n-1)/n x S per rank on
average where the model says S."""


def comm_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Bytes per rank in the last step, three ways, for every run.

    ``modelled``: the lab's meter (rank 0; nccl-tests' factors); ``formula``: 2 or
    3 x (N-1)/N x Psi x bytes per element; ``gloo``: the modelled bytes of each
    collective times :data:`GLOO_PAYLOAD`, what gloo's algorithms send;
    ``counted``: the kernel's TCP counters (``wire_bytes``), averaged over the
    ranks (min and max too; None where not countable); ``framing``: counted -
    gloo, gloo's 48-byte message headers (three per point-to-point transfer).
    """
    rows = []
    for key, reports in runs.items():
        stage, precision, impl = key[:3]
        r = min(reports, key=lambda x: _get(x, "rank"))
        n, extra = _get(r, "world_size"), _get(r, "extra")
        psi_bytes = _get(r, "num_params") * _get(extra, "bytes_per_element")
        by_op = dict(_get(extra, "comm_by_op"))
        gloo = sum(GLOO_PAYLOAD[op](n) * b for op, b in by_op.items())
        wires = [_get(x, "wire_bytes") for x in reports]
        counted = None if None in wires else sum(wires) / len(wires)
        rows.append(
            {
                "stage": stage,
                "precision": precision,
                "impl": impl,
                "world_size": n,
                "modelled": _get(r, "comm_bytes"),
                "source": _get(r, "comm_source"),
                "formula": (3 if stage == 3 else 2)
                * bus_factor("all_gather", n)
                * psi_bytes,
                "psi_bytes": psi_bytes,
                "by_op": by_op,
                "gloo": gloo,
                "counted": counted,
                "counted_range": None if counted is None else (min(wires), max(wires)),
                "framing": None if counted is None else counted - gloo,
            }
        )
    return rows


def comm_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`comm_rows` as a Markdown table, every column saying what it is."""
    lines = [
        "| impl | prec. | stage | modelled (per collective) | modelled / "
        "$\\Psi$ | gloo's algorithms | counted on the wire | counted - gloo's |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ops = ", ".join(
            f"{k.replace('_', '-')} {format_bytes(v)}" for k, v in r["by_op"].items()
        )
        counted, framing = "n/a", "n/a"
        if r["counted"] is not None:
            lo, hi = r["counted_range"]
            spread = "" if lo == hi else f" ({format_bytes(lo)} to {format_bytes(hi)})"
            counted = f"{format_bytes(r['counted'])}{spread}"
            framing = f"{r['framing']:,.0f} B"
        lines.append(
            f"| {r['impl']} | {r['precision']} | {r['stage']} | "
            f"{format_bytes(r['modelled'])}: {ops} | "
            f"{r['modelled'] / r['psi_bytes']:.3g} | {format_bytes(r['gloo'])} | "
            f"{counted} | {framing} |"
        )
    return "\n".join(lines)


def stage2_gradient_peak(report, model, bucket_numel: int) -> dict[str, Any]:
    """Stage 2 (the course's): the full gradients rank ``report`` held at once in
    backward, from its memory ledger, beside its buckets.

    Returns {"bucket_bytes": [...], "largest_bucket", "largest_grad" (bytes of the
    largest parameter's gradient), "largest_module_grads" (the most gradient bytes
    one module's own parameters have: what one backward operation produces),
    "shards" (the gradient shards, after the step), "backward_peak" (the backward
    marks' peak breakdown, "grads", less the shards: the measurement),
    "after_copies" (the highest "grads" reading after a gradient copy, less the
    shards), "beyond_bucket" (the modules whose own gradients are exactly what the
    peak holds beyond the largest bucket)}.

    ``model`` is the model the run trained (rebuilt: only its parameters' shapes
    and names are read) and ``bucket_numel`` the run's bucket size; the lab's
    ``stage2_layout`` gives both."""
    from utils.zero.optim import bucket_layouts

    extra = _get(report, "extra")
    cfg = _get(extra, "config")
    if (cfg["stage"], cfg["impl"]) != (2, "scratch"):
        raise ValueError("stage2_gradient_peak needs a scratch stage-2 report")
    elem = _get(extra, "bytes_per_element")
    layouts = bucket_layouts(model.parameters(), bucket_numel, cfg["world_size"])
    events = [e for e in _get(extra, "events") if e["event"] == "grad"]
    if not events:
        raise ValueError("no stage-2 events: run with memory tracking on")
    shards = measured_after_step(report)["grads"]
    backward = [m for m in _get(report, "memory") if m["phase"] == "backward"]
    own = {
        name: sum(p.numel() for p in m._parameters.values() if p is not None) * elem
        for name, m in model.named_modules()
    }
    peak = max(m["peak"]["grads"] for m in backward) - shards
    largest = max(lay.padded for lay in layouts) * elem
    return {
        "bucket_bytes": [lay.padded * elem for lay in layouts],
        "largest_bucket": largest,
        "largest_grad": max(p.numel() for p in model.parameters()) * elem,
        "largest_module_grads": max(own.values()),
        "shards": shards,
        "backward_peak": peak,
        "beyond_bucket": [k for k, v in own.items() if v and v == peak - largest],
        "after_copies": max(e["current"]["grads"] for e in events) - shards,
    }


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
        stack_bars(ax, x, {c: b / scale for c, b in e["current"].items()}, 0.8)
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
        peak = {c: b / scale for c, b in r["peak"].items()}
        height = stack_bars(ax, x - 0.2, peak, 0.38)
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
