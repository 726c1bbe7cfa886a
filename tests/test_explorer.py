"""The live explorer (``utils.explorer``): its JavaScript planner gives Python's
numbers, and its page answers every control in a real browser, offline.

* Parity: node runs ``utils/explorer/planner.js`` on a grid of layouts (every model
  preset, the course GPT and GPT-3 175B among them, across dp, tp, pp, ZeRO stage,
  offload, recompute, sequence parallelism, schedule, virtual stages, convention and
  cluster, with refused layouts among them) and every number must equal
  ``utils.planner.estimate``'s: integers exactly, floats within 1e-12 relative;
  every refused layout must give Python's exception class and message.
* Browser: a standalone page that :func:`utils.explorer.planner_explorer` writes is
  opened in headless Chromium; every control is changed in turn and the figure (or
  the verdict, or the table it drives) must change, with the bytes drawn equal to
  Python's for the new layout and the page's error equal to Python's; at 390 px
  the page does not scroll sideways; nothing is requested but the page itself.

Node (``apt-get install nodejs``) and Chromium (``apt-get install chromium``) are
needed; without them these tests skip, or fail where ``COURSE_REQUIRE_BROWSER=1``
(CI).

    .venv/bin/python -m pytest tests/test_explorer.py
"""

from __future__ import annotations

import functools
import http.server
import inspect
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import asdict, fields, replace
from fractions import Fraction

import pytest

from tests.test_browser import _Handler, chromium, skip_or_fail, soup
from utils.comm import bus_factor
from utils.explorer import (
    CONTROLS,
    COURSE_GPT,
    PLANNER_JS,
    catalogue,
    planner_explorer,
    presets,
    standalone_page,
)
from utils.hardware import ACCELERATORS, CLUSTERS
from utils.memory_model import (
    BYTES_PER_PARAM_CONVENTIONS,
    convention_state_bytes,
    course_gpt_activation_bytes,
    course_gpt_outside_bytes,
    transformer_activation_bytes,
)
from utils.planner import (
    ACTIVATION_MODELS,
    OFFLOADS,
    PRESETS,
    RECOMPUTES,
    SCHEDULES,
    Estimate,
    ModelSpec,
    _in_flight,
    bubble_fraction,
    estimate,
    narayanan_eq2,
)

REL_TOL = 1e-12
PORTED = {
    "model", "dp", "tp", "pp", "zero_stage", "micro_batch", "micro_batches",
    "virtual_stages", "schedule", "sequence_parallel", "recompute", "offload",
    "convention", "activations", "cluster",
}  # fmt: skip
"""The arguments of ``estimate`` that planner.js knows."""


def node() -> str | None:
    """``$NODE`` if set (only it), else node or nodejs on the PATH."""
    if os.environ.get("NODE"):
        return shutil.which(os.environ["NODE"])
    return shutil.which("node") or shutil.which("nodejs")


# ------------------------------------------------------------------ the grid
def _case(model: dict, **options) -> dict:
    return {"kind": "estimate", "model": model, "options": options}


