"""Figures and widgets of chapter 1, "Data parallelism".

Pure functions turn the lab's reports (``labs.data_parallel``) or the analytic models
(``utils.memory_model``) into rows; drawing functions return a new figure (no pyplot
state); the widgets only wire controls to them through ``utils.widgets``. Nothing
here runs a lab.

- memory per rank as the world size grows, beside the per-rank batch (measured, and
  analytic at the scale of real models, next to a device's memory);
- each rank's compute and communication over one step, from measured timestamps;
- bus bandwidth against message size: the ring against the backend's all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.patches import Patch

from utils.hardware import ACCELERATORS, GB, MODELS
from utils.memory_model import model_state_bytes, transformer_activation_bytes
from utils.plots import CATEGORY_COLORS, InlineFigure, byte_scale
from utils.report import CATEGORIES, format_bytes
from utils.report import field_of as _get

STATES = ("params", "grads", "optimizer")


def _entry(report, phase: str, step: int | None = None) -> dict:
    """The memory entry of ``phase`` at ``step`` (None: the last step)."""
    entries = [e for e in _get(report, "memory") if e["phase"] == phase]
    if not entries:
        raise ValueError(f"rank {_get(report, 'rank')} recorded no phase {phase!r}")
    if step is None:
        return entries[-1]
    for e in entries:
        if e["step"] == step:
            return e
    raise ValueError(f"no phase {phase!r} at step {step}")


# ------------------------------------------------------------ memory, measured
def memory_scaling_rows(
    runs: Mapping[int, Sequence[Any]], phase: str = "step", kind: str = "current"
) -> list[dict]:
    """One row per (world size, rank): bytes by category at ``phase`` of the last
    step, the rows of the batch this rank computed, and the analytic model state
    (fp32 Adam, 16 B/param: the full replica, whatever the world size).

    ``runs`` maps a world size to that run's reports.
    """
    rows = []
    for world_size in sorted(runs):
        for report in sorted(runs[world_size], key=lambda r: _get(r, "rank")):
            values = _entry(report, phase)[kind]
            predicted = model_state_bytes(
                _get(report, "num_params"), mixed_precision=False
            )
            rows.append(
                {
                    "world_size": world_size,
                    "rank": _get(report, "rank"),
                    **{c: int(values[c]) for c in CATEGORIES},
                    "states": sum(int(values[c]) for c in STATES),
                    "predicted_states": predicted.total,
                    "rows_per_rank": _get(_get(report, "extra"), "rows_per_rank"),
                }
            )
    return rows


def draw_memory_scaling(
    runs: Mapping[int, Sequence[Any]], phase: str = "step", kind: str = "current"
):
    """Left: every rank's memory by category, grouped by world size, with the
    predicted full replica as a dashed line. Right: rows of the batch per rank."""
    rows = memory_scaling_rows(runs, phase, kind)
    totals = [sum(r[c] for c in CATEGORIES) for r in rows]
    scale, unit = byte_scale(max(totals + [r["predicted_states"] for r in rows]))
    fig = InlineFigure(figsize=(9, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    xs, labels, x = [], [], 0.0
    for world_size in sorted(runs):
        group = [r for r in rows if r["world_size"] == world_size]
        start = x
        for r in group:
            bottom = 0.0
            for c in CATEGORIES:
                left.bar(x, r[c] / scale, 0.8, bottom=bottom, color=CATEGORY_COLORS[c])
                bottom += r[c] / scale
            xs.append(x)
            labels.append(str(r["rank"]))
            x += 1
        left.hlines(
            group[0]["predicted_states"] / scale,
            start - 0.45,
            x - 0.55,
            colors="black",
            linestyles="--",
            linewidth=1,
        )
        left.annotate(
            f"N = {world_size}",
            ((start + x - 1) / 2, 0),
            ha="center",
            xytext=(0, -28),
            textcoords="offset points",
            fontsize=9,
        )
        x += 0.8
    left.set_xticks(xs, labels, fontsize=8)
    left.set_xlabel("rank, grouped by world size N", labelpad=16)
    left.set_ylabel(f"{kind} memory ({unit})")
    left.set_title(f"Memory per rank at the end of '{phase}'", fontsize=10)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    handles.append(
        left.plot([], [], "k--", linewidth=1, label="predicted model states")[0]
    )
    left.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    left.grid(axis="y", alpha=0.3)
    sizes = sorted(runs)
    per_rank = [
        next(r["rows_per_rank"] for r in rows if r["world_size"] == n) for n in sizes
    ]
    right.bar([str(n) for n in sizes], per_rank, color="#8172b3")
    right.set_xlabel("world size N")
    right.set_ylabel("rows of the batch per rank")
    right.set_title("The batch is split", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    return fig


def memory_scaling_widget(runs: Mapping[int, Sequence[Any]]):
    """:func:`draw_memory_scaling` with phase and current/peak controls (all drawn
    at build time, so they switch in the static book too)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    return interactive_figure(
        lambda phase, kind: draw_memory_scaling(runs, phase, kind),
        prerender=True,
        phase=w.Dropdown(
            options=["forward", "backward", "step"], value="step", description="end of"
        ),
        kind=w.ToggleButtons(options=["current", "peak"], description="memory"),
    )


