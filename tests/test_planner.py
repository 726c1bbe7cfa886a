"""The planner (``utils.planner``) against the published tables and the course's code.

Parameter counts: Narayanan et al. 2021, Table 1 and eq. 2; Shoeybi et al. 2019
(Megatron-LM), Table 1; the released Llama 3 models; the course's own GPT. Memory:
the ZeRO paper's per-device formulas and ZeRO-Offload's 2/14 split, Korthikanti's
per-layer activations. Bubble: the pipeline chapter's formulas. Layouts that cannot
run are refused with the value named.
"""

from __future__ import annotations

import pytest

from utils.hardware import CLUSTERS
from utils.memory_model import convention_state_bytes, transformer_activation_bytes
from utils.models import GPT, GPTConfig, count_params
from utils.pipeline_parallel.check import expected_bubble
from utils.pipeline_parallel.schedules import SCHEDULES as PIPELINE_SCHEDULES
from utils.planner import (
    PRESETS,
    SCHEDULES,
    LayoutError,
    ModelSpec,
    bubble_fraction,
    estimate,
    narayanan_eq2,
    search,
)

# (printed billions, heads, hidden, layers): Narayanan et al. 2021, Table 1;
# vocabulary 51,200 and sequence length 2048 (section 5.1).
NARAYANAN_TABLE1 = [
    (1.7, 24, 2304, 24),
    (3.6, 32, 3072, 30),
    (7.5, 32, 4096, 36),
    (18.4, 48, 6144, 40),
    (39.1, 64, 8192, 48),
    (76.1, 80, 10240, 60),
    (145.6, 96, 12288, 80),
    (310.1, 128, 16384, 96),
    (529.6, 128, 20480, 105),
    (1008.0, 160, 25600, 128),
]
# (printed billions, hidden, heads, layers): Shoeybi et al. 2019, Table 1 (GPT-2
# configurations; vocabulary padded to 51,200, sequence length 1024).
MEGATRON_TABLE1 = [
    (1.2, 1536, 16, 40),
    (2.5, 1920, 20, 54),
    (4.2, 2304, 24, 64),
    (8.3, 3072, 32, 72),
]


@pytest.mark.parametrize("row", NARAYANAN_TABLE1, ids=lambda r: f"{r[0]}B")
def test_eq2_reproduces_narayanan_table1(row):
    printed, heads, hidden, layers = row
    spec = ModelSpec(layers, hidden, heads, 2048, 51200, final_norm=False)
    assert spec.num_params() == narayanan_eq2(layers, hidden, 51200, 2048)
    assert round(spec.num_params() / 1e9, 1) == printed


@pytest.mark.parametrize("row", MEGATRON_TABLE1, ids=lambda r: f"{r[0]}B")
def test_counts_reproduce_megatron_table1(row):
    printed, hidden, heads, layers = row
    spec = ModelSpec(layers, hidden, heads, 1024, 51200)
    assert round(spec.num_params() / 1e9, 1) == printed


def test_the_final_norm_is_what_eq2_leaves_out():
    spec = ModelSpec(24, 2304, 24, 2048, 51200)
    assert spec.num_params() - narayanan_eq2(24, 2304, 51200, 2048) == 2 * 2304


@pytest.mark.parametrize(
    "cfg",
    [GPTConfig(), GPTConfig(vocab_size=96, seq_len=24, d_model=48, n_layers=3)],
)
def test_the_course_gpt_is_counted_exactly(cfg):
    spec = ModelSpec(
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.vocab_size
    )
    assert spec.num_params() == count_params(GPT(cfg))


def test_llama3_presets_match_the_released_counts():
    # the released checkpoints' parameter counts (8.03B and 70.55B)
    assert PRESETS["Llama 3 8B"].num_params() == 8_030_261_248
    assert PRESETS["Llama 3 70B"].num_params() == 70_553_706_496
    assert round(PRESETS["GPT-3 175B"].num_params() / 1e9) == 175


