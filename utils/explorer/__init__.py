"""Explorers that stay live in the static book: the planner, run in the browser.

The published book is static HTML, where no Python callback can run. So the planner
explorer (chapter 7, and any chapter that wants "does it fit", ZeRO or offload with
a subset of its controls) is a JavaScript port of the planner that answers its
controls in the page itself, with no kernel and nothing fetched:

``planner.js``    ``utils.planner.estimate`` and everything it calls, ported function
                  by function (pure, no DOM; ``require`` it from node);
``explorer.js``   the controls, an SVG of device memory per rank by category against
                  the device's memory, the tables; every number labelled modelled;
this module       the HTML: a ``<div>`` with the catalogues serialised from the Python
                  ones (so the JavaScript copies no data), and an inline ``<script>``
                  holding the two files.

``tests/test_explorer.py`` keeps the port honest: node runs ``planner.js`` on a grid
of layouts and every number must equal Python's (integers exactly, floats to 1e-12),
every refused layout must give Python's message; headless Chromium clicks every
control of a built page and checks that the figure follows.

In a chapter (myst-nb writes a cell's ``text/html`` output into the page as it is,
scripts included; live Jupyter runs the script as well)::

    from utils.explorer import planner_explorer
    planner_explorer("GPT-3 175B", dp=8, tp=8, pp=16, zero_stage=1,
                     micro_batches=64, recompute="selective")

    # a ZeRO explorer: the same machinery, three controls shown
    planner_explorer("GPT 1.7B (Narayanan)", dp=64, zero_stage=3,
                     controls=("model", "dp", "zero_stage", "convention", "memory"))
"""

from __future__ import annotations

import html
import inspect
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.checks import check_choice
from utils.hardware import ACCELERATORS, CLUSTERS
from utils.memory_model import BYTES_PER_PARAM_CONVENTIONS
from utils.planner import (
    ACTIVATION_MODELS,
    OFFLOADS,
    PRESETS,
    RECOMPUTES,
    SCHEDULES,
    ModelSpec,
    estimate,
)
from utils.plots import CATEGORY_COLORS

__all__ = [
    "CONTROLS",
    "COURSE_GPT",
    "Explorer",
    "catalogue",
    "js_source",
    "planner_explorer",
    "presets",
    "standalone_page",
]

HERE = Path(__file__).resolve().parent
PLANNER_JS = HERE / "planner.js"
EXPLORER_JS = HERE / "explorer.js"

CONTROLS = (
    "model",
    "layers",
    "hidden",
    "heads",
    "seq_len",
    "vocab",
    "dp",
    "tp",
    "pp",
    "zero_stage",
    "micro_batch",
    "micro_batches",
    "schedule",
    "virtual_stages",
    "sequence_parallel",
    "recompute",
    "activations",
    "offload",
    "convention",
    "cluster",
    "memory",
)
"""Every control of the planner explorer, in the order shown (``explorer.js``)."""

MODEL_FIELDS = ("layers", "hidden", "heads", "seq_len", "vocab")
"""The ``ModelSpec`` fields the explorer lets a reader change."""

LAYOUT_FIELDS = tuple(
    name
    for name in inspect.signature(estimate).parameters
    if name not in ("model", "cluster")
)
"""The keyword arguments of ``utils.planner.estimate`` that the explorer sets."""


def _course_gpt() -> ModelSpec:
    """The course's GPT (``utils.models.GPTConfig()``'s defaults) as a ModelSpec:
    learned positions, biases, LayerNorm, a 4h MLP, tied embeddings, as
    ``tests/test_planner.py`` checks against ``count_params(GPT(cfg))``."""
    from utils.models import GPTConfig

    cfg = GPTConfig()
    return ModelSpec(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len,
                     cfg.vocab_size, tied=cfg.tie_weights,
                     name="course GPT (utils.models)")  # fmt: skip


COURSE_GPT = _course_gpt()
"""The model the labs train, so the explorer can show the labs' own layouts."""


def presets() -> dict[str, ModelSpec]:
    """The explorer's models: the course GPT, then ``utils.planner.PRESETS``."""
    return {COURSE_GPT.name: COURSE_GPT, **PRESETS}


def catalogue() -> dict:
    """Everything the page needs from Python, as JSON-ready data: model presets,
    bytes-per-parameter conventions, clusters (with the derived numbers the planner
    reads: ``memory_bytes``, ``peak_flops``, bytes per second of each link),
    accelerators, the planner's choices and the course's category colours."""
    clusters = {}
    for name, c in CLUSTERS.items():
        d = asdict(c)
        for prop in ("gpus", "memory_bytes", "peak_flops", "intra_node_bytes_per_s",
                     "inter_node_bytes_per_s", "host_bytes_per_s"):  # fmt: skip
            d[prop] = getattr(c, prop)
        clusters[name] = d
    return {
        "presets": {name: asdict(m) for name, m in presets().items()},
        "conventions": {
            key: {**asdict(c), "bytes_per_param": c.bytes_per_param}
            for key, c in BYTES_PER_PARAM_CONVENTIONS.items()
        },
        "clusters": clusters,
        "accelerators": [
            {**asdict(a), "memory_bytes": a.memory_bytes} for a in ACCELERATORS
        ],
        "schedules": list(SCHEDULES),
        "recomputes": list(RECOMPUTES),
        "offloads": list(OFFLOADS),
        "activation_models": list(ACTIVATION_MODELS),
        "colors": dict(CATEGORY_COLORS),
    }