# ------------------------------------------------------------ memory, analytic
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)


def dp_memory_rows(
    model: str, global_batch: int = 512, seq_len: int = 2048, micro_batch: int = 1
) -> list[dict]:
    """Per-rank bytes under data parallelism at each of ``WORLD_SIZES``.

    Each rank gets global_batch / N sequences and works through them in
    micro-batches of ``micro_batch`` (gradient accumulation), so its activations are
    those of one micro-batch: Korthikanti et al. (2022) with selective
    recomputation, all layers. Model states: mixed-precision Adam, 16 B/param,
    replicated on every rank (the ZeRO paper's accounting).
    """
    shape = MODELS[model]
    states = model_state_bytes(int(shape["params"])).as_dict()
    acts = transformer_activation_bytes(
        seq_len,
        micro_batch,
        shape["hidden"],
        shape["heads"],
        shape["layers"],
        recompute="selective",
    )
    return [
        {
            "world_size": n,
            "rows_per_rank": global_batch // n,
            **states,
            "activations": acts,
            "total": sum(states.values()) + acts,
        }
        for n in WORLD_SIZES
    ]


def draw_dp_memory_limit(model: str, device: str, global_batch: int = 512):
    """Left: per-rank memory by category against N, and the device's memory.
    Right: the sequences each rank processes per step (global_batch / N)."""
    rows = dp_memory_rows(model, global_batch)
    memory = next(a for a in ACCELERATORS if a.name == device).memory_bytes
    labels = [str(r["world_size"]) for r in rows]
    fig = InlineFigure(figsize=(9, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    bottom = [0.0] * len(rows)
    for c in (*STATES, "activations"):
        heights = [r[c] / GB for r in rows]
        left.bar(labels, heights, 0.7, bottom=bottom, color=CATEGORY_COLORS[c], label=c)
        bottom = [b + h for b, h in zip(bottom, heights)]
    left.axhline(
        memory / GB,
        color="black",
        linestyle="--",
        linewidth=1.5,
        label=f"{device}: {memory / GB:.0f} GB",
    )
    left.set_xlabel("data-parallel ranks N")
    left.set_ylabel("GB per rank")
    states = sum(rows[0][c] for c in STATES)
    if rows[0]["total"] <= memory:
        verdict = "fits at every N (and never needs N to fit)"
    elif states > memory:
        verdict = f"never fits: model states alone are {states / GB:.0f} GB per rank"
    else:
        verdict = "does not fit at any N"
    left.set_title(f"{model} on {device}: {verdict}", fontsize=9)
    left.legend(fontsize=7, loc="lower right")
    left.grid(axis="y", alpha=0.3)
    right.bar(labels, [r["rows_per_rank"] for r in rows], color="#8172b3")
    right.set_yscale("log", base=2)
    right.set_xlabel("data-parallel ranks N")
    right.set_ylabel("sequences per rank per step")
    right.set_title(f"global batch {global_batch}, split N ways", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    return fig


def dp_memory_limit_widget():
    """:func:`draw_dp_memory_limit` with model and device controls (prerendered)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    devices = ["A100 40GB", "H100 SXM", "MI300X"]
    return interactive_figure(
        draw_dp_memory_limit,
        prerender=True,
        model=w.Dropdown(options=list(MODELS), value="LLaMA-2 7B", description="model"),
        device=w.Dropdown(options=devices, value="H100 SXM", description="device"),
    )


# ------------------------------------------------------------------ timelines
_COLORS = {
    "forward": CATEGORY_COLORS["params"],
    "backward": CATEGORY_COLORS["grads"],
    "step": CATEGORY_COLORS["optimizer"],
    "comm": CATEGORY_COLORS["activations"],
    "wait": "#bbbbbb",
}


def timeline_rows(reports: Sequence[Any], step: int = -1) -> list[dict]:
    """Every measured interval of one step, all ranks: {"rank", "lane" ("compute"
    or "comm"), "what" (forward/backward/step/comm/wait), "name", "start", "end"}
    in seconds from the rank's step start."""
    rows = []
    for report in sorted(reports, key=lambda r: _get(r, "rank")):
        for e in _get(_get(report, "extra"), "timeline")[step]:
            what = e["name"] if e["kind"] == "compute" else e["kind"]
            lane = "comm" if e["kind"] == "comm" else "compute"
            rows.append(
                {
                    "rank": _get(report, "rank"),
                    "lane": lane,
                    "what": what,
                    "name": e["name"],
                    "start": e["start"],
                    "end": e["end"],
                }
            )
    return rows


def draw_timeline(runs: Mapping[str, Sequence[Any]], step: int = -1):
    """One panel per implementation; per rank, a compute lane (forward, backward,
    optimizer step, and the wait for communication) above a communication lane
    (each all-reduce from launch to completion). Same time axis in every panel."""
    fig = InlineFigure(figsize=(9, 1.3 + 1.5 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (impl, reports) in zip(axes, runs.items()):
        rows = timeline_rows(reports, step)
        for r in rows:
            y = r["rank"] + (0.0 if r["lane"] == "compute" else 0.4)
            ax.broken_barh(
                [(r["start"] * 1e3, (r["end"] - r["start"]) * 1e3)],
                (y, 0.35),
                facecolors=_COLORS[r["what"]],
                edgecolors="white",
                linewidth=0.5,
                alpha=0.75 if r["lane"] == "comm" else 1.0,
            )
        t = _get(reports[0], "timings")
        ax.set_title(
            f"{impl}: step {t['step'] * 1e3:.1f} ms, comm {t['comm'] * 1e3:.1f}"
            f" ms, of which overlapped with compute {t['overlap'] * 1e3:.1f}"
            " ms (rank 0, mean over steps)",
            fontsize=9,
        )
        ranks = sorted({r["rank"] for r in rows})
        ax.set_yticks([r + 0.375 for r in ranks], [f"rank {r}" for r in ranks])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("ms since the step started (each rank's own clock)")
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in _COLORS.items()],
        loc="outside lower center",
        ncols=len(_COLORS),
        fontsize=8,
    )
    return fig


def timeline_widget(runs: Mapping[str, Sequence[Any]]):
    """:func:`draw_timeline` with a step control (prerendered)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    steps = len(_get(_get(next(iter(runs.values()))[0], "extra"), "timeline"))
    options = [
        (f"step {s}" + (" (warm-up)" if s == 0 else ""), s) for s in range(steps)
    ]
    return interactive_figure(
        lambda step: draw_timeline(runs, step),
        prerender=True,
        step=w.Dropdown(options=options, value=steps - 1, description="show"),
    )


# ------------------------------------------------------------- bus bandwidth
def draw_busbw(rows: Sequence[Mapping], world_size: int):
    """busbw (nccl-tests' definition) against message size, one line per impl."""
    fig = InlineFigure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for impl, marker in (("builtin", "o-"), ("ring", "s--")):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["bytes"])
        label = "backend's all_reduce" if impl == "builtin" else "our ring (send/recv)"
        ax.semilogx(
            [r["bytes"] for r in mine],
            [r["busbw"] / GB for r in mine],
            marker,
            label=label,
        )
    sizes = sorted({r["bytes"] for r in rows})
    ax.set_xticks(sizes, [format_bytes(s, 0) for s in sizes], fontsize=8)
    ax.set_xlabel("message size S")
    ax.set_ylabel("busbw = S/t x 2(N-1)/N (GB/s)")
    ax.set_title(f"All-reduce bus bandwidth on {world_size} ranks", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig
