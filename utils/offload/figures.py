"""Figures and tables of chapter 3, "CPU offloading".

Pure functions compute rows from the lab's reports (``labs.offload``; a mapping
``(mode, precision, impl) -> [rank reports]``) or from the formulas
(``utils.offload.accounting``); drawing functions return a new figure (no pyplot
state); the widgets only wire controls to them. Nothing here runs a lab.

* :func:`state_rows`: device and host model-state bytes after the step, measured,
  beside the mode's formula; :func:`moved_rows`: the bytes copied per step,
  counted, beside it; :func:`equivalence_rows`: every mode against no offload;
  :func:`activation_rows`: activations kept per block, measured, beside the formula.
* :func:`draw_pools` / :func:`pools_widget`: device beside host, per mode.
* :func:`draw_step_time`: the step split into compute, transfer and optimizer,
  with the modelled PCIe time of the same bytes.
* :func:`fits_rows` / :func:`draw_fits` / :func:`fits_widget`: which modes fit a
  model of a given size on a given device and host (modelled), with ZeRO-Offload's
  13B-parameters-on-one-32-GB-GPU example recomputed (:func:`paper_13b`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.patches import Patch

from utils.hardware import GB
from utils.models import GPTConfig
from utils.offload.accounting import (
    MODEL_STATE_MODES,
    MODES,
    gpt_block_saved_bytes,
    offload_state_bytes,
)
from utils.plots import CATEGORY_COLORS, InlineFigure, byte_scale, stack_bars
from utils.report import CATEGORIES, format_bytes
from utils.report import field_of as _get

STATES = ("params", "grads", "optimizer")
POOLS = ("device", "host")
WIDTH = 6.4
"""Inches: every figure of the chapter, so its text stays legible on a phone."""

V100_GB = 32
"""NVIDIA V100 SXM2 32GB: 32 GB of HBM2 (NVIDIA V100 datasheet,
https://www.nvidia.com/en-us/data-center/v100/). ZeRO-Offload's headline: over 13
billion parameters trained on one such GPU (Ren et al. 2021, abstract)."""
DGX2_HOST_GB = 1500
"""NVIDIA DGX-2: 16 V100 32GB sharing 1.5 TB of system memory (NVIDIA DGX-2
datasheet). One GPU training alone can use all of it."""
PAPER_PARAMS = 13 * 10**9
"""The paper's single-GPU example: 13 billion parameters."""


def _ranks(reports) -> list:
    return sorted(reports, key=lambda r: _get(r, "rank"))


def _extra(report):
    return _get(report, "extra")


def _after_step(report) -> dict:
    """The last "step" mark's pools: {"device": {...}, "host": {...}} current."""
    steps = [m for m in _get(report, "memory") if m["phase"] == "step"]
    if not steps:
        raise ValueError("the report has no 'step' phase (was memory tracked?)")
    return {p: dict(steps[-1]["pools"][p]["current"]) for p in POOLS}


def peak_of(report, pool: str = "device") -> int:
    """The most bytes ``pool`` held at any moment of the run (the phases' peaks)."""
    return max(m["pools"][pool]["peak_total"] for m in _get(report, "memory"))


def _peak_entry(report, pool: str) -> dict:
    memory = _get(report, "memory")
    entry = max(memory, key=lambda m: m["pools"][pool]["peak_total"])
    return dict(entry["pools"][pool]["peak"])


# ------------------------------------------------------------------ measured tables
def state_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Per run: rank 0's model-state bytes after the step in each pool, measured
    (the ledger), and the mode's formula; the largest difference over all ranks
    and categories, padding aside."""
    rows = []
    for (mode, precision, impl), reports in runs.items():
        ranks = _ranks(reports)
        if any(_extra(r).out_of_memory for r in ranks):
            continue
        want = _extra(ranks[0]).predicted
        worst = 0
        for r in ranks:
            got = _after_step(r)
            pad = _extra(r).padding_bytes
            for pool in POOLS:
                for cat in STATES:
                    diff = abs(got[pool][cat] - want[pool][cat])
                    worst = max(worst, max(0, diff - pad))
        got = _after_step(ranks[0])
        rows.append(
            dict(
                mode=mode,
                precision=precision,
                impl=impl,
                world_size=_get(ranks[0], "world_size"),
                num_params=_get(ranks[0], "num_params"),
                device={c: got["device"][c] for c in STATES},
                host={c: got["host"][c] for c in STATES},
                predicted=want,
                worst=worst,
            )
        )
    return rows


def state_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rank 0's device | host model states (params + grads + optimizer), measured
    (formula), per run."""

    def cell(values: Mapping[str, int]) -> str:
        parts = [format_bytes(values[c]) for c in STATES]
        return " + ".join(parts)

    lines = [
        "| mode | precision | device: params + grads + optimizer | host: params "
        "+ grads + optimizer | formula (device / host totals) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        lines.append(
            f"| {r['mode']} | {r['precision']} | {cell(r['device'])} | "
            f"{cell(r['host'])} | {format_bytes(sum(p['device'].values()))} / "
            f"{format_bytes(sum(p['host'].values()))} |"
        )
    return "\n".join(lines)


def moved_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Per run: bytes rank 0 copied in its last step (counted), per direction,
    the model-state formula, and both per parameter of the rank's slice."""
    rows = []
    for (mode, precision, impl), reports in runs.items():
        r0 = _ranks(reports)[0]
        x = _extra(r0)
        if x.out_of_memory or not x.moved_per_step:
            continue
        n, psi = _get(r0, "world_size"), _get(r0, "num_params")
        mine = -(-psi // n)
        counted = x.moved_per_step[-1]
        rows.append(
            dict(
                mode=mode,
                precision=precision,
                impl=impl,
                h2d=counted["h2d"],
                d2h=counted["d2h"],
                predicted=dict(x.moved_predicted),
                per_param=(counted["h2d"] + counted["d2h"]) / mine,
                slice_params=mine,
                source=x.moved_source,
            )
        )
    return rows


def moved_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| mode | precision | impl | host → device | device → host | per parameter "
        "of the slice | model-state formula |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted"]
        lines.append(
            f"| {r['mode']} | {r['precision']} | {r['impl']} | "
            f"{format_bytes(r['h2d'])} | {format_bytes(r['d2h'])} | "
            f"{r['per_param']:.3g} B | {format_bytes(p['h2d'])} + "
            f"{format_bytes(p['d2h'])} |"
        )
    return "\n".join(lines)


def _params(report) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in _extra(report).params.items()}