def parity_grid() -> list[dict]:
    """Cases for both planners, deterministic. Each preset (the course GPT first)
    gets (1) every ZeRO stage x offload x recompute x sequence parallel x
    convention at one mid layout, and (2) dp x tp x pp x schedule x virtual stages
    x micro-batches x micro-batch size, the states cycling through stage, recompute,
    offload and convention; then large layouts (integers past 2^53) and refused
    ones; then the model's parts, the bubble, the activations and the in-flight
    fractions on their own."""
    clusters = list(CLUSTERS)
    convs = list(BYTES_PER_PARAM_CONVENTIONS)
    cases = []
    for spec in presets().values():
        base = asdict(spec)
        for i, (z, off, rc, sp, conv) in enumerate(
            itertools.product(range(4), OFFLOADS, RECOMPUTES, (False, True), convs)
        ):
            cases.append(_case(base, dp=4, tp=2, pp=2, zero_stage=z, micro_batch=2,
                               micro_batches=4, offload=off, recompute=rc,
                               sequence_parallel=sp, convention=conv,
                               cluster=clusters[i % len(clusters)]))  # fmt: skip
        for i, (dp, tp, pp, sch, v, m, b) in enumerate(
            itertools.product(
                (1, 3, 64),
                (1, 2, 8),
                (1, 2, 4, 16),
                SCHEDULES,
                (1, 2),
                (1, 4, 8, 32),
                (1, 2),
            )  # fmt: skip
        ):
            if v > 1 and sch != "interleaved" and i % 8:
                continue  # refused; keep one in eight
            z, rc = i % 4, RECOMPUTES[i % 3]
            off = OFFLOADS[(i // 4) % 3] if z < 3 else OFFLOADS[i % 4]
            act = (
                ACTIVATION_MODELS[(i // 3) % 2]
                if rc == "none"
                else ACTIVATION_MODELS[0]
            )
            cases.append(_case(base, dp=dp, tp=tp, pp=pp, schedule=sch,
                               virtual_stages=v, micro_batches=m, micro_batch=b,
                               zero_stage=z, offload=off, recompute=rc,
                               activations=act,
                               sequence_parallel=bool(i % 2),
                               convention=convs[i % len(convs)],
                               cluster=clusters[i % len(clusters)]))  # fmt: skip
    course = asdict(COURSE_GPT)
    for tp, pp, sp, sch, m, b, dp, z in itertools.product(
        (1, 2, 4), (1, 2), (False, True), SCHEDULES, (1, 2, 4), (1, 3), (1, 2), (0, 3)
    ):
        cases.append(_case(course, dp=dp, tp=tp, pp=pp, sequence_parallel=sp,
                           schedule=sch, micro_batches=m, micro_batch=b,
                           zero_stage=z, activations="course-fp32",
                           convention="fp32-16", cluster="DGX A100 x 1"))  # fmt: skip
    gpt3, t1 = asdict(PRESETS["GPT-3 175B"]), asdict(PRESETS["GPT 1T (Narayanan)"])
    cases += [
        # utils/planner.py's example layout of GPT-3, and the 1T model on 128 stages
        _case(gpt3, dp=8, tp=8, pp=16, zero_stage=1, micro_batches=64,
              recompute="selective", cluster="DGX A100 x 128"),
        _case(t1, dp=6, tp=8, pp=64, micro_batches=128, schedule="interleaved",
              virtual_stages=2, recompute="full", cluster="DGX A100 x 128"),
        # past 2^53: GPipe keeps 1024 micro-batches of 64 sequences
        _case(t1, dp=1024, micro_batch=64, micro_batches=1024, schedule="gpipe",
              zero_stage=3, offload="params", cluster="DGX H100 x 64"),
        _case(gpt3, dp=4096, micro_batch=32, micro_batches=512, pp=96,
              schedule="zb1p", cluster="DGX H100 x 64"),
    ]  # fmt: skip
    small = asdict(PRESETS["GPT 1.7B (Narayanan)"])
    refused = [
        dict(dp=0), dict(tp=-1), dict(pp=0), dict(micro_batch=2.5),
        dict(micro_batches=0), dict(virtual_stages=0), dict(dp=True),
        dict(zero_stage=4), dict(zero_stage=-1), dict(zero_stage=2.5),
        dict(schedule="pipedream"), dict(recompute="partial"), dict(offload="disk"),
        dict(convention="fp8"), dict(sequence_parallel="yes"),
        dict(sequence_parallel=1), dict(tp=5), dict(pp=25),
        dict(virtual_stages=2), dict(schedule="gpipe", virtual_stages=2),
        dict(pp=4, micro_batches=6, schedule="interleaved", virtual_stages=2),
        dict(pp=13, virtual_stages=2, schedule="interleaved", micro_batches=26),
        dict(offload="params", zero_stage=1), dict(activations="fp8"),
        dict(activations="course-fp32", recompute="full"),
    ]  # fmt: skip
    cases += [_case(small, **kw) for kw in refused]
    llama = asdict(PRESETS["Llama 3 8B"])
    cases.append(_case(llama, tp=16))  # key/value heads
    bad_models = [
        dict(hidden=30, heads=4), dict(kv_heads=3, heads=4, hidden=32),
        dict(layers=0), dict(vocab=-3), dict(norm="batch"), dict(tied="no"),
        dict(ffn=0), dict(seq_len=1.5),
    ]  # fmt: skip
    cases += [_case({**small, **kw}) for kw in bad_models]
    cases.append(_case({**small, "ffn": 30}, tp=4))  # the MLP width
    custom = [
        replace(COURSE_GPT, tied=False, final_norm=False),
        replace(COURSE_GPT, norm="rms", biases=False, learned_positions=False),
        ModelSpec(7, 96, 12, 33, 1001, ffn=200, kv_heads=4, gated_mlp=True),
    ]
    for spec in custom:
        for tp, pp, z in itertools.product((1, 2, 4), (1, 3), range(4)):
            cases.append(_case(asdict(spec), tp=tp, pp=pp, dp=3, zero_stage=z,
                               micro_batches=3, cluster="DGX A100 x 1"))  # fmt: skip
    for spec in list(presets().values()) + custom:
        cases.append({"kind": "parts", "model": asdict(spec)})
    for sch, p, m, v in itertools.product(SCHEDULES, (1, 2, 7, 16), (1, 3, 64), (1, 3)):
        cases.append({"kind": "bubble", "args": [sch, p, m, v]})
    for s, b, h, a, n, t, sp, rc in itertools.product(
        (16, 2048), (1, 3), (96, 12288), (3, 96), (0, 1, 7), (1, 3, 8),
        (False, True), RECOMPUTES,
    ):  # fmt: skip
        cases.append({"kind": "activations", "args": [s, b, h, a, n],
                      "options": dict(tp_size=t, sequence_parallel=sp,
                                      recompute=rc)})  # fmt: skip
    for sch, p, m, v in itertools.product(SCHEDULES, (1, 2, 5, 16), (1, 3, 64), (1, 3)):
        for stage in range(p):
            cases.append({"kind": "in_flight", "args": [sch, p, stage, m, v]})
    for conv, n, ws, z in itertools.product(convs, (0, 7, 10**13 + 1), (1, 3, 64),
                                            range(4)):  # fmt: skip
        cases.append({"kind": "states", "args": [conv, n, ws, z]})
    for s, b, h, a, n, t, sp, v, last in itertools.product(
        (16, 2048), (1, 3), (32, 12288), (4, 96), (0, 1, 7), (1, 3, 8),
        (False, True), (64, 50257), (False, True),
    ):  # fmt: skip
        tps = dict(tp_size=t, sequence_parallel=sp)
        cases.append({"kind": "course_acts", "args": [s, b, h, a, n], "options": tps})
        cases.append({"kind": "course_outside", "args": [s, b, h, v],
                      "options": dict(tps, first=False, last=last)})  # fmt: skip
    for n in (1, 2, 3, 64, 1000):
        cases.append({"kind": "bus", "args": ["all_gather", n]})
    cases.append({"kind": "eq2", "args": [128, 25600, 51200, 2048]})
    return cases


# ------------------------------------------------------- what Python says
def _error(e: Exception) -> dict:
    return {"error": type(e).__name__, "message": str(e)}


def python_answer(case: dict):
    kind, args = case["kind"], case.get("args", [])
    try:
        if kind == "estimate":
            opts = dict(case["options"])
            if "cluster" in opts:
                opts["cluster"] = CLUSTERS[opts["cluster"]]
            return asdict(estimate(ModelSpec(**case["model"]), **opts))
        if kind == "parts":
            m = ModelSpec(**case["model"])
            return {"num_params": m.num_params(),
                    "layer_params_split": list(m.layer_params_split()),
                    "layer_params": m.layer_params(),
                    "embedding_params": m.embedding_params(),
                    "head_params": m.head_params(), "ffn_size": m.ffn_size,
                    "kv_size": m.kv_size}  # fmt: skip
        if kind == "bubble":
            return bubble_fraction(*args)
        if kind == "activations":
            return transformer_activation_bytes(*args, **case["options"])
        if kind == "course_acts":
            return course_gpt_activation_bytes(*args, **case["options"])
        if kind == "course_outside":
            return course_gpt_outside_bytes(*args, **case["options"])
        if kind == "in_flight":
            f = Fraction(_in_flight(*args))
            return [f.numerator, f.denominator]
        if kind == "states":
            conv, n, ws, z = args
            return convention_state_bytes(conv, n, world_size=ws,
                                          zero_stage=z).as_dict()  # fmt: skip
        if kind == "bus":
            return bus_factor(*args)
        if kind == "eq2":
            return narayanan_eq2(*args)
    except ValueError as e:
        return _error(e)
    raise AssertionError(f"unknown case kind {kind!r}")


# ---------------------------------------------------------- what node says
DRIVER = r"""
const P = require(process.argv[1]);
const data = JSON.parse(require("fs").readFileSync(0, "utf8"));
const cat = data.catalogue;
function answer(c) {
  const a = c.args || [];
  switch (c.kind) {
    case "estimate": {
      const o = Object.assign({}, c.options);
      if ("cluster" in o) o.cluster = cat.clusters[o.cluster];
      return P.estimate(P.modelSpec(c.model), o, cat.conventions);
    }
    case "parts": {
      const m = P.modelSpec(c.model);
      return { num_params: P.numParams(m), layer_params_split: P.layerParamsSplit(m),
               layer_params: P.layerParams(m), embedding_params: P.embeddingParams(m),
               head_params: P.headParams(m), ffn_size: P.ffnSize(m),
               kv_size: P.kvSize(m) };
    }
    case "bubble": return P.bubbleFraction(...a);
    case "activations": return P.transformerActivationBytes(...a, c.options);
    case "course_acts": return P.courseGptActivationBytes(...a, c.options);
    case "course_outside": return P.courseGptOutsideBytes(...a, c.options);
    case "in_flight": return P.inFlight(...a);
    case "states": return P.conventionStateBytes(cat.conventions[a[0]],
                                                 BigInt(a[1]), a[2], a[3]);
    case "bus": return P.busFactor(...a);
    case "eq2": return P.narayananEq2(...a);
  }
  throw new Error("unknown kind " + c.kind);
}
const out = data.cases.map((c) => {
  try { return { ok: answer(c) }; }
  catch (e) {
    if (e instanceof P.ValueError) return { ok: { error: e.name, message: e.message } };
    return { crash: String(e.stack) };
  }
});
// BigInt -> {"int": "digits"}: exact through JSON
process.stdout.write(JSON.stringify(out, (k, v) =>
  typeof v === "bigint" ? { int: v.toString() } : v));
"""


def run_node(cases: list[dict]) -> list:
    exe = node()
    if exe is None:
        skip_or_fail("no node: apt-get install nodejs (or set NODE)")
    payload = json.dumps({"catalogue": catalogue(), "cases": cases})
    done = subprocess.run([exe, "-e", DRIVER, str(PLANNER_JS)], input=payload,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    crashed = [(c, o["crash"]) for c, o in zip(cases, out) if "crash" in o]
    assert not crashed, f"planner.js crashed (not a ValueError): {crashed[:3]}"
    return [o["ok"] for o in out]


def compare(py, js, path="") -> tuple[list[str], int, int]:
    """Differences between Python's value and node's, and (floats compared,
    floats bit-identical)."""
    if isinstance(js, dict) and set(js) == {"int"}:
        js = int(js["int"])
    if isinstance(py, bool) or py is None or isinstance(py, str):
        return ([] if py == js and type(py) is type(js) else
                [f"{path}: python {py!r}, js {js!r}"]), 0, 0  # fmt: skip
    if isinstance(py, int):
        ok = isinstance(js, int) and not isinstance(js, bool) and py == js
        return ([] if ok else [f"{path}: python {py!r}, js {js!r}"]), 0, 0
    if isinstance(py, float):
        ok = isinstance(js, int | float) and math.isclose(py, js, rel_tol=REL_TOL,
                                                          abs_tol=0.0)  # fmt: skip
        return ([] if ok else [f"{path}: python {py!r}, js {js!r}"]), 1, int(py == js)
    if isinstance(py, dict):
        if not isinstance(js, dict) or set(py) != set(js):
            return [f"{path}: keys {sorted(py)} vs {js!r}"], 0, 0
        diffs, n, same = [], 0, 0
        for k in py:
            d, a, b = compare(py[k], js[k], f"{path}.{k}")
            diffs, n, same = diffs + d, n + a, same + b
        return diffs, n, same
    if isinstance(py, list | tuple):
        if not isinstance(js, list) or len(py) != len(js):
            return [f"{path}: python {py!r}, js {js!r}"], 0, 0
        diffs, n, same = [], 0, 0
        for i, (a_, b_) in enumerate(zip(py, js)):
            d, a, b = compare(a_, b_, f"{path}[{i}]")
            diffs, n, same = diffs + d, n + a, same + b
        return diffs, n, same
    raise AssertionError(f"{path}: cannot compare {py!r}")


# ------------------------------------------------------------------- parity
def test_the_port_knows_every_argument_and_field_of_the_planner():
    """A new argument of ``estimate`` or field of ``Estimate`` must be ported to
    planner.js (and added to the grid) before this passes again."""
    assert set(inspect.signature(estimate).parameters) == PORTED
    assert [f.name for f in fields(Estimate)] == [
        "layout", "stage_layers", "worst_stage", "params_per_rank", "device", "host",
        "comm", "bubble", "in_flight", "convention", "notes", "step_time", "stages",
    ]  # fmt: skip


def test_planner_js_gives_pythons_numbers_and_errors_on_the_grid():
    cases = parity_grid()
    got = run_node(cases)
    diffs, floats, identical = [], 0, 0
    kinds: dict[str, int] = {}
    refused = 0
    for case, js in zip(cases, got):
        py = python_answer(case)
        refused += isinstance(py, dict) and "error" in py
        kinds[case["kind"]] = kinds.get(case["kind"], 0) + 1
        d, n, same = compare(py, js, f"{case['kind']} {json.dumps(case)[:160]}")
        diffs += d
        floats, identical = floats + n, identical + same
    print(f"parity grid: {len(cases)} cases {kinds}, {refused} refused; "
          f"{floats} floats, {identical} bit-identical")  # fmt: skip
    assert not diffs, f"{len(diffs)} differences, first:\n" + "\n".join(diffs[:10])
    # the grid reaches what it claims to: both outcomes, every preset, big numbers
    assert refused > 50 and kinds["estimate"] - refused > 6000


def test_the_grid_reaches_integers_past_2_to_the_53():
    t1 = PRESETS["GPT 1T (Narayanan)"]
    e = estimate(t1, dp=1024, micro_batch=64, micro_batches=1024, schedule="gpipe",
                 zero_stage=3, offload="params")  # fmt: skip
    assert e.device["activations"] > 2**53
    assert any(
        c["kind"] == "estimate" and c["model"] == asdict(t1)
        and c["options"].get("micro_batches") == 1024 for c in parity_grid()
    )  # fmt: skip


# ------------------------------------------------------------------- the page
def test_the_explorer_html_is_self_contained():
    exp = planner_explorer("GPT-3 175B", dp=8, tp=8, pp=16, zero_stage=1,
                           micro_batches=64, recompute="selective")  # fmt: skip
    page = soup(exp._repr_html_())
    assert not page.find_all(src=True) and not page.find_all(href=True)
    assert "http://" not in exp.html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in exp.html.split("<script>", 1)[1]  # no URL in the code
    config = json.loads(page.find("script", type="application/json").string)
    assert config["catalogue"] == json.loads(json.dumps(catalogue()))
    assert config["initial"]["tp"] == 8 and config["controls"] == list(CONTROLS)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(model="GPT-4"), "model must be one of"),
        (dict(cluster="my laptop"), "cluster must be one of"),
        (dict(memory="A200"), "memory must be one of"),
        (dict(controls=("dp", "colour")), "controls must be one of"),
        (dict(pipeline=2), "the layout takes"),
        (dict(tp=5, model="GPT 1.7B (Narayanan)"), "tp=5 must divide"),
    ],
)
def test_planner_explorer_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        planner_explorer(**kwargs)


START = dict(dp=8, tp=8, pp=16, zero_stage=1, micro_batches=64,
             recompute="selective")  # fmt: skip
"""The page's starting layout, GPT-3 175B as utils/planner.py's docstring lays it
out: every control changes what is shown there (sequence parallelism too: tp > 1)."""

HARNESS = """<!doctype html><html><body style="margin:0">
<iframe id="page" src="explorer.html" width="{width}" height="1400"
 style="border:0"></iframe>
<pre id="result">pending</pre>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", () => {{
  const doc = frame.contentDocument, win = frame.contentWindow;
  const out = doc.querySelector(".plx-output");
  const bars = () => Object.fromEntries([...doc.querySelectorAll("rect[data-bytes]")]
    .map(r => [r.dataset.where + "." + r.dataset.category, r.dataset.bytes]));
  const snap = () => ({{
    svg: (doc.querySelector(".plx-svg") || {{outerHTML: ""}}).outerHTML,
    verdict: (doc.querySelector(".plx-verdict") || {{}}).textContent,
    fits: (doc.querySelector(".plx-verdict") || {{dataset: {{}}}}).dataset.fits,
    all: out.innerHTML, bars: bars(),
    error: (doc.querySelector(".plx-error") || {{}}).textContent || null,
    seconds: [...doc.querySelectorAll("[data-seconds]")].map(e => e.dataset.seconds),
    bubble: (doc.querySelector("[data-bubble]") || {{dataset: {{}}}}).dataset.bubble,
  }});
  const fire = (input) => {{
    input.dispatchEvent(new Event("input", {{bubbles: true}}));
    input.dispatchEvent(new Event("change", {{bubbles: true}}));
  }};
  const set = (input, value) => {{
    if (input.type === "checkbox") input.checked = value; else input.value = value;
    fire(input);
  }};
  const get = (input) => input.type === "checkbox" ? input.checked : input.value;
  const start = snap(), changes = [];
  for (const input of doc.querySelectorAll("[data-control]")) {{
    const before = get(input);
    let value;
    if (input.type === "checkbox") value = !before;
    else if (input.tagName === "SELECT")
      value = input.options[(input.selectedIndex + 1) % input.options.length].value;
    else value = String(Number(before) + 1);
    set(input, value);
    const after = snap();
    changes.push({{control: input.dataset.control, from: before, to: value,
      svg: after.svg !== start.svg, verdict: after.verdict !== start.verdict,
      all: after.all !== start.all,
      seconds: after.seconds.join() !== start.seconds.join(),
      bubble: after.bubble !== start.bubble,
      bars: after.bars, fits: after.fits, error: after.error}});
    set(input, before);
    if (snap().all !== start.all) changes[changes.length - 1].restored = false;
  }}
  document.getElementById("result").textContent = JSON.stringify({{
    start, changes, innerWidth: win.innerWidth,
    scrollWidth: doc.documentElement.scrollWidth,
    svgWidth: doc.querySelector(".plx-svg").getBoundingClientRect().width,
    controls: doc.querySelectorAll("[data-control]").length}});
}});
</script></body></html>"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``open(harness_html) -> result dict`` over a folder holding the explorer's
    standalone page, served on 127.0.0.1 with every other host unresolvable."""
    exe = chromium()
    if exe is None:
        skip_or_fail("no Chromium: apt-get install chromium (or set CHROMIUM)")
    folder = tmp_path_factory.mktemp("explorer")
    exp = planner_explorer("GPT-3 175B", **START)
    (folder / "explorer.html").write_text(standalone_page(exp))
    handler = type("Handler", (_Handler,), {"requests": [], "extra": {}})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"

    def open_harness(width: int) -> dict:
        handler.extra["/harness.html"] = HARNESS.format(width=width)
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [exe, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--enable-logging=stderr", "--v=0",
                 "--virtual-time-budget=20000", "--dump-dom",
                 f"{base}/harness.html"],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
        console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln]
        errors = [ln for ln in console if "Uncaught" in ln or "Error" in ln]
        assert not errors, "console errors:\n" + "\n".join(errors)
        text = soup(done.stdout).find("pre", id="result").string
        assert text != "pending", f"the harness did not finish: {done.stderr[-2000:]}"
        return json.loads(text)

    open_harness.requests = handler.requests
    try:
        yield open_harness
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _device_host(e) -> dict:
    out = {f"device.{c}": str(e.device[c])
           for c in ("params", "grads", "optimizer", "activations")}  # fmt: skip
    out.update({f"host.{c}": str(e.host[c]) for c in ("params", "grads", "optimizer")})
    return out


def _python_after(control: str, value: str):
    """Python's estimate (or its ValueError) for the start layout with one control
    changed the way the harness changed it."""
    model, layout = PRESETS["GPT-3 175B"], dict(START)
    cluster, memory = CLUSTERS["DGX A100 x 128"], None
    if control == "model":
        model = presets()[value]
    elif control in ("layers", "hidden", "heads", "seq_len", "vocab"):
        try:
            model = replace(model, **{control: int(value)})
        except ValueError as e:
            return e, None
    elif control == "cluster":
        cluster = CLUSTERS[value]
    elif control == "memory":
        memory = next(a for a in ACCELERATORS if a.name == value)
    elif control in (
        "sequence_parallel",
        "schedule",
        "recompute",
        "activations",
        "offload",
        "convention",
    ):
        layout[control] = value
    else:
        layout[control] = int(value)
    try:
        e = estimate(model, cluster=cluster, **layout)
    except ValueError as err:
        return err, None
    return e, (memory.memory_bytes if memory else cluster.memory_bytes)


TABLE_ONLY = {"cluster": "seconds", "micro_batches": "bubble"}
"""Controls that leave the memory alone at the start layout, and what they change:
every cluster has 80 GB GPUs; 1F1B holds p = 16 micro-batches whatever m is."""


def test_every_control_changes_the_figure_with_pythons_numbers(served):
    del served.requests[:]
    result = served(1000)
    assert result["controls"] == len(CONTROLS)
    start = estimate(PRESETS["GPT-3 175B"], cluster=CLUSTERS["DGX A100 x 128"], **START)
    assert result["start"]["bars"] == _device_host(start)
    assert result["start"]["fits"] == str(start.fits(80 * 10**9)).lower()
    for change in result["changes"]:
        name = change["control"]
        assert change.get("restored", True), f"{name}: changing it back did not"
        assert change["all"], f"{name}: the output did not change: {change}"
        if name in TABLE_ONLY:
            assert change[TABLE_ONLY[name]], f"{name}: its table did not change"
        else:
            assert change["svg"] or change["verdict"], f"{name}: figure unchanged"
        want, memory_bytes = _python_after(name, change["to"])
        if isinstance(want, ValueError):
            assert change["error"] == f"{type(want).__name__}: {want}", name
        else:
            assert change["error"] is None, f"{name}: {change['error']}"
            assert change["bars"] == _device_host(want), name
            assert change["fits"] == str(want.fits(memory_bytes)).lower(), name
    errors = [c["control"] for c in result["changes"] if c["error"]]
    assert errors, "no change was refused: the error path went untested"
    paths = {p for p, _ in served.requests}
    assert paths <= {"/harness.html", "/explorer.html", "/favicon.ico"}, paths


def test_the_explorer_fits_a_phone_screen(served):
    result = served(390)
    assert result["innerWidth"] == 390
    assert result["scrollWidth"] <= result["innerWidth"], result["scrollWidth"]
    assert 300 <= result["svgWidth"] <= 390
