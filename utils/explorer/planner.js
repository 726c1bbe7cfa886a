/*
 * The course's analytic planner in JavaScript: a port of utils/planner.py and of
 * the pieces it uses from utils/memory_model.py (convention_state_bytes,
 * transformer_activation_bytes, course_gpt_activation_bytes,
 * course_gpt_outside_bytes), utils/comm.py (bus_factor) and utils/checks.py
 * (the error messages), so that the planner explorer answers its controls in the
 * static book, with no kernel (utils/explorer/__init__.py embeds it).
 *
 * Python is the source of truth. tests/test_explorer.py runs this file in node on
 * a grid of layouts and requires the same numbers (integers equal, floats within
 * 1e-12) and the same error messages. Each function names the Python function it
 * ports and keeps its structure; the sources of the formulas are cited in the
 * Python docstrings and repeated here in short.
 *
 * Numbers: parameters, bytes and elements are BigInt, exact past 2^53 as Python's
 * ints are; the fractions (Korthikanti's bytes per token, micro-batches in flight)
 * are exact rationals of BigInts, as Python's Fraction; floats (the bubble, the
 * step time) repeat Python's operations in Python's order.
 *
 * Data is not copied here: the bytes-per-parameter conventions and the clusters
 * come from the Python catalogues, serialised by utils/explorer/__init__.py.
 *
 * ES2017 plus BigInt (ES2020); no DOM, no dependencies. In node:
 *   const planner = require("./planner.js");
 */