def equivalence_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every run against the course's no-offload run of the same precision: the
    largest difference of the loss over the steps and of any parameter at the
    end, and how many elements are not bit for bit the same."""
    rows = []
    for (mode, precision, impl), reports in runs.items():
        base = runs.get(("none", precision, "scratch"))
        r = _ranks(reports)[-1]
        if base is None or _extra(r).out_of_memory or _extra(r).params is None:
            continue
        b = _ranks(base)[0]
        got, want = _params(r), _params(b)
        diffs = [(got[k] - want[k]).abs() for k in want]
        rows.append(
            dict(
                mode=mode,
                precision=precision,
                impl=impl,
                loss_diff=max(
                    abs(x - y) for x, y in zip(_get(r, "losses"), _get(b, "losses"))
                ),
                param_diff=max(float(d.max()) for d in diffs),
                elements_differ=sum(int((d != 0).sum()) for d in diffs),
                elements=sum(d.numel() for d in diffs),
            )
        )
    return rows


def equivalence_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| mode | precision | impl | largest loss difference | largest parameter "
        "difference | elements not bit-equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['precision']} | {r['impl']} | {r['loss_diff']:.1e} | "
            f"{r['param_diff']:.1e} | {r['elements_differ']:,} of {r['elements']:,} |"
        )
    return "\n".join(lines)


def activation_rows(runs: Mapping[tuple, Sequence[Any]]) -> list[dict[str, Any]]:
    """Per run: the activation bytes each block adds in forward (from the second
    block on, measured on rank 0, device and host), the peak device activations
    in forward and backward, and the formulas for one block (what the block
    saves, :func:`gpt_block_saved_bytes`, and its input, sbh elements)."""
    rows = []
    for (mode, precision, impl), reports in runs.items():
        r0 = _ranks(reports)[0]
        x = _extra(r0)
        samples = x.layer_activations
        if x.out_of_memory or len(samples) < 3:
            continue
        cfg = x.config
        e = 2 if precision == "mixed" else 4
        s, h = GPTConfig().seq_len, cfg["d_model"]  # the lab's GPT: default length
        b = cfg["batch_size"] // _get(r0, "world_size")
        per = {
            pool: [
                samples[i][pool] - samples[i - 1][pool] for i in range(2, len(samples))
            ]
            for pool in POOLS
        }
        memory = _get(r0, "memory")
        last = max(m["step"] for m in memory if m["step"] is not None)
        phase = {m["phase"]: m for m in memory if m["step"] == last}
        rows.append(
            dict(
                mode=mode,
                precision=precision,
                impl=impl,
                per_block=per,
                saved_formula=gpt_block_saved_bytes(s, b, h, 4, bytes_per_element=e),
                input_formula=s * b * h * e,
                forward_peak=phase["forward"]["pools"]["device"]["peak"]["activations"],
                backward_peak=phase["backward"]["pools"]["device"]["peak"][
                    "activations"
                ],
                host_after_forward=phase["forward"]["pools"]["host"]["current"][
                    "activations"
                ],
                moved=dict(x.moved_per_step[-1]),
            )
        )
    return rows


def activation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| policy | precision | impl | per block: device / host (measured) | peak "
        "device activations: forward / backward | moved per step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dev = sorted(set(r["per_block"]["device"]))
        host = sorted(set(r["per_block"]["host"]))
        dev_s = ", ".join(format_bytes(v) for v in dev)
        host_s = ", ".join(format_bytes(v) for v in host)
        m = r["moved"]
        lines.append(
            f"| {r['mode']} | {r['precision']} | {r['impl']} | {dev_s} / {host_s} | "
            f"{format_bytes(r['forward_peak'])} / {format_bytes(r['backward_peak'])} "
            f"| {format_bytes(m['d2h'])} down, {format_bytes(m['h2d'])} up |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------- device beside host
def pool_bars(reports, rank: int = 0, kind: str = "peak") -> dict[str, dict]:
    """One rank's bytes by category in each pool: at its peak (the phase where
    that pool peaked) or after the last step ("after step")."""
    if kind not in ("peak", "after step"):
        raise ValueError(f"kind must be 'peak' or 'after step', got {kind!r}")
    report = next((r for r in reports if _get(r, "rank") == rank), None)
    if report is None:
        raise ValueError(f"no report from rank {rank}")
    if kind == "after step":
        return _after_step(report)
    return {p: _peak_entry(report, p) for p in POOLS}


def draw_pools(
    runs: Mapping[str, Sequence[Any]], rank: int = 0, kind: str = "peak", title=""
):
    """For each run (label -> reports): the device bar beside the host bar,
    stacked by category; the device budget, if any, as a line."""
    labels = list(runs)
    bars = {label: pool_bars(runs[label], rank, kind) for label in labels}
    top = max(sum(v.values()) for b in bars.values() for v in b.values()) or 1
    scale, unit = byte_scale(top)
    fig = InlineFigure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.subplots()
    for i, label in enumerate(labels):
        for j, pool in enumerate(POOLS):
            x = i + (j - 0.5) * 0.4
            scaled = {c: b / scale for c, b in bars[label][pool].items()}
            style = "hatched" if pool == "host" else "solid"
            bottom = stack_bars(ax, x, scaled, 0.38, style=style)
            mark = pool[0].upper()
            oom = any(_extra(r).out_of_memory for r in runs[label])
            if oom and pool == "device":
                mark += "\nran out"  # the peak before the allocation that failed
            ax.text(x, bottom, mark, ha="center", va="bottom", fontsize=7)
    budgets = {_extra(r).device_budget for rs in runs.values() for r in rs} - {None}
    for budget in budgets:
        ax.axhline(budget / scale, color="black", linestyle="--", linewidth=1)
        ax.text(-0.45, budget / scale, "device budget", ha="left", va="bottom",
                fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(labels)), [lab.replace("+", "+\n") for lab in labels])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel(f"rank {rank}, {kind} ({unit})")
    ax.set_ylim(0, 1.15 * top / scale)
    ax.set_title(title or f"device (D, solid) beside host (H, hatched): {kind}",
                 fontsize=9)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=5)
    return fig


def pools_widget(runs: Mapping[str, Sequence[Any]]):
    """:func:`draw_pools` with a rank and a kind (peak / after step), all drawn
    at build time so the page's controls work without a kernel."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    ranks = sorted(_get(r, "rank") for r in next(iter(runs.values())))

    def draw(rank, kind):
        return draw_pools(runs, rank, kind)

    return interactive_figure(
        draw,
        prerender=True,
        rank=w.Dropdown(options=[(f"rank {r}", r) for r in ranks], description="rank"),
        kind=w.ToggleButtons(options=["peak", "after step"], description="memory"),
    )