def js_source() -> str:
    """``planner.js`` then ``explorer.js``, as the page's inline script runs them."""
    code = PLANNER_JS.read_text() + "\n" + EXPLORER_JS.read_text()
    for bad in ("</script", "<!--", "<script"):  # would end or escape the element
        if bad in code.lower():
            raise ValueError(f"the explorer's JavaScript may not contain {bad!r}")
    return code


def _json_for_script(data) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` as
    ``\\u`` escapes, so no string in it can close or comment out the element."""
    text = json.dumps(data, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class Explorer:
    """A live explorer: a cell that returns it shows it (``_repr_html_``)."""

    html: str
    summary: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.summary


_ids = itertools.count(1)


def planner_explorer(
    model: str | ModelSpec = "GPT-3 175B",
    *,
    cluster: str = "DGX A100 x 128",
    memory: str | None = None,
    controls=CONTROLS,
    title: str | None = "The planner (modelled): a layout's memory, bytes and time",
    **layout,
) -> Explorer:
    """The planner explorer, starting at ``model`` (a preset's name or a ModelSpec)
    laid out as ``layout`` (keyword arguments of ``utils.planner.estimate``: dp, tp,
    pp, zero_stage, micro_batch, micro_batches, virtual_stages, schedule,
    sequence_parallel, recompute, activations, offload, convention) on ``cluster``
    (a key of ``utils.hardware.CLUSTERS``), with the fit judged against ``memory`` (an
    accelerator's name from ``utils.hardware.ACCELERATORS``; None: the cluster's
    GPU). ``controls`` names the controls to show (of :data:`CONTROLS`); the others
    stay at their starting values. The starting layout must be one the planner
    accepts: the cell fails with the planner's error otherwise.
    """
    models = presets()
    if isinstance(model, ModelSpec):
        models[model.name] = model
        spec = model
    else:
        check_choice("model", model, tuple(models))
        spec = models[model]
    check_choice("cluster", cluster, tuple(CLUSTERS))
    if memory is not None:
        check_choice("memory", memory, tuple(a.name for a in ACCELERATORS))
    controls = tuple(controls)
    for name in controls:
        check_choice("controls", name, CONTROLS)
    unknown = sorted(set(layout) - set(LAYOUT_FIELDS))
    if unknown:
        raise ValueError(
            f"planner_explorer got {unknown}: the layout takes {LAYOUT_FIELDS}"
        )
    est = estimate(spec, cluster=CLUSTERS[cluster], **layout)  # fails loudly here
    initial = {
        "model": spec.name,
        **{k: getattr(spec, k) for k in MODEL_FIELDS},
        **est.layout,
        "activations": est.layout.get("activations", "korthikanti-16"),
        "convention": est.convention,
        "cluster": cluster,
        "memory": memory or "",
    }
    cat = catalogue()
    cat["presets"] = {name: asdict(m) for name, m in models.items()}
    config = {"catalogue": cat, "initial": initial, "controls": list(controls),
              "title": title}  # fmt: skip
    root = f"course-planner-explorer-{next(_ids)}"
    body = (
        f'<div class="plx course-explorer" id="{root}" data-explorer="planner">'
        f'<script type="application/json" class="plx-config">'
        f"{_json_for_script(config)}</script>"
        '<p class="plx-fallback">The planner explorer runs in your browser and needs '
        "JavaScript (in a notebook that is not trusted, run the cell again).</p>"
        "</div>\n<script>\n"
        f"{js_source()}\n"
        "(function () {\n"
        "  var s = document.currentScript;\n"
        "  var root = (s && s.previousElementSibling) || "
        f"document.getElementById({json.dumps(root)});\n"
        "  CourseExplorer.mount(root);\n"
        "})();\n</script>"
    )
    summary = (
        f"planner_explorer({spec.name!r}, cluster={cluster!r}, "
        f"{', '.join(f'{k}={v!r}' for k, v in est.layout.items())}): "
        f"{est.device['total']} device bytes per rank (modelled)"
    )
    return Explorer(html=body, summary=summary)


def standalone_page(*explorers: Explorer, title: str = "Planner explorer") -> str:
    """A complete HTML document holding ``explorers`` (the browser test opens one;
    it is also a quick way to look at an explorer outside the book)."""
    inner = "\n".join(e.html for e in explorers)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        f'<body style="margin:8px;font-family:sans-serif">\n{inner}\n</body></html>'
    )