(function (root) {
  "use strict";

  const SCHEDULES = ["gpipe", "1f1b", "interleaved", "zb1p"];
  const RECOMPUTES = ["none", "selective", "full"];
  const OFFLOADS = ["none", "optimizer", "optimizer+grads", "params"];
  const ACTIVATION_MODELS = ["korthikanti-16", "course-fp32"];
  const ACTIVATION_BYTES = 2n; // planner.ACTIVATION_BYTES: 16-bit on the wire

  // ------------------------------------------------ errors (utils/checks.py)
  class ValueError extends Error {
    constructor(message) {
      super(message);
      this.name = "ValueError";
    }
  }
  /** planner.LayoutError: a layout that cannot run this model. */
  class LayoutError extends ValueError {
    constructor(message) {
      super(message);
      this.name = "LayoutError";
    }
  }

  function isInt(x) {
    return typeof x === "bigint" || (typeof x === "number" && Number.isInteger(x));
  }

  /** Python's repr() of the values the checks print. */
  function pyRepr(x) {
    if (x === null || x === undefined) return "None";
    if (x === true) return "True";
    if (x === false) return "False";
    if (typeof x === "bigint") return x.toString();
    if (typeof x === "number") {
      if (Number.isInteger(x)) return String(x);
      if (Number.isNaN(x)) return "nan";
      if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
      return String(x);
    }
    if (typeof x === "string") {
      if (x.includes("'") && !x.includes('"')) return '"' + x + '"';
      return "'" + x.replace(/\\/g, "\\\\").replace(/'/g, "\\'") + "'";
    }
    if (Array.isArray(x)) {
      const items = x.map(pyRepr);
      return "(" + items.join(", ") + (items.length === 1 ? ",)" : ")");
    }
    return String(x);
  }

  function pyType(x) {
    if (x === null || x === undefined) return "NoneType";
    if (typeof x === "boolean") return "bool";
    if (isInt(x)) return "int";
    if (typeof x === "number") return "float";
    if (typeof x === "string") return "str";
    return typeof x;
  }

  /** checks.check_int */
  function checkInt(name, value, minimum = 1, maximum = null) {
    const allowed =
      maximum === null ? `>= ${minimum}` : `in [${minimum}, ${maximum}]`;
    if (typeof value === "boolean" || !isInt(value)) {
      throw new ValueError(
        `${name} must be an integer ${allowed}, got ${pyRepr(value)} ` +
          `(${pyType(value)})`
      );
    }
    if (value < minimum) {
      throw new ValueError(
        `${name} must be an integer >= ${minimum}, got ${pyRepr(value)}`
      );
    }
    if (maximum !== null && value > maximum) {
      throw new ValueError(
        `${name} must be an integer <= ${maximum}, got ${pyRepr(value)}`
      );
    }
    return Number(value);
  }

  /** checks.check_choice */
  function checkChoice(name, value, choices) {
    const ok = choices.some(
      (c) => value === c && (typeof value === "boolean") === (typeof c === "boolean")
    );
    if (!ok) {
      throw new ValueError(
        `${name} must be one of ${pyRepr(choices)}, got ${pyRepr(value)}`
      );
    }
  }

  /** checks.check_bool */
  function checkBool(name, value) {
    if (typeof value !== "boolean") {
      throw new ValueError(`${name} must be True or False, got ${pyRepr(value)}`);
    }
    return value;
  }

  // ------------------------------------------------ exact integers and fractions
  const big = (x) => BigInt(x);
  const b01 = (flag) => (flag ? 1n : 0n); // Python's True * n
  /** -(-a // b): ceil for a >= 0, b > 0 */
  const ceilDiv = (a, b) => (a + b - 1n) / b;

  function gcd(a, b) {
    a = a < 0n ? -a : a;
    while (b) [a, b] = [b, a % b];
    return a;
  }
  /** A tiny fractions.Fraction: n / d with d > 0, kept in lowest terms. */
  function frac(n, d = 1n) {
    n = big(n);
    d = big(d);
    if (d < 0n) [n, d] = [-n, -d];
    const g = gcd(n, d) || 1n;
    return { n: n / g, d: d / g };
  }
  const fadd = (x, y) => frac(x.n * y.d + y.n * x.d, x.d * y.d);
  const fmul = (x, y) => frac(x.n * y.n, x.d * y.d);
  const fdiv = (x, y) => frac(x.n * y.d, x.d * y.n);
  /** math.ceil of a Fraction */
  function fceil(x) {
    const q = x.n / x.d; // truncates toward zero
    return x.n % x.d !== 0n && x.n > 0n ? q + 1n : q;
  }

  // ----------------------------------------------------- comm.bus_factor
  /** nccl-tests' busbw/algbw factor (utils/comm.py, _FACTORS). */
  function busFactor(op, worldSize) {
    const n = worldSize;
    const factors = {
      all_reduce: () => (2 * (n - 1)) / n,
      reduce_scatter: () => (n - 1) / n,
      all_gather: () => (n - 1) / n,
      all_to_all: () => (n - 1) / n,
      broadcast: () => 1.0,
      reduce: () => 1.0,
    };
    if (!(op in factors)) {
      throw new ValueError(
        `unknown collective ${pyRepr(op)}; expected one of ` +
          pyRepr(Object.keys(factors))
      );
    }
    checkInt("world_size", worldSize);
    return factors[op]();
  }

  // ------------------------------------------------------ the model (ModelSpec)
  const SPEC_DEFAULTS = {
    ffn: null,
    kv_heads: null,
    gated_mlp: false,
    tied: true,
    learned_positions: true,
    biases: true,
    norm: "layer",
    final_norm: true,
    name: "custom",
  };

  /** planner.ModelSpec(...): the fields as a frozen object, checked as
   * ModelSpec.__post_init__ checks them (same order, same messages). */
  function modelSpec(fields) {
    const m = Object.assign({}, SPEC_DEFAULTS, fields);
    for (const key of ["layers", "hidden", "heads", "seq_len", "vocab"]) {
      checkInt(`ModelSpec.${key}`, m[key], 1);
    }
    if (m.ffn !== null) checkInt("ModelSpec.ffn", m.ffn, 1);
    if (m.kv_heads !== null) {
      checkInt("ModelSpec.kv_heads", m.kv_heads, 1);
      if (m.heads % m.kv_heads) {
        throw new ValueError(
          `ModelSpec.kv_heads=${m.kv_heads} must divide heads=${m.heads}`
        );
      }
    }
    for (const key of [
      "gated_mlp",
      "tied",
      "learned_positions",
      "biases",
      "final_norm",
    ]) {
      checkBool(`ModelSpec.${key}`, m[key]);
    }
    checkChoice("ModelSpec.norm", m.norm, ["layer", "rms"]);
    if (m.hidden % m.heads) {
      throw new ValueError(
        `ModelSpec.hidden=${m.hidden} must divide by heads=${m.heads}`
      );
    }
    return Object.freeze(m);
  }

  /** ModelSpec.ffn_size: the MLP's inner width (4h unless given). */
  const ffnSize = (m) => big(m.ffn !== null ? m.ffn : 4 * m.hidden);
  /** ModelSpec.kv_size: key/value width (grouped-query attention). */
  const kvSize = (m) =>
    big(m.kv_heads !== null ? m.kv_heads : m.heads) * big(m.hidden / m.heads);
  /** ModelSpec._norm: LayerNorm 2h, RMSNorm h. */
  const normParams = (m) => (m.norm === "layer" ? 2n : 1n) * big(m.hidden);

  /** ModelSpec.layer_params_split: [split by tp, replicated] of one block
   * (Megatron-LM's split, Shoeybi et al. 2019, section 3). */
  function layerParamsSplit(m) {
    const h = big(m.hidden);
    const f = ffnSize(m);
    const kv = kvSize(m);
    const bias = b01(m.biases);
    const qkv = h * (h + 2n * kv) + bias * (h + 2n * kv);
    const fc = (m.gated_mlp ? 2n : 1n) * (h * f + bias * f);
    const split = qkv + h * h + fc + f * h;
    const replicated = bias * 2n * h + 2n * normParams(m);
    return [split, replicated];
  }
  const layerParams = (m) => layerParamsSplit(m).reduce((a, b) => a + b, 0n);
  /** ModelSpec.embedding_params: token embedding and learned positions. */
  const embeddingParams = (m) =>
    big(m.vocab) * big(m.hidden) +
    b01(m.learned_positions) * (big(m.seq_len) * big(m.hidden));
  /** ModelSpec.head_params: the output layer (none when tied), the final norm. */
  const headParams = (m) =>
    b01(!m.tied) * big(m.vocab) * big(m.hidden) + b01(m.final_norm) * normParams(m);
  /** ModelSpec.num_params: every parameter once. */
  const numParams = (m) =>
    embeddingParams(m) + big(m.layers) * layerParams(m) + headParams(m);

  /** planner.narayanan_eq2: 12lh^2 + 13lh + (V + s)h (Narayanan et al. 2021). */
  function narayananEq2(layers, hidden, vocab, seqLen) {
    const [l, h] = [big(layers), big(hidden)];
    return 12n * l * h * h + 13n * l * h + (big(vocab) + big(seqLen)) * h;
  }

  // ------------------------------------------------------------- the bubble
  /** planner.bubble_fraction: GPipe/1F1B (p-1)/(m+p-1); interleaved
   * (p-1)/(vm+p-1) (Narayanan et al. 2021, 2.2); ZB-H1 (p-1)/(3m+p-1) (Qi et
   * al. 2024, 2.1). */
  function bubbleFraction(schedule, pp, microBatches, v = 1) {
    checkChoice("schedule", schedule, SCHEDULES);
    checkInt("pp", pp, 1);
    checkInt("micro_batches", microBatches, 1);
    checkInt("v", v, 1);
    const [p, m] = [pp, microBatches];
    if (schedule === "interleaved") return (p - 1) / (v * m + p - 1);
    if (schedule === "zb1p") return (p - 1) / (3 * m + p - 1);
    return (p - 1) / (m + p - 1);
  }

  // ----------------------------------------------- memory_model: model states
  /** memory_model.convention_state_bytes: each state replicated below its
   * sharded_from_stage, ceil(n / world_size) elements per rank from it on. */
  function conventionStateBytes(conv, nParams, worldSize = 1, zeroStage = 0) {
    checkInt("world_size", worldSize, 1);
    const shard = ceilDiv(nParams, big(worldSize));
    const out = { params: 0n, grads: 0n, optimizer: 0n };
    for (const c of conv.components) {
      const numel = zeroStage >= c.sharded_from_stage ? shard : nParams;
      out[c.category] += big(c.bytes_per_param) * numel;
    }
    return out;
  }

  // ------------------------------------------------ memory_model: activations
  /** memory_model.transformer_activation_bytes: Korthikanti et al. 2022, Table 2,
   * per layer sbh(10 + 24/t + 5as/(ht)); with sequence parallelism 34/t for the
   * first two terms; selective recompute drops 5as/(ht); full keeps sbh*2. */
  function transformerActivationBytes(
    seqLen,
    microBatch,
    hidden,
    heads,
    layers = 1,
    { tp_size = 1, sequence_parallel = false, recompute = "none" } = {}
  ) {
    for (const [name, value] of [
      ["seq_len", seqLen],
      ["micro_batch", microBatch],
      ["hidden", hidden],
      ["heads", heads],
      ["tp_size", tp_size],
    ]) {
      checkInt(name, value, 1);
    }
    checkInt("layers", layers, 0);
    checkBool("sequence_parallel", sequence_parallel);
    if (!RECOMPUTES.includes(recompute)) {
      throw new ValueError(
        `recompute must be one of ${pyRepr(RECOMPUTES)}, got ${pyRepr(recompute)}`
      );
    }
    const [s, b, h, a] = [seqLen, microBatch, hidden, heads].map(big);
    const t = frac(tp_size);
    const attention = fdiv(frac(5n * a * s), fmul(frac(h), t)); // 5as/(ht)
    let perToken;
    if (recompute === "full") {
      perToken = frac(2);
    } else {
      const linear = sequence_parallel
        ? fdiv(frac(34), t)
        : fadd(frac(10), fdiv(frac(24), t));
      perToken = recompute === "none" ? fadd(linear, attention) : linear;
    }
    return fceil(fmul(frac(s * b * h * big(layers)), perToken));
  }

  /** memory_model.course_gpt_activation_bytes: the course GPT's blocks as its CPU
   * labs run them (no dropout, fused attention keeping a per-row log-sum-exp),
   * e bytes per element; per block s b h (4 + 12/t) + 4 s b, with sequence
   * parallelism s b h (2 + 14/t) + 4 s b / t, plus a s b / t fp32 numbers. */
  function courseGptActivationBytes(
    seqLen,
    microBatch,
    hidden,
    heads,
    layers = 1,
    { tp_size = 1, sequence_parallel = false, bytes_per_element = 4 } = {}
  ) {
    for (const [name, value] of [
      ["seq_len", seqLen],
      ["micro_batch", microBatch],
      ["hidden", hidden],
      ["heads", heads],
      ["tp_size", tp_size],
      ["bytes_per_element", bytes_per_element],
    ]) {
      checkInt(name, value, 1);
    }
    checkInt("layers", layers, 0);
    checkBool("sequence_parallel", sequence_parallel);
    const [s, b, h, a, t, e] = [seqLen, microBatch, hidden, heads, tp_size,
      bytes_per_element].map(big);
    const lse = (4n * a * s * b) / t; // fp32 in both precisions
    let block;
    if (sequence_parallel) {
      block = e * (2n * s * b * h + (14n * s * b * h) / t + (4n * s * b) / t) + lse;
    } else {
      block = e * (4n * s * b * h + (12n * s * b * h) / t + 4n * s * b) + lse;
    }
    return big(layers) * block;
  }

  /** memory_model.course_gpt_outside_bytes: the stage's input (split along the
   * sequence with sequence parallelism) and, on the last stage, the final norm's
   * output and the loss's fp32 softmax of vocab / t logits. */
  function courseGptOutsideBytes(
    seqLen,
    microBatch,
    hidden,
    vocab,
    { last, tp_size = 1, sequence_parallel = false, bytes_per_element = 4 }
  ) {
    const [s, b, h, t, e] = [seqLen, microBatch, hidden, tp_size,
      bytes_per_element].map(big);
    let out = (e * s * b * h) / (sequence_parallel ? t : 1n);
    if (last) out += e * s * b * h + (4n * s * b * big(vocab)) / t;
    return out;
  }

  // ----------------------------------------------------------- the estimate
  /** Blocks per stage (utils.models.split_layers, as the planner cuts them): as
   * even as possible, the extra ones on the first stages. */
  function stageLayers(layers, pp) {
    const base = Math.floor(layers / pp);
    const extra = layers % pp;
    return Array.from({ length: pp }, (_, i) => base + (i < extra ? 1 : 0));
  }

  /** planner._check_layout: same checks, same order, same messages. */
  function checkLayout(model, dp, tp, pp, microBatch, microBatches, v, schedule) {
    for (const [name, value] of [
      ["dp", dp],
      ["tp", tp],
      ["pp", pp],
      ["micro_batch", microBatch],
      ["micro_batches", microBatches],
      ["virtual_stages", v],
    ]) {
      checkInt(name, value, 1);
    }
    checkChoice("schedule", schedule, SCHEDULES);
    if (model.heads % tp) {
      throw new LayoutError(`tp=${tp} must divide the ${model.heads} attention heads`);
    }
    const kv = model.kv_heads || model.heads;
    if (kv % tp) {
      throw new LayoutError(`tp=${tp} must divide the ${kv} key/value heads`);
    }
    const ffn = ffnSize(model);
    if (ffn % big(tp)) {
      throw new LayoutError(`tp=${tp} must divide the MLP width ${ffn}`);
    }
    if (pp * v > model.layers) {
      throw new LayoutError(
        `pp x virtual_stages = ${pp * v} stages for ${model.layers} layers: ` +
          "at most one stage per layer"
      );
    }
    if (v > 1 && schedule !== "interleaved") {
      throw new LayoutError(
        `virtual_stages=${v} needs schedule='interleaved', got ${pyRepr(schedule)}`
      );
    }
    if (schedule === "interleaved" && microBatches % pp) {
      throw new LayoutError(
        `the interleaved schedule needs micro_batches (${microBatches}) to be ` +
          `a multiple of pp (${pp}) (Narayanan et al. 2021, section 2.2.2)`
      );
    }
  }

  /** planner._in_flight: GPipe m; 1F1B and ZB-H1 min(m, p - stage); interleaved
   * min(m v, 2(p - stage - 1) + (v - 1) p + 1) / v chunks (Megatron-LM's warm-up),
   * never more than m. A fraction of micro-batches. */
  function inFlight(schedule, pp, stage, m, v) {
    if (schedule === "gpipe") return frac(m);
    if (schedule === "interleaved") {
      const chunks = 2 * (pp - stage - 1) + (v - 1) * pp + 1;
      return frac(Math.min(m * v, chunks), v);
    }
    return frac(Math.min(m, pp - stage));
  }

  const ESTIMATE_DEFAULTS = {
    dp: 1,
    tp: 1,
    pp: 1,
    zero_stage: 0,
    micro_batch: 1,
    micro_batches: 1,
    virtual_stages: 1,
    schedule: "1f1b",
    sequence_parallel: false,
    recompute: "none",
    offload: "none",
    convention: "mixed-16",
    activations: "korthikanti-16",
    cluster: null,
  };

  /** planner.estimate: memory (bytes by category, device and host), bytes sent
   * per axis, the bubble, per rank of the worst pipeline stage; all modelled.
   * `conventions` is BYTES_PER_PARAM_CONVENTIONS as the Python serialises it;
   * `options.cluster`, if given, a serialised hardware.Cluster. */
  function estimate(model, options, conventions) {
    const o = Object.assign({}, ESTIMATE_DEFAULTS, options);
    const v = o.virtual_stages;
    const [dp, tp, pp] = [o.dp, o.tp, o.pp];
    checkLayout(model, dp, tp, pp, o.micro_batch, o.micro_batches, v, o.schedule);
    checkInt("zero_stage", o.zero_stage, 0, 3);
    checkBool("sequence_parallel", o.sequence_parallel);
    checkChoice("recompute", o.recompute, RECOMPUTES);
    checkChoice("offload", o.offload, OFFLOADS);
    checkChoice("convention", o.convention, Object.keys(conventions));
    checkChoice("activations", o.activations, ACTIVATION_MODELS);
    if (o.activations === "course-fp32" && o.recompute !== "none") {
      throw new LayoutError(
        "activations='course-fp32' counts the course GPT without recomputation;" +
          ` got recompute=${pyRepr(o.recompute)}`
      );
    }
    if (o.offload === "params" && o.zero_stage !== 3) {
      throw new LayoutError(
        "offload='params' keeps parameter shards on the host: " +
          `it needs zero_stage=3, got ${o.zero_stage}`
      );
    }
    const conv = conventions[o.convention];
    const [split, replicated] = layerParamsSplit(model);
    const perLayer = ceilDiv(split, big(tp)) + replicated;
    const embSplit = ceilDiv(big(model.vocab) * big(model.hidden), big(tp));
    const positions =
      b01(model.learned_positions) * big(model.seq_len) * big(model.hidden);
    const headOwn =
      b01(!model.tied) * embSplit + b01(model.final_norm) * normParams(model);
    const layers = stageLayers(model.layers, pp);
    const [s, b, h, m] = [model.seq_len, o.micro_batch, model.hidden, o.micro_batches];
    const param16 = big(
      conv.components.find((c) => c.category === "params").bytes_per_param
    );

    let best = null;
    const perStage = [];
    layers.forEach((nLayers, stage) => {
      let params = big(nLayers) * perLayer;
      if (stage === 0) params += embSplit + positions;
      if (stage === pp - 1) params += headOwn + b01(pp > 1 && model.tied) * embSplit;
      const states = conventionStateBytes(conv, params, dp, o.zero_stage);
      const host = { params: 0n, grads: 0n, optimizer: 0n };
      let gathered = 0n;
      if (o.zero_stage === 3) {
        // two layers' full 16-bit parameters, gathered
        gathered = big(Math.min(2, nLayers)) * perLayer * param16;
      }
      if (["optimizer", "optimizer+grads", "params"].includes(o.offload)) {
        [host.optimizer, states.optimizer] = [states.optimizer, 0n];
      }
      if (["optimizer+grads", "params"].includes(o.offload)) {
        [host.grads, states.grads] = [states.grads, 0n];
      }
      if (o.offload === "params") {
        [host.params, states.params] = [states.params, 0n];
      }
      const flight = inFlight(o.schedule, pp, stage, m, v);
      let perMb;
      if (o.activations === "course-fp32") {
        const tps = { tp_size: tp, sequence_parallel: o.sequence_parallel };
        perMb =
          courseGptActivationBytes(s, b, h, model.heads, nLayers, tps) +
          courseGptOutsideBytes(s, b, h, model.vocab,
            Object.assign({ last: stage === pp - 1 }, tps));
      } else {
        perMb = transformerActivationBytes(s, b, h, model.heads, nLayers, {
          tp_size: tp,
          sequence_parallel: o.sequence_parallel,
          recompute: o.recompute,
        });
      }
      const acts = fceil(fmul(frac(perMb), flight));
      const device = Object.assign({}, states, { activations: acts });
      device.params += gathered;
      device.total = device.params + device.grads + device.optimizer + acts;
      host.total = host.params + host.grads + host.optimizer;
      perStage.push({
        stage,
        layers: nLayers,
        params,
        in_flight: fceil(flight),
        device,
        host,
      });
      if (best === null || device.total > best.device.total) {
        best = { stage, device, host, params, flight };
      }
    });
    const { stage, device, host, params, flight } = best;

    const B = big(b) * big(s) * big(h); // b s h elements
    const tpFactor = o.recompute === "full" ? 12n : 8n;
    const tpBytes =
      ((tpFactor * B * big(tp - 1)) / big(tp)) * big(layers[stage]) * big(m);
    const boundaries = big((stage > 0 ? 1 : 0) + (stage < pp - 1 ? 1 : 0));
    let ppElems = boundaries * B * big(m) * big(v);
    if (tp > 1) ppElems /= big(tp); // Narayanan et al. section 4.1, scatter/gather
    const gradElems = params;
    // ZeRO-2: m reduce-scatters and one all-gather; ZeRO-3: 3 per micro-batch
    const dpFactor =
      o.zero_stage === 2 ? m + 1 : o.zero_stage === 3 ? 3 * m : 2;
    // a float, as in Python: int * float * int * int, left to right
    const dpBytes =
      dpFactor * busFactor("all_gather", dp) * Number(gradElems) *
      Number(ACTIVATION_BYTES);
    const shard = o.zero_stage >= 2 ? ceilDiv(params, big(dp)) : params;
    const offloadBytes = o.offload !== "none" ? 4n * shard : 0n;
    const comm = {
      tp: tpBytes * ACTIVATION_BYTES,
      pp: ppElems * ACTIVATION_BYTES,
      dp: BigInt(Math.trunc(dpBytes)), // int(float)
      offload: offloadBytes,
    };
    const notes = [
      `model states at ${conv.label}`,
      o.activations === "korthikanti-16"
        ? "activations: Korthikanti et al. 2022 Table 2 (16-bit, 1-byte masks), " +
          "embedding and output activations left out"
        : "activations: the course GPT in fp32 (course_gpt_activation_bytes), " +
          "with the stage's input and the last stage's norm output and softmax",
    ];
    const layout = {
      dp,
      tp,
      pp,
      zero_stage: o.zero_stage,
      micro_batch: o.micro_batch,
      micro_batches: o.micro_batches,
      virtual_stages: v,
      schedule: o.schedule,
      sequence_parallel: o.sequence_parallel,
      recompute: o.recompute,
      offload: o.offload,
    };
    if (o.activations !== "korthikanti-16") layout.activations = o.activations;
    const est = {
      layout,
      stage_layers: layers,
      worst_stage: stage,
      params_per_rank: params,
      device,
      host,
      comm,
      bubble: bubbleFraction(o.schedule, pp, m, v),
      in_flight: fceil(flight),
      convention: o.convention,
      notes,
      step_time: null,
      stages: perStage,
    };
    if (o.cluster !== null) est.step_time = stepTime(model, est, o.cluster);
    return est;
  }

  /** Estimate.fits */
  const fits = (est, deviceBytes) => est.device.total <= big(deviceBytes);

  /** planner.step_time: seconds per step, modelled. Compute 6 (8 with full
   * recomputation) x parameters x tokens FLOPs (Kaplan et al. 2020, 2.1) over all
   * GPUs at cluster.mfu of peak, stretched by 1/(1 - bubble); each axis' bytes over
   * the link it crosses (tp inside a node if it fits, pp and dp across nodes when
   * they span them), none of it hidden. */
  function stepTime(model, est, cluster) {
    const lay = est.layout;
    const gpus = lay.dp * lay.tp * lay.pp;
    const tokens =
      big(lay.dp) * big(lay.micro_batch) * big(lay.micro_batches) * big(model.seq_len);
    const flops = (lay.recompute === "full" ? 8n : 6n) * numParams(model) * tokens;
    let compute = Number(flops) / (gpus * cluster.peak_flops * cluster.mfu);
    compute /= 1 - est.bubble;
    const intra = cluster.intra_node_bytes_per_s;
    const inter = cluster.inter_node_bytes_per_s;
    const tpLink = lay.tp <= cluster.gpus_per_node ? intra : inter;
    // ParallelDims order: a dp group spans tp x dp ranks, a pp group all of them
    const dpLink = lay.tp * lay.dp <= cluster.gpus_per_node ? intra : inter;
    const ppLink = gpus <= cluster.gpus_per_node ? intra : inter;
    const out = {
      compute,
      tp: Number(est.comm.tp) / tpLink,
      pp: Number(est.comm.pp) / ppLink,
      dp: Number(est.comm.dp) / dpLink,
      offload: Number(est.comm.offload) / cluster.host_bytes_per_s,
    };
    out.total = out.compute + out.tp + out.pp + out.dp + out.offload;
    return out;
  }

  const api = {
    SCHEDULES,
    RECOMPUTES,
    OFFLOADS,
    ACTIVATION_MODELS,
    ValueError,
    LayoutError,
    modelSpec,
    ffnSize,
    kvSize,
    layerParamsSplit,
    layerParams,
    embeddingParams,
    headParams,
    numParams,
    narayananEq2,
    bubbleFraction,
    busFactor,
    conventionStateBytes,
    transformerActivationBytes,
    courseGptActivationBytes,
    courseGptOutsideBytes,
    stageLayers,
    inFlight: (schedule, pp, stage, m, v) => {
      const f = inFlight(schedule, pp, stage, m, v);
      return [f.n, f.d];
    },
    estimate,
    fits,
    stepTime,
  };
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.CoursePlanner = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