# ------------------------------------------------------------------ model states
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_stage_no_tp_is_the_zero_formula(stage):
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    e = estimate(spec, dp=64, zero_stage=stage)
    want = convention_state_bytes("mixed-16", spec.num_params(), world_size=64,
                                  zero_stage=stage).as_dict()  # fmt: skip
    gathered = 2 * spec.layer_params() * 2 if stage == 3 else 0
    assert e.device["params"] == want["params"] + gathered
    assert e.device["grads"] == want["grads"]
    assert e.device["optimizer"] == want["optimizer"]


def test_zero_offload_keeps_2_bytes_on_the_device_and_14_on_the_host():
    """Ren et al. 2021, section 4.1: 16-bit parameters on the GPU (2 Psi); fp32
    master, momentum, variance and the 16-bit gradients on the CPU (14 Psi); 2 + 2
    bytes per parameter move per step."""
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    psi = spec.num_params()
    e = estimate(spec, offload="optimizer+grads")
    assert e.device["params"] == 2 * psi
    assert e.device["grads"] == e.device["optimizer"] == 0
    assert e.host["total"] == 14 * psi
    assert e.comm["offload"] == 4 * psi


def test_tensor_parallel_splits_the_matrices_and_keeps_norms_and_row_biases():
    spec = ModelSpec(4, 64, 4, 16, 128)
    split, replicated = spec.layer_params_split()
    h = 64
    assert replicated == 2 * h + 2 * 2 * h  # two row-parallel biases, two norms
    assert split + replicated == 12 * h * h + 13 * h
    for tp in (1, 2, 4):
        e = estimate(spec, tp=tp)
        want = 4 * (split // tp + replicated) + 128 * h // tp + 16 * h + 2 * h
        assert e.params_per_rank == want


# ------------------------------------------------------------------- activations
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (4, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activations_are_korthikanti_per_layer(tp, sp, recompute):
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    e = estimate(spec, tp=tp, sequence_parallel=sp, recompute=recompute, micro_batch=2)
    want = transformer_activation_bytes(
        2048, 2, 2304, 24, 24, tp_size=tp, sequence_parallel=sp, recompute=recompute
    )
    assert e.device["activations"] == want


def test_1f1b_first_stage_holds_the_whole_models_layers_worth():
    """Korthikanti et al. 2022, section 4.2.3: with 1F1B the first stage keeps p
    micro-batches of L/p layers, the activations of L layers, whatever p is."""
    spec = PRESETS["GPT 1.7B (Narayanan)"]  # 24 layers
    whole = transformer_activation_bytes(2048, 1, 2304, 24, 24)
    for pp in (2, 4, 8):
        e = estimate(spec, pp=pp, micro_batches=4 * pp)
        assert e.worst_stage == 0 and e.in_flight == pp
        assert e.device["activations"] == whole
    gpipe = estimate(spec, pp=4, micro_batches=16, schedule="gpipe")
    assert gpipe.device["activations"] == 4 * whole  # all 16 micro-batches of 6 layers


def test_interleaving_costs_megatrons_penalty():
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    plain = estimate(spec, pp=4, micro_batches=16)
    inter = estimate(spec, pp=4, micro_batches=16, schedule="interleaved",
                     virtual_stages=2)  # fmt: skip
    penalty = 1 + (4 - 1) / (4 * 2)
    assert inter.device["activations"] == pytest.approx(
        penalty * plain.device["activations"], rel=1e-9
    )


# ------------------------------------------------------------ bubble and traffic
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 32)])
def test_bubble_agrees_with_the_pipeline_chapter(schedule, p, m):
    v = 2 if schedule == "interleaved" else 1
    want = expected_bubble(PIPELINE_SCHEDULES[schedule], p, m, v)
    assert bubble_fraction(schedule, p, m, v) == pytest.approx(want)


def test_tensor_parallel_traffic_is_8bsh_per_layer_per_micro_batch():
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    for tp in (2, 4, 8):
        e = estimate(spec, tp=tp, micro_batch=2, micro_batches=3)
        per_layer = 8 * 2 * 2048 * 2304 * (tp - 1) // tp
        assert e.comm["tp"] == per_layer * 24 * 3 * 2  # 2 bytes per element
    assert estimate(spec, tp=1).comm["tp"] == 0