# ------------------------------------------------------------------- step time
def time_rows(runs: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Per run: the slowest rank's median step split (measured) and the modelled
    PCIe time of the bytes it copied."""
    rows = []
    for label, reports in runs.items():
        ranks = [r for r in reports if _get(r, "timings")]
        if not ranks:
            continue
        slowest = max(ranks, key=lambda r: _get(r, "timings")["step"])
        t = _get(slowest, "timings")
        rows.append(dict(label=label, rank=_get(slowest, "rank"), **t))
    return rows


def draw_step_time(rows: Sequence[Mapping[str, Any]]):
    """Horizontal bars: compute, transfer and optimizer (measured, slowest rank's
    median step), and a tick at the modelled PCIe time of the same bytes."""
    parts = (("compute", "#4c72b0"), ("transfer", "#dd8452"), ("optimizer", "#55a868"))
    fig = InlineFigure(figsize=(WIDTH, 0.5 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(rows):
        left = 0.0
        for key, color in parts:
            ax.barh(i, r[key] * 1e3, left=left, color=color, height=0.6)
            left += r[key] * 1e3
        ax.plot(r["modelled_transfer"] * 1e3, i, "k|", markersize=14)
        if r["modelled_transfer"]:
            ax.text(left, i, f" PCIe {r['modelled_transfer'] * 1e3:.3g} ms (modelled)",
                    va="center", fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45 * max(sum(r[k] for k, _ in parts) for r in rows) * 1e3)
    ax.set_xlabel("ms per step (measured, median)")
    handles = [Patch(color=c, label=k) for k, c in parts]
    handles.append(
        ax.plot(
            [], [], "k|", markersize=10, label="PCIe time of those bytes (modelled)"
        )[0]  # fmt: skip
    )
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=2)
    ax.grid(axis="x", alpha=0.3)
    return fig


# -------------------------------------------------------------- fits, modelled
def device_need(num_params: float, mode: str, *, layer_params: float = 0) -> int:
    """Modelled device bytes of the model states on one GPU (mixed precision):
    the mode's formula, plus for "params" the working set of two layers' 16-bit
    parameters (the one computing, the one prefetched)."""
    psi = round(num_params)
    need = sum(offload_state_bytes(psi, mode).get("device").values())
    if mode == "params":
        need += 2 * 2 * round(layer_params)
    return need


def host_need(num_params: float, mode: str) -> int:
    return sum(offload_state_bytes(round(num_params), mode)["host"].values())


def fits_rows(
    sizes: Sequence[float],
    device_bytes: float,
    host_bytes: float,
    *,
    layers: int = 40,
) -> list[dict[str, Any]]:
    """For each size and model-state mode (one GPU, mixed precision, modelled):
    device and host bytes, and whether both fit. A layer holds 1/``layers`` of
    the parameters (the "params" working set)."""
    rows = []
    for psi in sizes:
        for mode in MODEL_STATE_MODES:
            dev = device_need(psi, mode, layer_params=psi / layers)
            host = host_need(psi, mode)
            rows.append(
                dict(
                    params=psi,
                    mode=mode,
                    device=dev,
                    host=host,
                    fits_device=dev <= device_bytes,
                    fits_host=host <= host_bytes,
                    fits=dev <= device_bytes and host <= host_bytes,
                )
            )
    return rows


def largest_fitting(mode: str, device_bytes: float, host_bytes: float, layers=40):
    """The most parameters whose model states fit (modelled, one GPU): the
    smaller of the device's and the host's limits (bytes per parameter)."""
    per_dev = device_need(1e9, mode, layer_params=1e9 / layers) / 1e9
    per_host = host_need(1e9, mode) / 1e9
    limits = [device_bytes / per_dev if per_dev else float("inf")]
    limits.append(host_bytes / per_host if per_host else float("inf"))
    return min(limits)


def paper_13b(device_gb: float = V100_GB, host_gb: float = DGX2_HOST_GB) -> dict:
    """ZeRO-Offload's example recomputed (modelled): 13B parameters on one GPU
    of ``device_gb``, model states only, per mode."""
    out = {}
    for mode in MODEL_STATE_MODES:
        dev = device_need(PAPER_PARAMS, mode, layer_params=PAPER_PARAMS / 40)
        host = host_need(PAPER_PARAMS, mode)
        out[mode] = dict(
            device_gb=dev / GB,
            host_gb=host / GB,
            fits=dev <= device_gb * GB and host <= host_gb * GB,
            largest_b=largest_fitting(mode, device_gb * GB, host_gb * GB) / 1e9,
        )
    return out


def draw_fits(device_gb: float = V100_GB, host_gb: float = DGX2_HOST_GB):
    """Device (top) and host (bottom) bytes of each mode's model states against
    model size (modelled, one GPU, mixed precision), with the memories as lines
    and the paper's 13B marked; a mode fits where both of its lines are below."""
    sizes = [10 ** (8 + k / 20) for k in range(0, 81)]
    colors = dict(zip(MODEL_STATE_MODES, ("#c44e52", "#dd8452", "#55a868", "#4c72b0")))
    fig = InlineFigure(figsize=(WIDTH, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for mode in MODEL_STATE_MODES:
        dev = [device_need(s, mode, layer_params=s / 40) / GB for s in sizes]
        host = [host_need(s, mode) / GB for s in sizes]
        top.plot(sizes, dev, color=colors[mode], label=mode)
        if any(host):
            bottom.plot(sizes, host, color=colors[mode], label=mode)
        limit = largest_fitting(mode, device_gb * GB, host_gb * GB)
        top.plot(limit, min(device_need(limit, mode, layer_params=limit / 40) / GB,
                            device_gb), "o", color=colors[mode])  # fmt: skip
    for ax, limit, name in ((top, device_gb, "device"), (bottom, host_gb, "host")):
        ax.axhline(limit, color="black", linestyle="--", linewidth=1)
        ax.text(sizes[0], limit, f"{limit:g} GB {name}", va="bottom", fontsize=8)
        ax.axvline(PAPER_PARAMS, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    top.text(PAPER_PARAMS, top.get_ylim()[1], " 13B", va="top", fontsize=8)
    top.set_xscale("log")
    top.set_ylabel("device GB (model states)")
    bottom.set_ylabel("host GB")
    bottom.set_xlabel("parameters (modelled: formulas, mixed precision, one GPU)")
    top.set_title(
        "dots: the largest model each mode fits (device and host both)", fontsize=9
    )
    top.legend(fontsize=8, loc="upper left")
    return fig


def fits_widget(live: bool = False):
    """:func:`draw_fits` with the device and host memory as controls.

    Prerendered by default (5 x 5 figures drawn at build time, so the static page's
    sliders work without a kernel); ``live=True`` offers more sizes, redrawn by a
    kernel (a notebook)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    device = [8, 16, 24, 32, 40, 80, 141] if live else [8, 16, 32, 80, 141]
    host = [64, 128, 256, 512, 1000, 1500, 2000]
    if not live:
        host = [128, 512, 1000, 1500, 2000]
    return interactive_figure(
        draw_fits,
        prerender=not live,
        device_gb=w.SelectionSlider(
            options=device, value=V100_GB, description="device GB"
        ),
        host_gb=w.SelectionSlider(
            options=host, value=DGX2_HOST_GB, description="host GB"
        ),
    )


__all__ = [
    "DGX2_HOST_GB",
    "MODES",
    "PAPER_PARAMS",
    "V100_GB",
    "activation_markdown",
    "activation_rows",
    "device_need",
    "draw_fits",
    "draw_pools",
    "draw_step_time",
    "equivalence_markdown",
    "equivalence_rows",
    "fits_rows",
    "fits_widget",
    "host_need",
    "largest_fitting",
    "moved_markdown",
    "moved_rows",
    "paper_13b",
    "peak_of",
    "pool_bars",
    "pools_widget",
    "state_markdown",
    "state_rows",
    "time_rows",
]
