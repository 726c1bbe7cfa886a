/*
 * The planner explorer's page side: controls -> CoursePlanner.estimate (planner.js,
 * the port of utils/planner.py) -> an SVG of device memory per rank by category
 * against the device's memory, the host's bytes, a verdict, bytes per axis, the
 * bubble and the step time. Every number it shows is modelled, and says so.
 *
 * utils/explorer/__init__.py writes the root <div> with a JSON config (the
 * catalogues serialised from Python, the starting values, which controls to show)
 * and an inline script holding planner.js, this file and a call to
 * CourseExplorer.mount(root). No kernel, no network, no dependencies.
 *
 * Hooks for tests/test_explorer.py: every control has data-control="<name>"; the
 * SVG's bars have data-category, data-where ("device"/"host") and data-bytes
 * (exact, as Python's ints print); the verdict has data-fits; an error has
 * data-error (the Python exception's class name).
 */
(function (root) {
  "use strict";
  const P = root.CoursePlanner;

  const STYLE = `
.plx { font-size: 0.9rem; max-width: 100%; box-sizing: border-box;
  margin: 0.5rem 0 1.5rem 0; }
.plx *, .plx *::before, .plx *::after { box-sizing: border-box; }
.plx-title { font-weight: 600; margin: 0 0 0.4rem 0; }
.plx-controls { display: grid; gap: 0.35rem 0.8rem;
  grid-template-columns: repeat(auto-fill, minmax(9.5rem, 1fr));
  margin-bottom: 0.6rem; }
.plx-control { display: flex; flex-direction: column; min-width: 0; }
.plx-control.plx-check { flex-direction: row; align-items: center; gap: 0.4rem; }
.plx-control span { font-size: 0.8rem; opacity: 0.8; }
.plx-control select, .plx-control input[type=number] { width: 100%; min-width: 0;
  max-width: 100%; font: inherit; padding: 0.1rem 0.2rem; }
.plx-verdict { font-weight: 600; margin: 0.4rem 0; }
.plx-verdict[data-fits=true] { color: #2e7d32; }
.plx-verdict[data-fits=false] { color: #c62828; }
.plx-error { color: #c62828; font-family: monospace; white-space: pre-wrap;
  overflow-wrap: anywhere; margin: 0.4rem 0; }
.plx-svg { max-width: 100%; height: auto; display: block; overflow: visible; }
.plx-caption { font-size: 0.85rem; font-weight: 600; margin: 0.2rem 0; }
.plx-tables { display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; }
.plx-box { max-width: 100%; overflow-x: auto; }
.plx table { border-collapse: collapse; margin: 0.3rem 0; font-size: 0.85rem; }
.plx caption { text-align: left; font-weight: 600; caption-side: top; }
.plx td, .plx th { padding: 0.1rem 0.5rem; text-align: right; white-space: nowrap; }
.plx td:first-child, .plx th:first-child { text-align: left; }
.plx .plx-swatch { display: inline-block; width: 0.8em; height: 0.8em;
  margin-right: 0.3em; vertical-align: -0.05em; }
.plx-notes { font-size: 0.8rem; opacity: 0.8; margin: 0.3rem 0 0 0;
  overflow-wrap: anywhere; }
`;

  // ------------------------------------------------------------------ format
  const SI = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
  /** Bytes in decimal units (GB = 10^9 B, as vendors count device memory). */
  function fmtBytes(n) {
    let x = Number(n);
    let i = 0;
    while (x >= 1000 && i < SI.length - 1) {
      x /= 1000;
      i += 1;
    }
    return (i === 0 ? String(x) : x.toPrecision(3)) + " " + SI[i];
  }
  const exact = (n) => BigInt(n).toLocaleString("en-US") + " bytes";
  function fmtSeconds(t) {
    if (t === 0) return "0 s";
    if (t < 1e-3) return (t * 1e6).toPrecision(3) + " µs";
    if (t < 1) return (t * 1e3).toPrecision(3) + " ms";
    return t.toPrecision(3) + " s";
  }
  function fmtCount(n) {
    const x = Number(n);
    for (const [size, unit] of [
      [1e12, "T"],
      [1e9, "B"],
      [1e6, "M"],
    ]) {
      if (x >= size) return (x / size).toPrecision(3) + unit;
    }
    return x.toLocaleString("en-US");
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) {
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---------------------------------------------------------------- controls
  let counter = 0;

  /** The controls, in the order they are shown; `key` is the state's field. */
  function controlSpecs(cat) {
    const sel = (key, label, options) => ({ key, label, kind: "select", options });
    const num = (key, label) => ({ key, label, kind: "number" });
    const opts = (xs) => xs.map((x) => [String(x), String(x)]);
    return [
      sel("model", "model", Object.keys(cat.presets).map((k) => [k, k])),
      num("layers", "layers"),
      num("hidden", "hidden size"),
      num("heads", "attention heads"),
      num("seq_len", "sequence length"),
      num("vocab", "vocabulary"),
      num("dp", "data parallel (dp)"),
      num("tp", "tensor parallel (tp)"),
      num("pp", "pipeline stages (pp)"),
      sel("zero_stage", "ZeRO stage", opts([0, 1, 2, 3])),
      num("micro_batch", "micro-batch (sequences)"),
      num("micro_batches", "micro-batches per step"),
      sel("schedule", "schedule", opts(cat.schedules)),
      num("virtual_stages", "virtual stages (interleaved)"),
      { key: "sequence_parallel", label: "sequence parallel", kind: "check" },
      sel("recompute", "recompute", opts(cat.recomputes)),
      sel("activations", "activations counted as", opts(cat.activation_models)),
      sel("offload", "offload", opts(cat.offloads)),
      sel(
        "convention",
        "bytes per parameter",
        Object.values(cat.conventions).map((c) => [c.key, c.label])
      ),
      sel("cluster", "cluster", Object.keys(cat.clusters).map((k) => [k, k])),
      sel(
        "memory",
        "device memory",
        [["", "the cluster's GPU"]].concat(
          cat.accelerators.map((a) => [a.name, `${a.name} (${a.memory_gb} GB)`])
        )
      ),
    ];
  }

  function buildControl(spec, value, uid) {
    const id = `${uid}-${spec.key}`;
    let input;
    if (spec.kind === "select") {
      input = el("select", { id, "data-control": spec.key });
      for (const [v, label] of spec.options) {
        const option = el("option", { value: v }, label);
        if (v === String(value)) option.selected = true;
        input.append(option);
      }
    } else if (spec.kind === "number") {
      input = el("input", {
        id,
        type: "number",
        min: 1,
        step: 1,
        inputmode: "numeric",
        "data-control": spec.key,
      });
      input.value = String(value);
    } else {
      input = el("input", { id, type: "checkbox", "data-control": spec.key });
      input.checked = Boolean(value);
    }
    const label = el("label", { for: id }, el("span", {}, spec.label));
    const box = el(
      "div",
      { class: "plx-control" + (spec.kind === "check" ? " plx-check" : "") },
      spec.kind === "check" ? input : label,
      spec.kind === "check" ? label : input
    );
    return { box, input };
  }

  /** A number field's value as the planner's checks would see it: an integer, a
   * float, or the raw text when it is not a number. */
  function readNumber(text) {
    const t = text.trim();
    if (t === "" || !Number.isFinite(Number(t))) return t;
    return Number(t);
  }

  // ------------------------------------------------------------------ output
  const MODEL_FIELDS = ["layers", "hidden", "heads", "seq_len", "vocab"];
  const LAYOUT_FIELDS = [
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
  ];
  const DEVICE_CATEGORIES = ["params", "grads", "optimizer", "activations"];
  const CAPTION = "Bytes per rank, worst pipeline stage (modelled)";
  const HOST_CATEGORIES = ["params", "grads", "optimizer"];

  /** The SVG, `width` px wide (drawn at the size it is shown, so its text keeps
   * the page's size): a stacked bar of device bytes by category, one of host
   * bytes, and a dashed line at the device's memory; when the device is more
   * than four times the largest bar, the axis stops at the bars and the line
   * stands at the right edge, marked off the scale. */
  function drawBars(est, memoryBytes, memoryLabel, colors, width) {
    const W = Math.max(260, Math.min(640, Math.floor(width) || 600));
    const left = 50;
    const right = 8;
    const rowH = 22;
    const gap = 10;
    const top0 = 20;
    const rows = [
      ["device", DEVICE_CATEGORIES, est.device],
      ["host", HOST_CATEGORIES, est.host],
    ];
    const H = top0 + rows.length * (rowH + gap);
    const largest = Math.max(Number(est.device.total), Number(est.host.total));
    const memory = Number(memoryBytes);
    const offScale = memory > 4 * largest;
    const axisTop = (offScale ? largest : Math.max(largest, memory)) * 1.15 || 1;
    const scale = (W - left - right) / axisTop;
    const svg = svgEl("svg", {
      class: "plx-svg",
      width: W,
      height: H,
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-label": "modelled bytes per rank by category, device and host",
    });
    const text = (attrs, s) =>
      svgEl("text", Object.assign({ "font-size": 12, fill: "currentColor" }, attrs), s);
    rows.forEach(([where, cats, bytes], r) => {
      const y = top0 + r * (rowH + gap);
      svg.append(text({ x: 0, y: y + rowH / 2 + 4 }, where));
      let x = left;
      for (const c of cats) {
        const w = Number(bytes[c]) * scale;
        const rect = svgEl("rect", {
          x: x.toFixed(2),
          y,
          width: w.toFixed(2),
          height: rowH,
          fill: colors[c],
          "data-category": c,
          "data-where": where,
          "data-bytes": String(bytes[c]),
        });
        const tip = `${where} ${c}: ${fmtBytes(bytes[c])} (modelled)`;
        rect.append(svgEl("title", {}, tip));
        svg.append(rect);
        x += w;
      }
      const label = fmtBytes(bytes.total);
      const inside = x + 6 + 7 * label.length > W;
      svg.append(
        text(
          {
            x: inside ? x - 4 : x + 4,
            y: y + rowH / 2 + 4,
            "font-size": 11,
            "text-anchor": inside ? "end" : "start",
            fill: inside ? "#fff" : "currentColor",
            "data-total": String(bytes.total),
          },
          label
        )
      );
    });
    const mx = offScale ? W - right : left + memory * scale;
    svg.append(
      svgEl("line", {
        x1: mx.toFixed(2),
        x2: mx.toFixed(2),
        y1: top0 - 6,
        y2: top0 + rowH + 4,
        stroke: "currentColor",
        "stroke-dasharray": offScale ? "1 3" : "4 3",
        "stroke-width": 1.5,
        "data-memory-bytes": String(memoryBytes),
      })
    );
    svg.append(
      text(
        { x: mx, y: 11, "font-size": 11, "text-anchor": mx > W / 2 ? "end" : "start" },
        `device memory ${memoryLabel}` + (offScale ? " (off the scale) →" : "")
      )
    );
    return svg;
  }

  function table(caption, head, rows) {
    const t = el("table", {}, el("caption", {}, caption));
    t.append(el("tr", {}, ...head.map((h) => el("th", {}, h))));
    for (const row of rows) t.append(el("tr", {}, ...row));
    return el("div", { class: "plx-box" }, t);
  }
  function bytesCell(n) {
    return el("td", { "data-bytes": String(n), title: exact(n) }, fmtBytes(n));
  }

  function render(out, est, model, cluster, memoryBytes, memoryLabel, colors) {
    const fits = P.fits(est, memoryBytes);
    const verdict = el(
      "p",
      { class: "plx-verdict", "data-fits": String(fits) },
      fits
        ? `Fits: ${fmtBytes(est.device.total)} per GPU of ${memoryLabel} (modelled)`
        : `Does not fit: ${fmtBytes(est.device.total)} per GPU, more than ` +
            `${memoryLabel} (modelled)`
    );
    const swatch = (c) =>
      el("span", { class: "plx-swatch", style: `background:${colors[c]}` });
    const memRows = DEVICE_CATEGORIES.map((c) => [
      el("td", {}, swatch(c), c),
      bytesCell(est.device[c]),
      c in est.host ? bytesCell(est.host[c]) : el("td", {}, "–"),
    ]);
    memRows.push([
      el("th", {}, "total"),
      bytesCell(est.device.total),
      bytesCell(est.host.total),
    ]);
    const memory = table("Memory per rank (modelled)", ["", "device", "host"], memRows);
    const comm = table(
      "Bytes sent per rank per step (modelled)",
      ["axis", "bytes"],
      ["tp", "pp", "dp", "offload"].map((a) => [
        el("td", {}, a),
        bytesCell(est.comm[a]),
      ])
    );
    const st = est.step_time;
    const gpus = est.layout.dp * est.layout.tp * est.layout.pp;
    const time = table(
      `Step time on ${cluster.name} (modelled)`,
      ["part", "seconds"],
      ["compute", "tp", "pp", "dp", "offload", "total"].map((k) => [
        el(k === "total" ? "th" : "td", {}, k),
        el("td", { "data-seconds": String(st[k]) }, fmtSeconds(st[k])),
      ])
    );
    const stages = est.stage_layers;
    const row = (name, value, attrs) => [el("td", {}, name), el("td", attrs, value)];
    const pipe = table("Pipeline (modelled)", ["", ""], [
      row("bubble", (100 * est.bubble).toFixed(1) + " %", {
        "data-bubble": String(est.bubble),
      }),
      row("worst stage", `${est.worst_stage} of ${stages.length}`),
      row("its layers", String(stages[est.worst_stage])),
      row("micro-batches in flight", String(est.in_flight)),
      row("parameters, model", fmtCount(P.numParams(model))),
      row("parameters, this rank", fmtCount(est.params_per_rank)),
      row("GPUs (dp × tp × pp)", `${gpus} (cluster: ${cluster.gpus})`),
    ]);
    const notes = el(
      "p",
      { class: "plx-notes" },
      "All figures modelled by utils.planner (ported to JavaScript): " +
        est.notes.join("; ") +
        `. Step time: ${est.layout.recompute === "full" ? 8 : 6} × parameters × ` +
        "tokens FLOPs at " +
        `${Math.round(cluster.mfu * 100)} % of peak, no communication hidden.` +
        (gpus === cluster.gpus
          ? ""
          : ` The layout uses ${gpus} GPU${gpus === 1 ? "" : "s"}, the cluster ` +
            `has ${cluster.gpus}.`)
    );
    out.replaceChildren(
      verdict,
      el("p", { class: "plx-caption" }, CAPTION),
      drawBars(est, memoryBytes, memoryLabel, colors, out.clientWidth),
      el("div", { class: "plx-tables" }, memory, comm, pipe, time),
      notes
    );
  }

  // ------------------------------------------------------------------- mount
  /** Build the explorer inside `root` from its JSON config and wire it. */
  function mount(rootEl) {
    if (!rootEl || rootEl.dataset.mounted) return;
    rootEl.dataset.mounted = "1";
    const config = JSON.parse(rootEl.querySelector(".plx-config").textContent);
    const cat = config.catalogue;
    const state = Object.assign({}, config.initial);
    const uid = `plx${++counter}-${Math.random().toString(36).slice(2, 8)}`;
    const fallback = rootEl.querySelector(".plx-fallback");
    if (fallback) fallback.remove();

    rootEl.append(el("style", {}, STYLE));
    if (config.title) rootEl.append(el("p", { class: "plx-title" }, config.title));
    const controlsBox = el("div", { class: "plx-controls" });
    const inputs = {};
    for (const spec of controlSpecs(cat)) {
      if (!config.controls.includes(spec.key)) continue;
      const { box, input } = buildControl(spec, state[spec.key], uid);
      inputs[spec.key] = { spec, input };
      controlsBox.append(box);
    }
    const out = el("div", { class: "plx-output", "aria-live": "polite" });
    rootEl.append(controlsBox, out);

    function read() {
      for (const [key, { spec, input }] of Object.entries(inputs)) {
        if (spec.kind === "check") state[key] = input.checked;
        else if (spec.kind === "number") state[key] = readNumber(input.value);
        else if (key === "zero_stage") state[key] = Number(input.value);
        else state[key] = input.value;
      }
    }

    function update() {
      read();
      const preset = cat.presets[state.model];
      const cluster = cat.clusters[state.cluster];
      const acc = cat.accelerators.find((a) => a.name === state.memory);
      const memoryBytes = acc ? acc.memory_bytes : cluster.memory_bytes;
      const memoryLabel = `${acc ? acc.memory_gb : cluster.memory_gb} GB` +
        (acc ? ` (${acc.name})` : "");
      try {
        const fields = Object.assign({}, preset);
        for (const k of MODEL_FIELDS) fields[k] = state[k];
        const model = P.modelSpec(fields);
        const options = { cluster };
        for (const k of LAYOUT_FIELDS) options[k] = state[k];
        const est = P.estimate(model, options, cat.conventions);
        render(out, est, model, cluster, memoryBytes, memoryLabel, cat.colors);
      } catch (err) {
        if (!(err instanceof P.ValueError)) throw err;
        out.replaceChildren(
          el("p", { class: "plx-verdict", "data-fits": "unknown" },
            "This layout cannot run (the planner's check):"),
          el(
            "p",
            { class: "plx-error", "data-error": err.name },
            `${err.name}: ${err.message}`
          )
        );
      }
    }

    function onControl(event) {
      const target = event.target;
      if (target.dataset.control === "model" && target.value !== state.model) {
        // a new preset: its shape replaces the shape fields
        const preset = cat.presets[target.value];
        for (const k of MODEL_FIELDS) {
          if (inputs[k]) inputs[k].input.value = String(preset[k]);
          else state[k] = preset[k];
        }
      }
      update();
    }
    controlsBox.addEventListener("input", onControl);
    controlsBox.addEventListener("change", onControl);
    // fields not shown as controls keep their starting values (read() skips them)
    update();
    // the SVG is drawn at the width it is shown: redraw when that changes (a
    // phone turned sideways, a collapsed cell opened)
    if (typeof ResizeObserver === "function") {
      let lastWidth = out.clientWidth;
      new ResizeObserver(() => {
        if (Math.abs(out.clientWidth - lastWidth) > 16) {
          lastWidth = out.clientWidth;
          update();
        }
      }).observe(out);
    }
  }

  root.CourseExplorer = { mount, fmtBytes, fmtSeconds };
})(typeof globalThis !== "undefined" ? globalThis : this);