def test_data_parallel_traffic_is_the_all_reduce_and_half_again_at_zero3():
    spec = PRESETS["GPT 1.7B (Narayanan)"]
    psi = spec.num_params()
    two = estimate(spec, dp=8, zero_stage=2).comm["dp"]
    three = estimate(spec, dp=8, zero_stage=3).comm["dp"]
    assert two == pytest.approx(2 * 7 / 8 * psi * 2)
    assert three == pytest.approx(1.5 * two)


# ----------------------------------------------------------------------- search
def test_search_returns_fitting_layouts_of_all_gpus_fastest_first():
    cluster = CLUSTERS["DGX A100 x 16"]
    found = search(PRESETS["Llama 3 8B"], cluster, global_batch=512)
    assert found
    times = [e.step_time["total"] for e in found]
    assert times == sorted(times)
    for e in found:
        lay = e.layout
        assert lay["dp"] * lay["tp"] * lay["pp"] == cluster.gpus
        assert lay["tp"] <= cluster.gpus_per_node
        assert e.fits(cluster.memory_bytes)
        assert lay["dp"] * lay["micro_batch"] * lay["micro_batches"] == 512


def test_gpt3_needs_model_parallelism_on_80gb():
    """175B in mixed precision is 2.8 TB of model states: pure data parallelism
    without ZeRO-3 cannot fit on 80 GB devices, and every layout found shards the
    model across at least tp x pp > 1 or ZeRO-3."""
    cluster = CLUSTERS["DGX A100 x 128"]
    found = search(PRESETS["GPT-3 175B"], cluster, global_batch=1536,
                   zero_stages=(0, 1), recomputes=("selective",))  # fmt: skip
    assert found
    assert all(e.layout["tp"] * e.layout["pp"] > 1 for e in found)
    e = estimate(PRESETS["GPT-3 175B"], dp=1024)
    assert not e.fits(cluster.memory_bytes)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(tp=5), "tp=5 must divide the 24 attention heads"),
        (dict(pp=25), "25 stages for 24 layers"),
        (
            dict(pp=4, micro_batches=6, schedule="interleaved", virtual_stages=2),
            "multiple of pp",
        ),  # fmt: skip
        (dict(virtual_stages=2), "needs schedule='interleaved'"),
        (dict(offload="params"), "needs zero_stage=3"),
        (dict(dp=0), "dp"),
        (dict(schedule="pipedream"), "schedule"),
        (dict(recompute="some"), "recompute"),
    ],
)
def test_bad_layouts_are_refused_naming_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        estimate(PRESETS["GPT 1.7B (Narayanan)"], **kwargs)


def test_model_spec_validates():
    with pytest.raises(ValueError, match="hidden=30 must divide by heads=4"):
        ModelSpec(2, 30, 4, 16, 64)
    with pytest.raises(ValueError, match="kv_heads=3"):
        ModelSpec(2, 32, 4, 16, 64, kv_heads=3)
    with pytest.raises(LayoutError):
        estimate(ModelSpec(2, 32, 4, 16, 64, ffn=30), tp=4)


@pytest.mark.parametrize("tp,dp,pp", [(2, 2, 8), (4, 2, 4), (2, 8, 2), (8, 1, 4)])
def test_each_axis_is_priced_on_the_links_its_groups_use(tp, dp, pp):
    """An axis whose groups stay inside a node (``link_rows``, from the groups of
    ``ParallelDims``) goes over the node's links, the others over the NICs."""
    from utils.combined.figures import link_rows
    from utils.dims import ParallelDims
    from utils.planner import step_time

    cluster = CLUSTERS["DGX A100 x 16"]
    spec = PRESETS["Llama 3 8B"]
    est = estimate(spec, dp=dp, tp=tp, pp=pp, micro_batches=pp)
    seconds = step_time(spec, est, cluster)
    dims = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp)
    for row in link_rows(dims, cluster.gpus_per_node):
        inside = row["across"] == 0
        link = (
            cluster.intra_node_bytes_per_s if inside else cluster.inter_node_bytes_per_s
        )
        axis = row["axis"]
        assert seconds[axis] == pytest.approx(est.comm[axis] / link), (axis, inside)
